"""The shadow policies' record: one row per call on which the shadow set and the live set disagreed.

Only disagreements are written, never agreements, so shadow policies that mostly agree cost the record
next to nothing; each row goes through the recorder's writer in the batch of the decisions around it
(`Recorder.record_row`), never as a commit of its own. The row names its decision (`decision_id`), whose
row holds the call and its Cedar request. Not part of the audit chain: a shadow decision enforced nothing.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Table
from sqlmodel import Field, SQLModel


class ShadowDisagreement(SQLModel, table=True):
    __tablename__ = "shadow_disagreements"

    id: int | None = Field(default=None, primary_key=True)
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
