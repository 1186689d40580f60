"""Reviewing override requests: list, show, approve, deny, ask the agent; each request's context and audit
rows. Every answer says what the reviewer needs.

Each request, listed or shown, carries its summary (`proxy.oversight.summary`: tool, key arguments,
severity, reversibility, seconds left, votes, roles still needed) and where it stands in its escalation
chain (`chain`, `proxy.oversight.chains.standing`: tiers, current tier, next step, primary reviewer);
`GET /overrides/{id}/context` what surrounds it (`proxy.oversight.review_context`); `GET
/overrides/{id}/audit` its audit rows. Everything the agent chose is answered as JSON data, never as
markup.

An approver sees only the requests their roles can decide now (a later tier's approver, once the
request's chain has reached that tier); another request is answered as if it did not exist (404). An
approver holding the auditor role (`auditor_role`, default "auditor") sees them all, and votes only
where another of their roles is needed. The routes only translate: every vote is
`OverrideWorkflow.vote`, which checks, records and wakes the held call. Approve and deny run on the event
loop and cast it with `vote_soon`, which awaits the vote's transaction there: the held call is woken
from the loop, with no worker thread on its way (the answer, which reads the store, is built on one).

An approval may change the call's typed values (`"changes": {"amount": 50}`): the request shows which it
has (`editable_fields`) and the changes its approvals agreed on (`changes`); a change that does not fit
the call is answered 422, one the policies refuse or the earlier approvals disagree with 409, each as
problem+json of cedargate's catalogue (`override-changes-*`).

A reviewer may ask the agent a question instead of deciding (`request-info`): the held call is answered
`override-needs-info` with it, and the agent's retry with a new `X-Agent-Justification` is the answer,
shown with the question in the request's `conversation`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from override_api.answers import JSONAnswer
from override_api.deps import Approver, CurrentApprover, RuntimeDep
from override_api.review_models import ChainPublic, ReviewContextPublic
from proxy.calls.mcp.binding import tool_call
from proxy.oversight.chains import standing
from proxy.oversight.overrides import Ballot, MessageKind, Override, OverrideError, OverrideStatus, Vote, can_decide
from proxy.oversight.review_context import review_context
from proxy.oversight.summary import summarize
from proxy.oversight.workflow import MAX_QUESTION
from proxy.record import audit
from proxy.record.store import utcnow
from proxy.vocabulary.problems import MEDIA_TYPE, http_problem, problem_document

router = APIRouter(prefix="/overrides", tags=["overrides"])


class VotePublic(BaseModel):
    approver: str
    roles: list[str]
    verdict: str
    reason: str
    at: datetime


class MessagePublic(BaseModel):
    at: datetime
    by: str = Field(description="the approver who asked, or the agent who answered")
    kind: MessageKind
    text: str


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
    tool: str | None = Field(description="the MCP tool called; null for other calls")
    key_arguments: dict[str, str] = Field(
        description="what the call asks, by name: the manifest route's fields or the tool's arguments, "
                    "a few, each as short text")
    severity: str | None = Field(description="low, medium, high or critical: the policies' @severity, else "
                                             "the manifest's classification; null when neither says")
    reversible: bool | None = Field(description="the policies' @reversible, else the manifest's; null when "
                                                "neither says")
    seconds_left: int | None = Field(description="until the request expires undecided; null once decided")
    votes: list[VotePublic]
    roles_needed: list[str] = Field(description="roles whose approval would still count")
    approvals_needed: int = Field(description="the fewest further approvals that could grant it")
    decided_at: datetime | None
    decided_reason: str | None
    changes: dict[str, Any] | None = Field(
        description="the values the approvals changed; what goes upstream is the call with them. "
                    "None: approved (or to be approved) as sent")
    chain: ChainPublic = Field(description="the escalation chain: its tiers, the current one, the next step and "
                                           "the primary reviewer")


class ToolCallPublic(BaseModel):
    server: str
    name: str
    arguments: dict = Field(description="the tool's arguments as the agent sent them")


class EditableFieldPublic(BaseModel):
    name: str
    type: str = Field(description="String, Long, Decimal or Bool: a change must be a JSON value of that type")
    value: Any = Field(description="the value in the call as the agent sent it")


class OverridePublic(OverrideSummary):
    tool_call: ToolCallPublic | None = Field(None, description="for an MCP tool call: which tool, with what")
    headers: dict[str, str]
    body: str = Field(description="the call's body as text (undecodable bytes replaced)")
    body_sha256: str
    justification: str | None
    cedar_request: dict
    policies: list[dict]
    requirements: list[dict]
    policy_revision: str
    decision_id: str
    grant_expires_at: datetime | None
    released_at: datetime | None
    editable_fields: list[EditableFieldPublic] = Field(
        description="the call's values an approval may change (manifest body fields, MCP tool arguments)")
    conversation: list[MessagePublic] = Field(
        default_factory=list, description="questions reviewers asked the agent and its answers, oldest first")


class Review(BaseModel):
    reason: str = Field(min_length=1, max_length=2000, description="why; shown to the agent and kept in the record")


class Question(BaseModel):
    question: str = Field(min_length=1, max_length=MAX_QUESTION,
                          description="what the agent should answer; it is shown to the agent as it is")


class Approval(Review):
    changes: dict[str, Any] | None = Field(
        None, description='values to change in the call before it goes, e.g. {"amount": 50}; each must be one '
                          "of the request's editable_fields, with a value of its type. Every approval of a "
                          "request must bring the same changes.")


def _summary_fields(o: Override, votes: list[Vote], now: datetime) -> dict[str, Any]:
    return dict(
        id=o.id, status=o.status, agent=o.agent, method=o.method, url=o.url, action=o.action,
        resource=o.resource, reasons=[p["reason"] or p["id"] for p in json.loads(o.policies)],
        created_at=o.created_at, expires_at=o.expires_at, decided_at=o.decided_at,
        decided_reason=o.decided_reason, changes=json.loads(o.changes) if o.changes else None,
        chain=standing(o, now), **summarize(o, votes, now).as_dict(),
    )


def _public(runtime, o: Override) -> OverridePublic:
    cedar_request = json.loads(o.cedar_request)
    tool = tool_call(cedar_request, o.body)
    return OverridePublic(
        **_summary_fields(o, runtime.overrides.votes(o.id), utcnow()),
        tool_call=None if tool is None else ToolCallPublic.model_validate(tool),
        headers=json.loads(o.headers),
        body=o.body.decode("utf-8", "replace"),
        body_sha256=o.body_sha256, justification=o.justification, cedar_request=cedar_request,
        policies=json.loads(o.policies), requirements=json.loads(o.requirements), policy_revision=o.policy_revision,
        decision_id=o.decision_id, grant_expires_at=o.grant_expires_at, released_at=o.released_at,
        editable_fields=[EditableFieldPublic(**f.as_dict()) for f in runtime.workflow.editable_fields(o)],
        conversation=[MessagePublic(at=m.at, by=m.by, kind=MessageKind(m.kind), text=m.text)
                      for m in runtime.overrides.messages(o.id)],
    )


def _action(action: str | None) -> str | None:
    """`process_refund` or `Action::"process_refund"`, as the requests store it."""
    if not action or action.startswith("Action::"):
        return action
    return f"Action::{json.dumps(action)}"


def _visible(runtime, approver: Approver, override_id: str) -> Override:
    override = runtime.overrides.get(override_id)
    # A request the approver may not decide is answered as one that does not exist.
    if override is None or not (runtime.sees_all_overrides(approver.roles)
                                or can_decide(override, approver.roles)):
        raise HTTPException(404, detail=f"no override request {override_id}")
    return override


@router.get("", response_model=list[OverrideSummary],
            summary="List override requests: undecided first, the soonest to expire first; then the decided, "
                    "the latest decided first")
def list_overrides(
    runtime: RuntimeDep, approver: CurrentApprover,
    status: OverrideStatus | None = None, agent: str | None = None,
    action: Annotated[str | None, Query(description='`process_refund` or `Action::"process_refund"`')] = None,
    policy: Annotated[str | None, Query(description="only requests this policy @id escalated")] = None,
    decided: Annotated[bool | None, Query(description="true: the history; false: the inbox")] = None,
    since: Annotated[datetime | None, Query(
        description="only requests opened at or after this time (ISO 8601; UTC without an offset)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[OverrideSummary]:
    roles = None if runtime.sees_all_overrides(approver.roles) else approver.roles
    if since is not None:  # compared with times stored in UTC (SQLite keeps no offset)
        since = since.astimezone(UTC) if since.tzinfo else since.replace(tzinfo=UTC)
    found = runtime.overrides.list(status.value if status else None, agent, _action(action), limit, roles=roles,
                                   policy=policy, decided=decided, since=since)
    votes, now = runtime.overrides.votes_on(o.id for o in found), utcnow()
    return [OverrideSummary(**_summary_fields(o, votes[o.id], now)) for o in found]


@router.get("/{override_id}", response_model=OverridePublic, summary="Everything about one override request")
def show_override(override_id: str, runtime: RuntimeDep, approver: CurrentApprover) -> OverridePublic:
    return _public(runtime, _visible(runtime, approver, override_id))


@router.get("/{override_id}/context", response_model=ReviewContextPublic,
            summary="What surrounds one request: the agent's statements and recent calls in its session, "
                    "similar requests and how they were decided, whether its policy revision is live")
def override_context(override_id: str, runtime: RuntimeDep, approver: CurrentApprover) -> ReviewContextPublic:
    override = _visible(runtime, approver, override_id)
    roles = None if runtime.sees_all_overrides(approver.roles) else approver.roles
    return ReviewContextPublic.model_validate(review_context(
        override, store=runtime.overrides, bundle=runtime.engine.snapshot.bundle, roles=roles))


class AuditRowPublic(BaseModel):
    seq: int
    at: datetime
    kind: str
    decision_id: str | None
    override_id: str | None
    agent: str | None
    actor: str | None
    payload: Any = Field(description="the event's content, as chained")
    hash: str


@router.get("/{override_id}/audit", response_model=list[AuditRowPublic],
            summary="The audit rows about one request: its events, and the decisions and outcomes of its calls")
def override_audit(override_id: str, runtime: RuntimeDep, approver: CurrentApprover) -> list[AuditRowPublic]:
    _visible(runtime, approver, override_id)
    return [AuditRowPublic(seq=e.seq, at=e.at, kind=e.kind, decision_id=e.decision_id, override_id=e.override_id,
                           agent=e.agent, actor=e.actor, payload=json.loads(e.payload), hash=e.hash)
            for e in audit.entries_about(runtime.overrides.engine, override_id)]


async def _review(runtime, approver, override_id: str, ballot: Ballot, reason: str,
                  changes: dict[str, Any] | None = None) -> OverridePublic | JSONResponse:
    try:
        override, _ = await runtime.workflow.vote_soon(override_id, approver.id, approver.roles, ballot, reason,
                                                       changes)
    except OverrideError as exc:
        if exc.problem is None and not exc.more:
            raise HTTPException(exc.status, detail=exc.detail) from exc
        body = (http_problem(exc.status, exc.detail, **exc.more) if exc.problem is None
                else problem_document(exc.problem, exc.status, exc.detail, **exc.more))
        return JSONAnswer(body, exc.status, media_type=MEDIA_TYPE)
    return await run_in_threadpool(_public, runtime, override)


_CHANGE_PROBLEMS: dict[int | str, dict[str, Any]] = {
    422: {"description": "the changes name a field the call does not have, or a value of the wrong type "
                         "(problem override-changes-invalid, with `errors` and `editable_fields`)"},
    409: {"description": "not pending; or the policies refuse the changed call (override-changes-refused, "
                         "naming `policies`), or earlier approvals made other changes (override-changes-disagree)"},
}


@router.post("/{override_id}/approve", response_model=OverridePublic, responses=_CHANGE_PROBLEMS,
             summary="Approve, as sent or with changes: once every required approval is in, the call is "
                     "released once")
async def approve(override_id: str, review: Approval, runtime: RuntimeDep,
                  approver: CurrentApprover) -> OverridePublic | JSONResponse:
    return await _review(runtime, approver, override_id, Ballot.APPROVE, review.reason, review.changes)


@router.post("/{override_id}/deny", response_model=OverridePublic, summary="Deny: final; the agent is told why")
async def deny(override_id: str, review: Review, runtime: RuntimeDep,
               approver: CurrentApprover) -> OverridePublic | JSONResponse:
    return await _review(runtime, approver, override_id, Ballot.DENY, review.reason)


@router.post("/{override_id}/request-info", response_model=OverridePublic,
             summary="Ask the agent a question before deciding: its held call is answered with it, and its "
                     "retry's new X-Agent-Justification is the answer")
def request_info(override_id: str, asking: Question, runtime: RuntimeDep,
                 approver: CurrentApprover) -> OverridePublic:
    try:
        override = runtime.workflow.request_info(override_id, approver.id, approver.roles, asking.question)
    except OverrideError as exc:
        raise HTTPException(exc.status, detail=exc.detail) from exc
    return _public(runtime, override)
