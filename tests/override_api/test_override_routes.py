"""The override routes as a reviewer uses them: list, show, approve, deny, over HTTP on a real core and
a temporary SQLite record. Each answer is checked as the reviewer sees it: status, and for a refusal the
problem+json `type` and `detail`; and what a vote changed is checked where the agent would notice it."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid

import pytest
from fastapi.testclient import TestClient

from proxy.calls.mapping import Call
from proxy.cedar.escalation import Escalation, Requirement
from proxy.runtime import Runtime
from proxy.settings.config import ApproverCredential
from tests.support.approvers import bearer, credentials

STOP_PROD = ("POST", "http://127.0.0.1:9000/v1/instances/i-1/stop")
TWO_PERSON = Requirement("no-volume-deletion", ("security", "lead-engineer"), 2)
ROLES = {"erin": ("engineering-manager",), "max": ("engineering-manager",), "sam": ("security",),
         "lee": ("lead-engineer",), "audra": ("auditor",), "ops-bot": ("engineering-manager",)}
PROBLEM = "application/problem+json"


@pytest.fixture
def approvers() -> dict[str, ApproverCredential]:
    return credentials(ROLES)


def make_call(method: str, url: str) -> Call:
    """ops-bot's call, as the enforcer hands it to the core."""
    scheme, rest = url.split("://", 1)
    authority, path = rest.split("/", 1)
    host, port = authority.split(":")
    return Call(agent="ops-bot", method=method, scheme=scheme, host=host, port=int(port), path=f"/{path}")


def escalated_stop(runtime: Runtime) -> str:
    """The production stop, escalated by the real gate: its request opened without holding the call."""
    verdict = runtime.gate.decide(make_call(*STOP_PROD))
    resolution = asyncio.run(runtime.oversight.resolve(verdict, 0, "instance is wedged",
                                                       client_alive=lambda: True))
    assert resolution.override_id is not None
    return resolution.override_id


def volume_deletion(runtime: Runtime, expires_in: int = 1800) -> str:
    call = make_call("DELETE", "http://127.0.0.1:9000/v1/volumes/v-1")
    override, _ = runtime.workflow.open(
        call, decision_id=str(uuid.uuid4()), escalation=Escalation((TWO_PERSON,), expires_in),
        policies=[{"id": TWO_PERSON.policy_id, "reason": "Deleting a volume destroys its data for good.",
                   "annotations": {}}],
        cedar_request={"principal": 'Agent::"ops-bot"', "action": 'Action::"delete"',
                       "resource": 'Host::"127.0.0.1"', "context": {"path": "/v1/volumes/v-1"}},
        revision="rev-1", justification=None,
    )
    return override.id


def audit_kinds(runtime: Runtime, override_id: str) -> list[str]:
    assert runtime.recorder.flush(10)
    with sqlite3.connect(runtime.settings.state_dir / "cedargate.db") as con:
        rows = con.execute("SELECT kind FROM audit_log WHERE override_id = ? ORDER BY seq", (override_id,))
        return [kind for (kind,) in rows]


