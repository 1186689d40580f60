"""`POST /overrides/{id}/request-info` as a reviewer uses it, on a real core and a temporary SQLite
record: the question is asked, shown in the request's `conversation` with the agent's answer, and
refused (as problem+json) when the reviewer may not ask it."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from fastapi.testclient import TestClient

from proxy.calls.mapping import Call
from proxy.runtime import Runtime
from proxy.settings.config import ApproverCredential
from proxy.vocabulary.problems import Problem
from tests.support.approvers import bearer, credentials

ROLES = {"erin": ("engineering-manager",), "sam": ("security",), "audra": ("auditor",)}
QUESTION = "Which customers are on i-1 right now?"


@pytest.fixture
def approvers() -> dict[str, ApproverCredential]:
    return credentials(ROLES)


def agent_calls(runtime: Runtime, justification: str) -> tuple[Problem | None, str | None]:
    """ops-bot's production stop, as the enforcer hands it to the core, not waiting (respond-async)."""
    call = Call(agent="ops-bot", method="POST", scheme="http", host="127.0.0.1", port=9000,
                path="/v1/instances/i-1/stop", headers={"X-Agent-Justification": justification})
    resolution = asyncio.run(runtime.oversight.resolve(runtime.gate.decide(call), 0, justification,
                                                       client_alive=lambda: True))
    return resolution.verdict.problem, resolution.override_id


def audit_kinds(runtime: Runtime, override_id: str) -> list[str]:
    assert runtime.recorder.flush(10)
    with sqlite3.connect(runtime.settings.state_dir / "cedargate.db") as con:
        rows = con.execute("SELECT kind FROM audit_log WHERE override_id = ? ORDER BY seq", (override_id,))
        return [kind for (kind,) in rows]


def test_a_reviewer_asks_and_sees_the_agents_answer_in_the_conversation(client: TestClient, runtime: Runtime):
    _, override_id = agent_calls(runtime, "instance is wedged")

    asked = client.post(f"/overrides/{override_id}/request-info", json={"question": QUESTION}, headers=bearer("erin"))
    assert asked.status_code == 200, asked.text
    body = asked.json()
    assert body["status"] == "needs_info"
    assert [(m["kind"], m["by"], m["text"]) for m in body["conversation"]] == [("question", "erin", QUESTION)]
    listed = client.get("/overrides?status=needs_info", headers=bearer("erin")).json()
    assert [item["id"] for item in listed] == [override_id]

    # The agent's retry hears the question; its retry with an answer makes the request pending again.
    assert agent_calls(runtime, "instance is wedged") == (Problem.OVERRIDE_NEEDS_INFO, override_id)
    assert agent_calls(runtime, "Nobody: drained at 09:00") == (Problem.OVERRIDE_PENDING, override_id)

    shown = client.get(f"/overrides/{override_id}", headers=bearer("erin")).json()
    assert shown["status"] == "pending"
    assert [(m["kind"], m["by"], m["text"]) for m in shown["conversation"]] == [
        ("question", "erin", QUESTION), ("answer", "ops-bot", "Nobody: drained at 09:00")]
    assert all(m["at"] for m in shown["conversation"])
    assert audit_kinds(runtime, override_id) == ["override_created", "info_requested", "info_given"]

    approved = client.post(f"/overrides/{override_id}/approve", json={"reason": "answered"}, headers=bearer("erin"))
    assert approved.status_code == 200 and approved.json()["status"] == "granted"


def test_a_request_that_needs_info_may_be_denied_directly(client: TestClient, runtime: Runtime):
    _, override_id = agent_calls(runtime, "instance is wedged")
    client.post(f"/overrides/{override_id}/request-info", json={"question": QUESTION}, headers=bearer("erin"))
    denied = client.post(f"/overrides/{override_id}/deny", json={"reason": "no answer needed"}, headers=bearer("erin"))
    assert denied.status_code == 200 and denied.json()["status"] == "denied"


@pytest.mark.parametrize(("who", "question", "status", "detail"), [
    ("sam", QUESTION, 403, "holds none of the roles"),
    ("audra", QUESTION, 403, "holds none of the roles"),
    ("erin", "   ", 422, "a question is required"),
])
def test_a_question_the_reviewer_may_not_ask_is_refused_and_changes_nothing(
        client: TestClient, runtime: Runtime, who: str, question: str, status: int, detail: str):
    _, override_id = agent_calls(runtime, "instance is wedged")
    refused = client.post(f"/overrides/{override_id}/request-info", json={"question": question}, headers=bearer(who))
    assert refused.status_code == status, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert detail in refused.json()["detail"]
    assert client.get(f"/overrides/{override_id}", headers=bearer("erin")).json()["status"] == "pending"
    assert audit_kinds(runtime, override_id) == ["override_created"]


@pytest.mark.parametrize("body", [{}, {"question": ""}, {"question": "x" * 2001}])
def test_a_question_missing_empty_or_too_long_is_refused(client: TestClient, runtime: Runtime, body: dict):
    _, override_id = agent_calls(runtime, "instance is wedged")
    refused = client.post(f"/overrides/{override_id}/request-info", json=body, headers=bearer("erin"))
    assert refused.status_code == 422


def test_a_second_question_before_the_answer_is_refused(client: TestClient, runtime: Runtime):
    _, override_id = agent_calls(runtime, "instance is wedged")
    client.post(f"/overrides/{override_id}/request-info", json={"question": QUESTION}, headers=bearer("erin"))
    again = client.post(f"/overrides/{override_id}/request-info", json={"question": "and?"}, headers=bearer("erin"))
    assert again.status_code == 409 and "answer" in again.json()["detail"]
    missing = client.post("/overrides/nope/request-info", json={"question": QUESTION}, headers=bearer("erin"))
    assert missing.status_code == 404
    assert client.post(f"/overrides/{override_id}/request-info", json={"question": QUESTION}).status_code == 401


@pytest.mark.parametrize("verb", ["deny", "approve"])
def test_a_blank_reason_is_refused_since_the_agent_is_told_it(client: TestClient, runtime: Runtime, verb: str):
    _, override_id = agent_calls(runtime, "instance is wedged")
    refused = client.post(f"/overrides/{override_id}/{verb}", json={"reason": "   "}, headers=bearer("erin"))
    assert refused.status_code == 422 and "a reason is required" in refused.json()["detail"]
    assert audit_kinds(runtime, override_id) == ["override_created"]
