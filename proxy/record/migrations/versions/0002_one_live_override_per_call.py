"""One live override request per call: a partial unique index on the fingerprint of pending and granted ones.

Two instances (or workers) on one database each opened a request for the same call when its identical
calls arrived at once; the index makes the second insert fail, and the override store attaches the call
to the first one instead.

A database may already hold several live requests for one call (opened before this revision by two
processes at once). The newest of each is kept live; the older ones are marked expired, with a reason
saying so, since the index cannot be built over them. (Their holds ended long ago: this runs at start.)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

LIVE = "status IN ('pending', 'granted')"
INDEX = "ux_overrides_live_fingerprint"


def upgrade() -> None:
    op.execute(sa.text(
        f"UPDATE overrides SET status = 'expired', version = version + 1, "
        f"decided_reason = 'superseded: another live request for the same call was newer (schema upgrade 0002)' "
        f"WHERE {LIVE} AND EXISTS (SELECT 1 FROM overrides AS newer WHERE newer.fingerprint = overrides.fingerprint "
        f"AND newer.{LIVE} AND (newer.created_at > overrides.created_at "
        f"OR (newer.created_at = overrides.created_at AND newer.id > overrides.id)))"
    ))
    op.create_index(INDEX, "overrides", ["fingerprint"], unique=True,
                    sqlite_where=sa.text(LIVE), postgresql_where=sa.text(LIVE))


def downgrade() -> None:
    op.drop_index(INDEX, table_name="overrides")
