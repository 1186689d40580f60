"""Row numbers that outlast 2**31 calls: the audit log's seq (and the head's), the notification outbox's
audit seqs and the decisions' id become BIGINT on PostgreSQL, whose INTEGER is 32-bit.

Each proxied call writes a decision row and at least one audit row, so a busy proxy passes 2**31 in
time, and then every append fails: the record refuses, and so every call is refused. SQLite's INTEGER
already holds 64 bits (and a column declared exactly INTEGER PRIMARY KEY is the table's rowid), so
nothing changes there. On PostgreSQL, `ALTER COLUMN ... TYPE BIGINT` rewrites each table and its
indexes under an exclusive lock: a large audit log takes a while to upgrade, during which the proxy
waits at start (the migration runs before it serves).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

# (table, column) made 64-bit; decisions.id is numbered by a sequence of its own, widened too.
_COLUMNS = (("audit_log", "seq"), ("audit_head", "seq"), ("notification_cursor", "seq"),
            ("notification_deliveries", "seq"), ("decisions", "id"))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column in _COLUMNS:
        op.alter_column(table, column, type_=sa.BigInteger(), existing_type=sa.Integer(),
                        existing_nullable=False)
    # SERIAL made the sequence AS integer: it would stop at 2**31 - 1 whatever the column's type.
    op.execute(sa.text("ALTER SEQUENCE " + _sequence("decisions", "id") + " AS bigint"))


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(sa.text("ALTER SEQUENCE " + _sequence("decisions", "id") + " AS integer"))
    for table, column in _COLUMNS:
        op.alter_column(table, column, type_=sa.Integer(), existing_type=sa.BigInteger(),
                        existing_nullable=False)


def _sequence(table: str, column: str) -> str:
    name = op.get_bind().execute(sa.text("SELECT pg_get_serial_sequence(:table, :column)"),
                                 {"table": table, "column": column}).scalar()
    assert name, f"{table}.{column} has no sequence"
    return str(name)
