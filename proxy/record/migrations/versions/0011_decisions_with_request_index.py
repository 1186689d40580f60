"""Retention finds the decisions still holding a Cedar request through a partial index of its own:
`ix_decisions_at_with_request` on decisions(at) WHERE cedar_request IS NOT NULL (SQLite and PostgreSQL).
A cleared request leaves it, so a retention run costs the same however long the cleared history grows.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_WITH_REQUEST = sa.text("cedar_request IS NOT NULL")


def upgrade() -> None:
    op.create_index("ix_decisions_at_with_request", "decisions", ["at"],
                    sqlite_where=_WITH_REQUEST, postgresql_where=_WITH_REQUEST)


def downgrade() -> None:
    op.drop_index("ix_decisions_at_with_request", table_name="decisions")
