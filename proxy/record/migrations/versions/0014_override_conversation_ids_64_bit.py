"""The override votes' and messages' ids become BIGINT on PostgreSQL (with their sequences), as 0012
and 0013 did for the decisions' and the shadow disagreements' ids.

They grow per review rather than per call, so far more slowly; but nothing is ever deleted from them
and past 2**31 every vote (and so every grant or denial) and every question or answer would fail.
SQLite's INTEGER already holds 64 bits: nothing changes there.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_TABLES = ("override_votes", "override_messages")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in _TABLES:
        op.alter_column(table, "id", type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=False)
        # SERIAL made the sequence AS integer: it would stop at 2**31 - 1 whatever the column's type.
        op.execute(sa.text("ALTER SEQUENCE " + _sequence(table) + " AS bigint"))


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in _TABLES:
        op.execute(sa.text("ALTER SEQUENCE " + _sequence(table) + " AS integer"))
        op.alter_column(table, "id", type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=False)


def _sequence(table: str) -> str:
    name = op.get_bind().execute(sa.text("SELECT pg_get_serial_sequence(:table, 'id')"), {"table": table}).scalar()
    assert name, f"{table}.id has no sequence"
    return str(name)
