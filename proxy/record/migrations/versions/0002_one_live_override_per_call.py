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
    # Of a call's live requests, one stays live: a granted one before a pending one (a human's approval
    # is never thrown away for a request nobody has decided yet), then the newest. A superseded grant
    # ends as grant_expired, a superseded pending request as expired; the reason says why. (A migration
    # cannot append to the audit chain, whose rows are written by the recorder: the reason is the trace.)
    better = (
        "SELECT 1 FROM overrides AS better WHERE better.fingerprint = overrides.fingerprint "
        f"AND better.{LIVE} AND better.id <> overrides.id AND ("
        "(better.status = 'granted' AND overrides.status = 'pending') OR (better.status = overrides.status "
        "AND (better.created_at > overrides.created_at "
        "OR (better.created_at = overrides.created_at AND better.id > overrides.id))))"
    )
    op.execute(sa.text(
        "UPDATE overrides SET version = version + 1, "
        "status = CASE WHEN status = 'granted' THEN 'grant_expired' ELSE 'expired' END, "
        "decided_reason = 'superseded: another live request for the same call was granted or newer "
        f"(schema upgrade 0002)' WHERE {LIVE} AND EXISTS ({better})"
    ))
    op.create_index(INDEX, "overrides", ["fingerprint"], unique=True,
                    sqlite_where=sa.text(LIVE), postgresql_where=sa.text(LIVE))


def downgrade() -> None:
    op.drop_index(INDEX, table_name="overrides")
