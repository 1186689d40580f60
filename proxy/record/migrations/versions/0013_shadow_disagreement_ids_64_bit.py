"""The shadow disagreements' id becomes BIGINT on PostgreSQL (with its sequence), as 0012 did for the
decisions' id.

A shadow set stricter than the live one (the case it exists for) disagrees on every call, and so
writes a row per proxied call: past 2**31 every shadow write would fail. Live decisions would not
notice (the shadow's rows are dropped and counted), so the shadow feature would stop without a
refusal to show it. SQLite's INTEGER already holds 64 bits: nothing changes there.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.alter_column("shadow_disagreements", "id", type_=sa.BigInteger(), existing_type=sa.Integer(),
                    existing_nullable=False)
    # SERIAL made the sequence AS integer: it would stop at 2**31 - 1 whatever the column's type.
    op.execute(sa.text("ALTER SEQUENCE " + _sequence() + " AS bigint"))


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(sa.text("ALTER SEQUENCE " + _sequence() + " AS integer"))
    op.alter_column("shadow_disagreements", "id", type_=sa.Integer(), existing_type=sa.BigInteger(),
                    existing_nullable=False)


def _sequence() -> str:
    name = op.get_bind().execute(sa.text("SELECT pg_get_serial_sequence('shadow_disagreements', 'id')")).scalar()
    assert name, "shadow_disagreements.id has no sequence"
    return str(name)
