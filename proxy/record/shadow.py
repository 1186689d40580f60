"""The shadow policies' record: one row per call on which the shadow set and the live set disagreed.

Only disagreements are written, never agreements, so shadow policies that mostly agree cost the record
next to nothing. The shadow's own thread writes them (`write_disagreements`), a few at a time, in
transactions of their own and never in the recorder's batches: a live decision's commit must never
depend on a row that enforces nothing (a table missing after a restore, a role without a grant on it),
so a shadow row that cannot be written is dropped and counted by its caller. The row names its decision
(`decision_id`), whose row holds the call and its Cedar request. Not part of the audit chain: a shadow
decision enforced nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Engine as SAEngine
from sqlmodel import Field, SQLModel

from proxy.record.audit import ROW_NUMBER
from proxy.record.store import WRITES, storable_row


class ShadowDisagreement(SQLModel, table=True):
    __tablename__ = "shadow_disagreements"

    id: int | None = Field(default=None, primary_key=True, sa_type=ROW_NUMBER)  # one per call at most (revision 0013)
    decision_id: str  # the live decision's row
    at: datetime = Field(index=True)
    agent: str
    action: str
    resource: str
    live_decision: str  # allow | deny | escalate | error
    shadow_decision: str
    live_policies: str = "[]"  # JSON list of @ids: the determining policies of each side
    shadow_policies: str = "[]"
    live_revision: str | None = None
    shadow_revision: str | None = None


disagreements: Table = ShadowDisagreement.__table__  # type: ignore[attr-defined]  # SQLModel sets it, untyped


def write_disagreements(engine: SAEngine, rows: list[dict[str, Any]]) -> None:
    """Insert disagreement rows in one transaction of their own; raises whatever the store raises (the
    caller drops them: nothing live waits on them). On SQLite it takes the write lock at BEGIN, like the
    recorder's writer, and holds it only for this one INSERT."""
    if not rows:
        return
    with engine.execution_options(**{WRITES: True}).begin() as conn:
        conn.execute(disagreements.insert(), [storable_row(row) for row in rows])
