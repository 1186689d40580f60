"""Reviewers' browser sessions (the review page's sign-in): one row per session, keyed by the SHA-256 of
its token, never the token itself.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    moment = sa.DateTime(timezone=True)
    op.create_table(
        "reviewer_sessions",
        sa.Column("token_sha256", sa.String(), primary_key=True),
        sa.Column("approver", sa.String(), nullable=False),
        sa.Column("credential_sha256", sa.String(), nullable=False),
        sa.Column("created_at", moment, nullable=False),
        sa.Column("last_seen_at", moment, nullable=False),
        sa.Column("expires_at", moment, nullable=False),
    )
    op.create_index("ix_reviewer_sessions_approver", "reviewer_sessions", ["approver"])
    op.create_index("ix_reviewer_sessions_expires_at", "reviewer_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_table("reviewer_sessions")
