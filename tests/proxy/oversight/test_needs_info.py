"""Request more information, and the agent told how its request ended, on real databases (SQLite and
PostgreSQL): the workflow moves the request, keeps its conversation and chains each event with it.

A reviewer asks (pending -> needs_info, `info_requested`); the identical call's retry with a new
X-Agent-Justification answers (needs_info -> pending, `info_given`); reviewers may decide a needs_info
request directly. A denied or expired request's end is told to the agent once, on its retry
(`outcome_told`), and the retry after that asks the reviewers again.
"""

from __future__ import annotations

import uuid

import pytest
from proxy_support import make_call
from sqlalchemy import text

from proxy.calls.mapping import Call
from proxy.cedar.escalation import Escalation, Requirement
from proxy.oversight.overrides import Override, OverrideError
from proxy.oversight.workflow import MAX_QUESTION, OverrideWorkflow
from proxy.record import audit

MANAGER = Requirement("protect-production-instances", ("engineering-manager",), 1)
ERIN = frozenset({"engineering-manager"})
QUESTION = "Which customers are on i-1 right now?"


def stop_call(**headers: str) -> Call:
    return make_call("POST", "http://127.0.0.1:9000/v1/instances/i-1/stop", body=b'{"grace": 30}',
                     headers={"Content-Type": "application/json", **headers})


def call_again(workflow: OverrideWorkflow, justification: str | None = "instance is wedged",
               expires_in: int = 1800, **headers: str) -> tuple[Override, bool]:
    """The agent's (identical) call, opened or joined as the held call does."""
    if justification is not None:
        headers["X-Agent-Justification"] = justification
    return workflow.open(
        stop_call(**headers), decision_id=str(uuid.uuid4()), escalation=Escalation((MANAGER,), expires_in),
        policies=[{"id": MANAGER.policy_id, "reason": None, "annotations": {}}],
        cedar_request={"principal": 'Agent::"ops-bot"', "action": 'Action::"post"',
                       "resource": 'Host::"127.0.0.1"', "context": {}},
        revision="rev-1", justification=justification,
    )


def kinds(workflow: OverrideWorkflow, override_id: str) -> list[tuple[str, str | None]]:
    assert workflow.recorder.flush()
    with workflow.store.engine.connect() as conn:
        return [(r.kind, r.actor) for r in conn.execute(
            text("SELECT kind, actor FROM audit_log WHERE override_id = :id ORDER BY seq"), {"id": override_id})]


def payloads(workflow: OverrideWorkflow, kind: str) -> list[str]:
    assert workflow.recorder.flush()
    with workflow.store.engine.connect() as conn:
        return [r.payload for r in conn.execute(text("SELECT payload FROM audit_log WHERE kind = :k ORDER BY seq"),
                                                {"k": kind})]


def conversation(workflow: OverrideWorkflow, override_id: str) -> list[tuple[str, str, str]]:
    return [(m.kind, m.by, m.text) for m in workflow.store.messages(override_id)]


def status(workflow: OverrideWorkflow, override_id: str) -> str:
    found = workflow.store.get(override_id)
    assert found is not None
    return found.status


# --- asking -----------------------------------------------------------------------------------------


def test_a_reviewer_asks_and_the_request_waits_for_the_agents_answer(workflow: OverrideWorkflow):
    override, _ = call_again(workflow)
    asked = workflow.request_info(override.id, "erin", ERIN, f"  {QUESTION}  ")

    assert asked.status == "needs_info" and status(workflow, override.id) == "needs_info"
    assert conversation(workflow, override.id) == [("question", "erin", QUESTION)]
    assert kinds(workflow, override.id) == [("override_created", None), ("info_requested", "erin")]
    assert QUESTION in payloads(workflow, "info_requested")[0]
    assert audit.verify(workflow.store.engine).ok


@pytest.mark.parametrize(("who", "roles", "question", "status_code"), [
    ("sam", frozenset({"security"}), QUESTION, 403),  # holds none of the roles the request needs
    ("ops-bot", ERIN, QUESTION, 403),  # the agent's own identity
    ("erin", ERIN, "   ", 422),
    ("erin", ERIN, "x" * (MAX_QUESTION + 1), 422),
])
def test_only_someone_who_may_decide_asks_and_only_a_real_question(
        workflow: OverrideWorkflow, who: str, roles: frozenset[str], question: str, status_code: int):
    override, _ = call_again(workflow)
    with pytest.raises(OverrideError) as refused:
        workflow.request_info(override.id, who, roles, question)
    assert refused.value.status == status_code
    assert status(workflow, override.id) == "pending" and conversation(workflow, override.id) == []
    assert kinds(workflow, override.id) == [("override_created", None)]


def test_a_second_question_before_the_answer_and_a_question_on_a_decided_request_are_refused(
        workflow: OverrideWorkflow):
    override, _ = call_again(workflow)
    workflow.request_info(override.id, "erin", ERIN, QUESTION)
    with pytest.raises(OverrideError) as waiting:
        workflow.request_info(override.id, "erin", ERIN, "and another thing?")
    assert waiting.value.status == 409 and "answer" in waiting.value.detail
    workflow.vote(override.id, "erin", ERIN, "deny", "no answer needed after all")
    with pytest.raises(OverrideError) as decided:
        workflow.request_info(override.id, "erin", ERIN, QUESTION)
    assert decided.value.status == 409 and "denied" in decided.value.detail
    with pytest.raises(OverrideError) as missing:
        workflow.request_info("no-such-request", "erin", ERIN, QUESTION)
    assert missing.value.status == 404


