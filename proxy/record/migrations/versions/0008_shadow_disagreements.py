"""Shadow policies: the calls on which a shadow policy set, evaluated beside the live one and never
enforced, disagreed with it (live and shadow decision, each side's determining policies and revision).

Only disagreements are rows; the index on `at` serves "what disagreed lately".

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shadow_disagreements",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("decision_id", sa.String(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("agent", sa.String(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("resource", sa.String(), nullable=False),
        sa.Column("live_decision", sa.String(), nullable=False),
        sa.Column("shadow_decision", sa.String(), nullable=False),
        sa.Column("live_policies", sa.String(), nullable=False),
        sa.Column("shadow_policies", sa.String(), nullable=False),
        sa.Column("live_revision", sa.String(), nullable=True),
        sa.Column("shadow_revision", sa.String(), nullable=True),
    )
    op.create_index("ix_shadow_disagreements_at", "shadow_disagreements", ["at"])


def downgrade() -> None:
    op.drop_index("ix_shadow_disagreements_at", table_name="shadow_disagreements")
    op.drop_table("shadow_disagreements")
