"""Baseline: the schema cedargate 0.1.0 made with `create_all`, before it had migrations.

The tables are written out here, frozen, rather than taken from the models: the models will change and
this revision must keep creating what 0.1.0 created. `proxy.record.migrations` also uses `schema()` to
check a database made by 0.1.0 (no version table) before stamping it with this revision.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def schema() -> sa.MetaData:
    """The five tables of 0.1.0, with their indexes and constraints, as its `create_all` made them."""
    metadata = sa.MetaData()
    moment = sa.DateTime(timezone=True)
    sa.Table(
        "decisions", metadata,
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("decision_id", sa.String(), nullable=False),
        sa.Column("at", moment, nullable=False),
        sa.Column("agent", sa.String(), nullable=False),
        sa.Column("method", sa.String(), nullable=False),
        sa.Column("scheme", sa.String(), nullable=False),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("resource", sa.String(), nullable=False),
        sa.Column("decision", sa.String(), nullable=False),
        sa.Column("determining_policies", sa.String(), nullable=False),
        sa.Column("errors", sa.String(), nullable=False),
        sa.Column("policy_revision", sa.String(), nullable=True),
        sa.Column("upstream_status", sa.Integer(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.Index("ix_decisions_decision_id", "decision_id", unique=True),
        sa.Index("ix_decisions_at", "at"),
        sa.Index("ix_decisions_agent_at", "agent", "at"),
    )
    sa.Table(
        "audit_log", metadata,
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("at", moment, nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("decision_id", sa.String(), nullable=True),
        sa.Column("override_id", sa.String(), nullable=True),
        sa.Column("agent", sa.String(), nullable=True),
        sa.Column("actor", sa.String(), nullable=True),
        sa.Column("payload", sa.String(), nullable=False),
        sa.Column("prev_hash", sa.String(), nullable=False),
        sa.Column("hash", sa.String(), nullable=False),
        sa.Index("ix_audit_log_decision_id", "decision_id"),
        sa.Index("ix_audit_log_override_id", "override_id"),
    )
    sa.Table(
        "audit_head", metadata,
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(), nullable=False),
    )
    sa.Table(
        "overrides", metadata,
        sa.Column("id", sa.String(), primary_key=True),
        sa.Column("fingerprint", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("agent", sa.String(), nullable=False),
        sa.Column("method", sa.String(), nullable=False),
        sa.Column("url", sa.String(), nullable=False),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("resource", sa.String(), nullable=False),
        sa.Column("headers", sa.String(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("body_sha256", sa.String(), nullable=False),
        sa.Column("cedar_request", sa.String(), nullable=False),
        sa.Column("policies", sa.String(), nullable=False),
        sa.Column("requirements", sa.String(), nullable=False),
        sa.Column("policy_revision", sa.String(), nullable=False),
        sa.Column("decision_id", sa.String(), nullable=False),
        sa.Column("justification", sa.String(), nullable=True),
        sa.Column("created_at", moment, nullable=False),
        sa.Column("expires_at", moment, nullable=False),
        sa.Column("decided_at", moment, nullable=True),
        sa.Column("decided_reason", sa.String(), nullable=True),
        sa.Column("grant_expires_at", moment, nullable=True),
        sa.Column("released_at", moment, nullable=True),
        sa.Column("release_decision_id", sa.String(), nullable=True),
        sa.Index("ix_overrides_fingerprint", "fingerprint"),
        sa.Index("ix_overrides_status", "status"),
        sa.Index("ix_overrides_agent", "agent"),
        sa.Index("ix_overrides_action", "action"),
        sa.Index("ix_overrides_expires_at", "expires_at"),
    )
    sa.Table(
        "override_votes", metadata,
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("override_id", sa.String(), sa.ForeignKey("overrides.id"), nullable=False),
        sa.Column("approver", sa.String(), nullable=False),
        sa.Column("roles", sa.String(), nullable=False),
        sa.Column("verdict", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("at", moment, nullable=False),
        sa.UniqueConstraint("override_id", "approver"),
        sa.Index("ix_override_votes_override_id", "override_id"),
    )
    return metadata


def upgrade() -> None:
    schema().create_all(op.get_bind(), checkfirst=False)


def downgrade() -> None:
    schema().drop_all(op.get_bind(), checkfirst=False)
