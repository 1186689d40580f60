"""Approve with changes: the values a reviewer changed in the call, kept with its override request.

`overrides.changes` holds them as JSON ({"amount": 50}), NULL when the request was (or will be) approved
as the agent sent it. Every existing row keeps NULL: requests decided before this revision were
approved unchanged.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("overrides", sa.Column("changes", sa.String(), nullable=True))


def downgrade() -> None:
    # SQLite (3.35+) drops a column that no index names, which this one is not.
    op.drop_column("overrides", "changes")
