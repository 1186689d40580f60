"""The audit log's index on override_id holds only the rows that have one: `ix_audit_log_override_id`
becomes partial (WHERE override_id IS NOT NULL) on SQLite and PostgreSQL.

Every recorded call chains a decision event and an outcome event, neither about an override request, and
each of their NULLs went into that index: a page written in every commit of the record before forward.
The index is read only by override id (`override_id = ...`, which implies NOT NULL, so both databases'
planners use the partial index), never for the rows without one.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

_WITH_OVERRIDE = sa.text("override_id IS NOT NULL")


def upgrade() -> None:
    op.drop_index("ix_audit_log_override_id", table_name="audit_log")
    op.create_index("ix_audit_log_override_id", "audit_log", ["override_id"],
                    sqlite_where=_WITH_OVERRIDE, postgresql_where=_WITH_OVERRIDE)


def downgrade() -> None:
    op.drop_index("ix_audit_log_override_id", table_name="audit_log")
    op.create_index("ix_audit_log_override_id", "audit_log", ["override_id"])
