"""Reviewing override requests: list, show, approve, deny. Every answer says what the reviewer needs.

An approver sees only the requests their roles can decide; another request is answered as if it did
not exist (404). An approver holding the auditor role (`auditor_role`, default "auditor") sees them
all, and votes only where another of their roles is needed. The routes only translate: every vote is
`OverrideWorkflow.vote`, which checks, records and wakes the held call.

An approval may change the call's typed values (`"changes": {"amount": 50}`): the request shows which
it has (`editable_fields`) and the changes its approvals agreed on (`changes`); a change that does not
fit the call is answered 422, one the policies refuse or the earlier approvals disagree with 409, each
as problem+json of cedargate's catalogue (`override-changes-*`).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from override_api.deps import CurrentApprover, RuntimeDep
from proxy.calls.mcp.binding import tool_call
from proxy.oversight.overrides import Ballot, Override, OverrideError, OverrideStatus, can_decide
from proxy.vocabulary.problems import MEDIA_TYPE, http_problem, problem_document

router = APIRouter(prefix="/overrides", tags=["overrides"])


class VotePublic(BaseModel):
    approver: str
    roles: list[str]
    verdict: str
    reason: str
    at: datetime


class OverrideSummary(BaseModel):
    id: str
    status: OverrideStatus
    agent: str
    method: str
    url: str
    action: str
    resource: str
    reasons: list[str]
    created_at: datetime
    expires_at: datetime


class ToolCallPublic(BaseModel):
    server: str
    name: str
    arguments: dict = Field(description="the tool's arguments as the agent sent them")


class EditableFieldPublic(BaseModel):
    name: str
    type: str = Field(description="String, Long, Decimal or Bool: a change must be a JSON value of that type")
    value: Any = Field(description="the value in the call as the agent sent it")


class OverridePublic(OverrideSummary):
    tool: ToolCallPublic | None = Field(None, description="for an MCP tool call: which tool, with what")
    headers: dict[str, str]
    body: str = Field(description="the call's body as text (undecodable bytes replaced)")
    body_sha256: str
    justification: str | None
    cedar_request: dict
    policies: list[dict]
    requirements: list[dict]
    policy_revision: str
    decision_id: str
    decided_at: datetime | None
    decided_reason: str | None
    grant_expires_at: datetime | None
    released_at: datetime | None
    votes: list[VotePublic]
    editable_fields: list[EditableFieldPublic] = Field(
        description="the call's values an approval may change (manifest body fields, MCP tool arguments)")
    changes: dict[str, Any] | None = Field(
        description="the values the approvals changed; what goes upstream is the call with them. "
                    "None: approved (or to be approved) as sent")


class Review(BaseModel):
    reason: str = Field(min_length=1, max_length=2000, description="why; shown to the agent and kept in the record")


class Approval(Review):
    changes: dict[str, Any] | None = Field(
        None, description='values to change in the call before it goes, e.g. {"amount": 50}; each must be one '
                          "of the request's editable_fields, with a value of its type. Every approval of a "
                          "request must bring the same changes.")


def _summary_fields(o: Override) -> dict:
    return dict(
        id=o.id, status=o.status, agent=o.agent, method=o.method, url=o.url, action=o.action,
        resource=o.resource, reasons=[p["reason"] or p["id"] for p in json.loads(o.policies)],
        created_at=o.created_at, expires_at=o.expires_at,
    )


def _public(runtime, o: Override) -> OverridePublic:
    votes = runtime.overrides.votes(o.id)
    cedar_request = json.loads(o.cedar_request)
    tool = tool_call(cedar_request, o.body)
    return OverridePublic(
        **_summary_fields(o), tool=None if tool is None else ToolCallPublic.model_validate(tool),
        headers=json.loads(o.headers),
        body=o.body.decode("utf-8", "replace"),
        body_sha256=o.body_sha256, justification=o.justification, cedar_request=cedar_request,
        policies=json.loads(o.policies), requirements=json.loads(o.requirements), policy_revision=o.policy_revision,
        decision_id=o.decision_id, decided_at=o.decided_at, decided_reason=o.decided_reason,
        grant_expires_at=o.grant_expires_at, released_at=o.released_at,
        votes=[VotePublic(approver=v.approver, roles=sorted(v.roles), verdict=v.verdict, reason=v.reason, at=v.at)
               for v in votes],
        editable_fields=[EditableFieldPublic(**f.as_dict()) for f in runtime.workflow.editable_fields(o)],
        changes=json.loads(o.changes) if o.changes else None,
    )


@router.get("", response_model=list[OverrideSummary], summary="List override requests, newest first")
def list_overrides(
    runtime: RuntimeDep, approver: CurrentApprover,
    status: OverrideStatus | None = None, agent: str | None = None, action: str | None = None,
    limit: int = Query(100, ge=1, le=1000),
) -> list[OverrideSummary]:
    roles = None if runtime.sees_all_overrides(approver.roles) else approver.roles
    found = runtime.overrides.list(status.value if status else None, agent, action, limit, roles=roles)
    return [OverrideSummary(**_summary_fields(o)) for o in found]


@router.get("/{override_id}", response_model=OverridePublic, summary="Everything about one override request")
def show_override(override_id: str, runtime: RuntimeDep, approver: CurrentApprover) -> OverridePublic:
    override = runtime.overrides.get(override_id)
    # A request the approver may not decide is answered as one that does not exist.
    if override is None or not (runtime.sees_all_overrides(approver.roles)
                                or can_decide(override, approver.roles)):
        raise HTTPException(404, detail=f"no override request {override_id}")
    return _public(runtime, override)


def _review(runtime, approver, override_id: str, ballot: Ballot, reason: str,
            changes: dict[str, Any] | None = None) -> OverridePublic | JSONResponse:
    try:
        override, _ = runtime.workflow.vote(override_id, approver.id, approver.roles, ballot, reason, changes)
    except OverrideError as exc:
        if exc.problem is None and not exc.more:
            raise HTTPException(exc.status, detail=exc.detail) from exc
        body = (http_problem(exc.status, exc.detail, **exc.more) if exc.problem is None
                else problem_document(exc.problem, exc.status, exc.detail, **exc.more))
        return JSONResponse(body, exc.status, media_type=MEDIA_TYPE)
    return _public(runtime, override)


_CHANGE_PROBLEMS: dict[int | str, dict[str, Any]] = {
    422: {"description": "the changes name a field the call does not have, or a value of the wrong type "
                         "(problem override-changes-invalid, with `errors` and `editable_fields`)"},
    409: {"description": "not pending; or the policies refuse the changed call (override-changes-refused, "
                         "naming `policies`), or earlier approvals made other changes (override-changes-disagree)"},
}


@router.post("/{override_id}/approve", response_model=OverridePublic, responses=_CHANGE_PROBLEMS,
             summary="Approve, as sent or with changes: once every required approval is in, the call is "
                     "released once")
def approve(override_id: str, review: Approval, runtime: RuntimeDep,
            approver: CurrentApprover) -> OverridePublic | JSONResponse:
    return _review(runtime, approver, override_id, Ballot.APPROVE, review.reason, review.changes)


@router.post("/{override_id}/deny", response_model=OverridePublic, summary="Deny: final; the agent is told why")
def deny(override_id: str, review: Review, runtime: RuntimeDep,
         approver: CurrentApprover) -> OverridePublic | JSONResponse:
    return _review(runtime, approver, override_id, Ballot.DENY, review.reason)
