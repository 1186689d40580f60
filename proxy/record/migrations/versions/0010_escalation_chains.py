"""Escalation chains: each override request keeps its chain and where it stands in it.

- `overrides.chain`: the request's tiers (roles, and when each is reached), expiry and reminder interval,
  as JSON; NULL for requests opened before this revision, whose one tier is their requirements' roles.
- `overrides.tier`, `tier_started_at`, `reminders_sent`: the tier the chain job last announced, when,
  and the reminders it has sent in it. Requests opened before this revision stand at tier 1, started
  when they were opened, no reminder sent.
- `overrides.next_step_at` (indexed): when the chain job should look at the request next; NULL when
  nothing is due before its expiry, as for every request opened before this revision.
- `overrides.primary_reviewer`: the reviewer named first at the last step (NULL: none was named).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    moment = sa.DateTime(timezone=True)
    # Plain ADD COLUMNs (SQLite takes them in place, with the defaults the existing rows need).
    op.add_column("overrides", sa.Column("chain", sa.String(), nullable=True))
    op.add_column("overrides", sa.Column("tier", sa.Integer(), nullable=False, server_default="1"))
    op.add_column("overrides", sa.Column("tier_started_at", moment, nullable=True))
    op.add_column("overrides", sa.Column("reminders_sent", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("overrides", sa.Column("next_step_at", moment, nullable=True))
    op.add_column("overrides", sa.Column("primary_reviewer", sa.String(), nullable=True))
    op.execute(sa.text("UPDATE overrides SET tier_started_at = created_at"))
    op.create_index("ix_overrides_next_step_at", "overrides", ["next_step_at"])


def downgrade() -> None:
    op.drop_index("ix_overrides_next_step_at", table_name="overrides")
    with op.batch_alter_table("overrides") as batch:
        for column in ("primary_reviewer", "next_step_at", "reminders_sent", "tier_started_at", "tier", "chain"):
            batch.drop_column(column)
