"""Notifications: the outbox the notification sweep delivers from (`proxy.notify.outbox`).

- `notification_cursor`: one row, the last audit seq turned into deliveries, and the sweep's lease. A
  database upgraded in use starts at its audit log's head: the requests of before are not announced
  again to channels configured now.
- `notification_deliveries`: one row per event and channel, keyed by (audit seq, channel), with the
  idempotency key sent on every try, its state (pending, delivered, failed), tries and last error.
- `notification_channels`: each channel's health: consecutive failures, since when, the next try, the
  last error and the last delivery.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    moment = sa.DateTime(timezone=True)
    op.create_table(
        "notification_cursor",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("lease_holder", sa.String(), nullable=True),
        sa.Column("lease_until", moment, nullable=True),
    )
    op.execute(sa.text("INSERT INTO notification_cursor (id, seq) SELECT 1, COALESCE(MAX(seq), 0) FROM audit_log"))
    op.create_table(
        "notification_deliveries",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("channel", sa.String(), primary_key=True),
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("override_id", sa.String(), nullable=True),
        sa.Column("notice", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", moment, nullable=False),
        sa.Column("delivered_at", moment, nullable=True),
        sa.Column("last_error", sa.String(), nullable=True),
    )
    op.create_index("ix_notification_deliveries_key", "notification_deliveries", ["key"], unique=True)
    op.create_index("ix_notification_deliveries_channel_state_seq", "notification_deliveries",
                    ["channel", "state", "seq"])
    op.create_table(
        "notification_channels",
        sa.Column("channel", sa.String(), primary_key=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("failing_since", moment, nullable=True),
        sa.Column("retry_at", moment, nullable=True),
        sa.Column("last_error", sa.String(), nullable=True),
        sa.Column("last_delivery_at", moment, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("notification_channels")
    op.drop_index("ix_notification_deliveries_channel_state_seq", table_name="notification_deliveries")
    op.drop_index("ix_notification_deliveries_key", table_name="notification_deliveries")
    op.drop_table("notification_deliveries")
    op.drop_table("notification_cursor")
