"""The Cedar request each decision was made on, kept with its row for a while.

`decisions.cedar_request`: principal, action, resource and the mapped context (canonical JSON, query
secrets redacted; credentials never enter a context), so a decision can be explained and replayed
against candidate policies (`cedargate replay`). Cleared after `cedar_request_retention`. Rows recorded
before this revision have none (NULL), and replay counts them as such.

No index: replay walks a time range through the `at` index.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("cedar_request", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("cedar_request")
