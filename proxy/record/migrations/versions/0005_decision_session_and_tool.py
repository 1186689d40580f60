"""The agent's session and the MCP tool on each decision row, so a reviewer sees the agent's recent calls.

A reviewer deciding an override request is shown what the same agent did in the same session just
before (`GET /overrides/{id}/context`), and which tool each MCP call was; until now both were only in
the audit log's payloads, which cannot be queried by session. Rows recorded before this revision have
neither (NULL): their session was never stored in a column.

No index: every index is paid for on each recorded call; the session's calls are found through the
(agent, at) index, newest first.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("session", sa.String(), nullable=True))
        batch.add_column(sa.Column("tool", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("tool")
        batch.drop_column("session")
