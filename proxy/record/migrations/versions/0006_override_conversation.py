"""Request more information: a request's conversation, needs_info among the live statuses, and whether
the agent was told how its request ended.

- `override_messages`: the questions reviewers asked the agent and the agent's answers, in order.
- The one-live-request index (0002) now counts `needs_info` as live: a request waiting for the agent's
  answer is still the call's one live request, which the answering retry must find.
- `overrides.outcome_told_at`: when the agent was told its request was denied or expired. Requests that
  ended before this revision are marked told as of their decision: the agents of the previous release
  were answered (or not) as it did, and an old denial must not surface on their next identical call.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

INDEX = "ux_overrides_live_fingerprint"
LIVE = "status IN ('pending', 'needs_info', 'granted')"
LIVE_BEFORE = "status IN ('pending', 'granted')"


def upgrade() -> None:
    moment = sa.DateTime(timezone=True)
    op.create_table(
        "override_messages",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("override_id", sa.String(), sa.ForeignKey("overrides.id"), nullable=False),
        sa.Column("at", moment, nullable=False),
        sa.Column("by", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("text", sa.String(), nullable=False),
    )
    op.create_index("ix_override_messages_override_id", "override_messages", ["override_id"])
    op.add_column("overrides", sa.Column("outcome_told_at", moment, nullable=True))
    op.execute(sa.text(
        "UPDATE overrides SET outcome_told_at = COALESCE(decided_at, released_at, created_at) "
        f"WHERE NOT ({LIVE_BEFORE})"))
    op.drop_index(INDEX, table_name="overrides")
    op.create_index(INDEX, "overrides", ["fingerprint"], unique=True,
                    sqlite_where=sa.text(LIVE), postgresql_where=sa.text(LIVE))


def downgrade() -> None:
    op.drop_index(INDEX, table_name="overrides")
    op.create_index(INDEX, "overrides", ["fingerprint"], unique=True,
                    sqlite_where=sa.text(LIVE_BEFORE), postgresql_where=sa.text(LIVE_BEFORE))
    op.drop_column("overrides", "outcome_told_at")
    op.drop_index("ix_override_messages_override_id", table_name="override_messages")
    op.drop_table("override_messages")