# --- answering --------------------------------------------------------------------------------------


def test_the_retry_with_a_new_justification_answers_and_the_request_is_pending_again(workflow: OverrideWorkflow):
    override, _ = call_again(workflow)
    workflow.request_info(override.id, "erin", ERIN, QUESTION)

    # A retry that says nothing new is not an answer: the request keeps waiting for one.
    for said in (None, "instance is wedged"):
        same, created = call_again(workflow, said)
        assert (same.id, same.status, created) == (override.id, "needs_info", False)

    answered, created = call_again(workflow, "Nobody: it was drained at 09:00 (ticket OPS-12).",
                                   Prefer="respond-async")
    assert (answered.id, answered.status, created) == (override.id, "pending", False)
    assert conversation(workflow, override.id) == [
        ("question", "erin", QUESTION), ("answer", "ops-bot", "Nobody: it was drained at 09:00 (ticket OPS-12).")]
    assert kinds(workflow, override.id) == [("override_created", None), ("info_requested", "erin"),
                                            ("info_given", "ops-bot")]

    # Asked again, the same answer is not heard twice.
    workflow.request_info(override.id, "erin", ERIN, "Who drained it?")
    again, _ = call_again(workflow, "Nobody: it was drained at 09:00 (ticket OPS-12).")
    assert again.status == "needs_info"
    again, _ = call_again(workflow, "The on-call, Max.")
    assert again.status == "pending" and len(conversation(workflow, override.id)) == 4
    assert audit.verify(workflow.store.engine).ok


@pytest.mark.parametrize(("ballot", "ending"), [("approve", "granted"), ("deny", "denied")])
def test_a_reviewer_may_decide_a_request_that_needs_info(workflow: OverrideWorkflow, ballot: str, ending: str):
    override, _ = call_again(workflow)
    workflow.request_info(override.id, "erin", ERIN, QUESTION)
    decided, done = workflow.vote(override.id, "erin", ERIN, ballot, "decided without the answer")
    assert done and decided.status == ending


def test_a_request_that_needs_info_expires_at_its_time(workflow: OverrideWorkflow):
    override, _ = call_again(workflow, expires_in=0)
    with workflow.store.engine.begin() as conn:  # asked while it was still in time
        conn.execute(text("UPDATE overrides SET status = 'needs_info' WHERE id = :id"), {"id": override.id})
    assert workflow.expire_due() == [(override.id, "expired")]


def test_a_request_that_needs_info_is_the_calls_one_live_request(workflow: OverrideWorkflow):
    override, _ = call_again(workflow)
    workflow.request_info(override.id, "erin", ERIN, QUESTION)
    with pytest.raises(Exception, match="ux_overrides_live_fingerprint|UNIQUE constraint failed"):
        with workflow.store.engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO overrides SELECT 'second', fingerprint, 'pending', version, agent, method, url, host,"
                " path, action, resource, headers, body, body_sha256, cedar_request, policies, requirements,"
                " policy_revision, decision_id, justification, created_at, expires_at, decided_at, decided_reason,"
                " grant_expires_at, released_at, release_decision_id, changes, outcome_told_at, chain, tier,"
                " tier_started_at, reminders_sent, next_step_at, primary_reviewer"
                " FROM overrides WHERE id = :id"), {"id": override.id})


# --- the agent told how it ended ---------------------------------------------------------------------


def _deny(workflow: OverrideWorkflow, override: Override, reason: str = "not during the sale") -> None:
    workflow.vote(override.id, "erin", ERIN, "deny", reason)


def test_the_retry_after_a_denial_is_told_it_once_then_asks_again(workflow: OverrideWorkflow):
    override, _ = call_again(workflow, Prefer="respond-async")
    _deny(workflow, override)

    told, created = call_again(workflow, Prefer="respond-async")
    assert (told.id, told.status, told.decided_reason, created) == (override.id, "denied", "not during the sale",
                                                                     False)
    fresh, created = call_again(workflow, Prefer="respond-async")
    assert created and fresh.id != override.id and fresh.status == "pending"
    assert kinds(workflow, override.id)[-1] == ("outcome_told", None)
    assert '"told_on":"retry"' in payloads(workflow, "outcome_told")[0]


def test_an_end_the_held_call_told_is_not_told_again(workflow: OverrideWorkflow):
    override, _ = call_again(workflow)
    _deny(workflow, override)
    denied = workflow.store.get(override.id)
    assert denied is not None
    assert workflow.tell_outcome(denied, decision_id="d-held")
    assert not workflow.tell_outcome(denied, decision_id="d-held-too")  # told once, by one of them

    fresh, created = call_again(workflow)
    assert created and fresh.id != override.id
    assert [k for k, _ in kinds(workflow, override.id)].count("outcome_told") == 1


def test_a_released_request_is_nothing_to_tell(workflow: OverrideWorkflow):
    override, _ = call_again(workflow)
    workflow.vote(override.id, "erin", ERIN, "approve", "fine")
    granted = workflow.store.get(override.id)
    assert granted is not None and workflow.release(granted, decision_id="d-1", payload={})
    fresh, created = call_again(workflow)
    assert created and fresh.id != override.id
    assert not workflow.tell_outcome(granted, decision_id="d-2")