def assert_problem(response, status: int, detail: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert (body["type"], body["status"]) == ("about:blank", status)
    assert detail in body["detail"]


# --- list and show --------------------------------------------------------------------------------


def test_a_reviewer_lists_the_requests_their_roles_can_decide(client: TestClient, runtime: Runtime):
    stop = escalated_stop(runtime)
    volume = volume_deletion(runtime)

    listing = client.get("/overrides", headers=bearer("erin"))

    assert listing.status_code == 200
    [summary] = listing.json()
    assert (summary["id"], summary["status"], summary["agent"]) == (stop, "pending", "ops-bot")
    assert summary["reasons"] == [
        "Stopping an instance on a production-critical host needs a human decision."]
    assert [o["id"] for o in client.get("/overrides", headers=bearer("sam")).json()] == [volume]


def test_a_listing_filters_by_status(client: TestClient, runtime: Runtime):
    stop = escalated_stop(runtime)
    assert [o["id"] for o in client.get("/overrides?status=pending", headers=bearer("erin")).json()] == [stop]
    assert client.get("/overrides?status=granted", headers=bearer("erin")).json() == []


def test_show_gives_the_call_the_policies_and_the_votes(client: TestClient, runtime: Runtime):
    stop = escalated_stop(runtime)
    client.post(f"/overrides/{stop}/approve", json={"reason": "checked with on-call"}, headers=bearer("erin"))

    shown = client.get(f"/overrides/{stop}", headers=bearer("erin"))

    assert shown.status_code == 200
    body = shown.json()
    assert (body["method"], body["url"]) == ("POST", STOP_PROD[1])
    assert body["justification"] == "instance is wedged"
    assert [p["id"] for p in body["policies"]] == ["protect-production-instances"]
    assert [(v["approver"], v["verdict"], v["reason"]) for v in body["votes"]] == [
        ("erin", "approve", "checked with on-call")]


def test_an_unknown_request_is_404(client: TestClient):
    for response in (client.get("/overrides/no-such-id", headers=bearer("erin")),
                     client.post("/overrides/no-such-id/approve", json={"reason": "ok"}, headers=bearer("erin")),
                     client.post("/overrides/no-such-id/deny", json={"reason": "no"}, headers=bearer("erin"))):
        assert_problem(response, 404, "no override request no-such-id")


def test_the_auditor_sees_every_request_but_cannot_vote(client: TestClient, runtime: Runtime):
    stop = escalated_stop(runtime)
    volume = volume_deletion(runtime)

    assert {o["id"] for o in client.get("/overrides", headers=bearer("audra")).json()} == {stop, volume}
    assert client.get(f"/overrides/{volume}", headers=bearer("audra")).status_code == 200
    refused = client.post(f"/overrides/{stop}/approve", json={"reason": "looks fine"}, headers=bearer("audra"))

    assert_problem(refused, 403, "audra holds none of the roles this request needs (engineering-manager)")
    assert client.get(f"/overrides/{stop}", headers=bearer("audra")).json()["status"] == "pending"


# --- votes ----------------------------------------------------------------------------------------


def test_approve_grants_records_and_answers_with_the_request(client: TestClient, runtime: Runtime):
    stop = escalated_stop(runtime)

    approved = client.post(f"/overrides/{stop}/approve", json={"reason": "checked with on-call"},
                           headers=bearer("erin"))

    assert approved.status_code == 200
    body = approved.json()
    assert (body["status"], body["decided_reason"]) == ("granted", "checked with on-call")
    assert body["grant_expires_at"] is not None
    assert audit_kinds(runtime, stop) == ["override_created", "approval", "grant"]
    # The agent's identical retry now finds the grant.
    assert runtime.overrides.granted_for(make_call(*STOP_PROD)) is not None


def test_deny_is_final_and_the_reason_is_kept(client: TestClient, runtime: Runtime):
    stop = escalated_stop(runtime)

    denied = client.post(f"/overrides/{stop}/deny", json={"reason": "not during business hours"},
                         headers=bearer("erin"))

    assert denied.status_code == 200
    assert denied.json()["status"] == "denied"
    assert denied.json()["decided_reason"] == "not during business hours"
    assert audit_kinds(runtime, stop) == ["override_created", "denial", "denied"]
    again = client.post(f"/overrides/{stop}/approve", json={"reason": "changed my mind"}, headers=bearer("max"))
    assert_problem(again, 409, "the override request is denied, not pending")


def test_two_approvers_with_different_roles_make_the_quorum(client: TestClient, runtime: Runtime):
    volume = volume_deletion(runtime)

    first = client.post(f"/overrides/{volume}/approve", json={"reason": "backups verified"},
                        headers=bearer("sam"))
    assert first.status_code == 200 and first.json()["status"] == "pending"
    second = client.post(f"/overrides/{volume}/approve", json={"reason": "not in use"}, headers=bearer("lee"))

    assert second.status_code == 200 and second.json()["status"] == "granted"
    assert {(v["approver"], tuple(v["roles"])) for v in second.json()["votes"]} == {
        ("sam", ("security",)), ("lee", ("lead-engineer",))}
    assert audit_kinds(runtime, volume) == ["override_created", "approval", "approval", "grant"]


def test_a_voter_without_the_role_is_403_and_nothing_changes(client: TestClient, runtime: Runtime):
    stop = escalated_stop(runtime)

    refused = client.post(f"/overrides/{stop}/approve", json={"reason": "ok"}, headers=bearer("sam"))

    # sam cannot see the request either, but a vote names what was missing rather than pretend.
    assert_problem(refused, 403, "sam holds none of the roles this request needs (engineering-manager)")
    assert client.get(f"/overrides/{stop}", headers=bearer("erin")).json()["votes"] == []
    assert audit_kinds(runtime, stop) == ["override_created"]


def test_an_approver_cannot_decide_their_own_call(client: TestClient, runtime: Runtime):
    stop = escalated_stop(runtime)  # made by ops-bot, which is also an approver here
    refused = client.post(f"/overrides/{stop}/approve", json={"reason": "trust me"}, headers=bearer("ops-bot"))
    assert_problem(refused, 403, "an approver cannot decide on a call made under their own identity")


def test_a_vote_on_a_decided_request_is_409(client: TestClient, runtime: Runtime):
    stop = escalated_stop(runtime)
    approved = client.post(f"/overrides/{stop}/approve", json={"reason": "ok"}, headers=bearer("erin"))
    assert approved.status_code == 200

    late = client.post(f"/overrides/{stop}/deny", json={"reason": "too late"}, headers=bearer("max"))

    assert_problem(late, 409, "the override request is granted, not pending")


def test_a_vote_on_an_expired_request_is_409(client: TestClient, runtime: Runtime):
    volume = volume_deletion(runtime, expires_in=0)

    late = client.post(f"/overrides/{volume}/approve", json={"reason": "ok"}, headers=bearer("sam"))
    assert_problem(late, 409, "the override request has expired")

    runtime.workflow.expire_due()
    swept = client.post(f"/overrides/{volume}/approve", json={"reason": "ok"}, headers=bearer("sam"))
    assert_problem(swept, 409, "the override request is expired, not pending")


def test_an_approval_cannot_become_a_denial(client: TestClient, runtime: Runtime):
    volume = volume_deletion(runtime)
    client.post(f"/overrides/{volume}/approve", json={"reason": "ok"}, headers=bearer("sam"))
    turned = client.post(f"/overrides/{volume}/deny", json={"reason": "no"}, headers=bearer("sam"))
    assert_problem(turned, 409, "sam already voted to approve this request")


# --- what is not a valid request ------------------------------------------------------------------


@pytest.mark.parametrize(("body", "detail"), [
    ({}, "body.reason: Field required"),
    ({"reason": ""}, "body.reason: String should have at least 1 character"),
    ({"reason": "x" * 2001}, "body.reason: String should have at most 2000 characters"),
])
def test_a_vote_without_a_usable_reason_is_422(client: TestClient, runtime: Runtime, body: dict, detail: str):
    stop = escalated_stop(runtime)

    refused = client.post(f"/overrides/{stop}/approve", json=body, headers=bearer("erin"))

    assert_problem(refused, 422, detail)
    assert client.get(f"/overrides/{stop}", headers=bearer("erin")).json()["status"] == "pending"


def test_an_unknown_status_or_limit_out_of_range_is_422(client: TestClient):
    assert_problem(client.get("/overrides?status=approved", headers=bearer("erin")), 422, "query.status")
    assert_problem(client.get("/overrides?limit=0", headers=bearer("erin")), 422,
                   "query.limit: Input should be greater than or equal to 1")


def test_no_token_or_an_unknown_one_is_401(client: TestClient):
    assert_problem(client.get("/overrides"), 401, "send an approver token: Authorization: Bearer <token>")
    assert_problem(client.get("/overrides", headers=bearer("nobody")), 401, "unknown approver token")
