"""What a reviewer reads to decide in seconds, through the API on a real core: each listed request's
summary (tool, key arguments, severity, time left, votes, roles still needed), the list's filters and
order (the inbox and the history), a request's context and its audit rows, and who may see them."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from proxy.calls.mapping import Call
from proxy.runtime import Runtime
from proxy.settings.config import ApproverCredential
from tests.support.approvers import bearer, credentials

ROLES = {"fay": ("finance",), "gus": ("finance",), "erin": ("engineering-manager",), "audra": ("auditor",)}
PAYMENTS = "api.payments.example"


@pytest.fixture
def approvers() -> dict[str, ApproverCredential]:
    return credentials(ROLES)


def refund_call(order: str, amount: str, *, method: str = "POST", session: str = "s-42",
                justification: str | None = None) -> Call:
    headers = {"Content-Type": "application/json", "X-Agent-Session": session, "X-Agent-Confidence": "0.9"}
    if justification is not None:
        headers["X-Agent-Justification"] = justification
    body = json.dumps({"amount": float(amount), "currency": "EUR"}).encode() if method == "POST" else b""
    return Call(agent="billing-bot", method=method, scheme="https", host=PAYMENTS, port=443,
                path=f"/v1/refunds/{order}", headers=headers, body=body)


def refund(runtime: Runtime, order: str, amount: str, justification: str = "customer was charged twice",
           **kwargs) -> str:
    """A large refund as the proxy handles it: decided by the real gate, recorded, its request opened."""
    verdict = runtime.gate.decide(refund_call(order, amount, justification=justification, **kwargs))
    runtime.gate.record(verdict).result(10)
    resolution = asyncio.run(runtime.oversight.resolve(verdict, 0, justification, client_alive=lambda: True))
    assert resolution.override_id is not None
    return resolution.override_id


def lookup(runtime: Runtime, order: str, session: str = "s-42") -> None:
    verdict = runtime.gate.decide(refund_call(order, "0", method="GET", session=session))
    assert verdict.allowed
    runtime.gate.finish(verdict, 200)


def test_each_listed_request_says_at_a_glance_what_it_is_and_who_is_still_needed(client: TestClient,
                                                                                  runtime: Runtime):
    opened = refund(runtime, "A-17", "900.00")

    [item] = client.get("/overrides", headers=bearer("gus")).json()

    assert item["id"] == opened and item["tool"] is None
    assert item["key_arguments"] == {"order_id": "A-17", "amount": "900.0", "currency": "EUR"}
    # @severity("high") @reversible("false") on large-refunds, as the bundled policies say.
    assert (item["severity"], item["reversible"]) == ("high", False)
    assert 0 < item["seconds_left"] <= 3600
    assert (item["votes"], item["roles_needed"], item["approvals_needed"]) == ([], ["finance"], 1)

    client.post(f"/overrides/{opened}/approve", json={"reason": "matches the ticket"}, headers=bearer("fay"))
    [item] = client.get("/overrides", headers=bearer("gus")).json()
    assert [(v["approver"], v["verdict"], v["reason"]) for v in item["votes"]] == [
        ("fay", "approve", "matches the ticket")]
    # One finance approval is what large-refunds needs: granted, nobody else needed, no deadline to meet.
    assert (item["status"], item["roles_needed"], item["seconds_left"]) == ("granted", [], None)
    shown = client.get(f"/overrides/{opened}", headers=bearer("gus")).json()
    assert {k: shown[k] for k in ("tool", "key_arguments", "severity", "reversible")} == {
        k: item[k] for k in ("tool", "key_arguments", "severity", "reversible")}


def test_undecided_first_by_deadline_then_the_history_with_who_when_and_why(client: TestClient,
                                                                            runtime: Runtime):
    first, second, third, fourth = (refund(runtime, order, "700.00") for order in ("A-1", "A-2", "A-3", "A-4"))
    client.post(f"/overrides/{second}/deny", json={"reason": "refund already paid"}, headers=bearer("fay"))
    approved = client.post(f"/overrides/{fourth}/approve", headers=bearer("gus"),
                           json={"reason": "only the second charge", "changes": {"amount": 350}})
    assert approved.status_code == 200, approved.text

    listed = client.get("/overrides", headers=bearer("gus")).json()
    assert [o["id"] for o in listed] == [first, third, fourth, second]  # the inbox, then the history
    assert [o["roles_needed"] for o in listed] == [["finance"], ["finance"], [], []]

    inbox = client.get("/overrides", params={"decided": "false"}, headers=bearer("gus")).json()
    assert [o["id"] for o in inbox] == [first, third]
    changed, denied = client.get("/overrides", params={"decided": "true"}, headers=bearer("gus")).json()
    assert (denied["id"], denied["status"], denied["decided_reason"]) == (second, "denied", "refund already paid")
    assert denied["decided_at"] is not None and denied["changes"] is None
    assert [(v["approver"], v["verdict"]) for v in denied["votes"]] == [("fay", "deny")]
    # Who, when, why, and what changed.
    assert (changed["id"], changed["status"], changed["changes"]) == (fourth, "granted", {"amount": 350})
    assert [(v["approver"], v["reason"]) for v in changed["votes"]] == [("gus", "only the second charge")]


@pytest.mark.parametrize("action", ["process_refund", 'Action::"process_refund"'])
def test_the_list_filters_by_action_either_way_it_is_written_and_by_policy_and_time(
        client: TestClient, runtime: Runtime, action: str):
    opened = refund(runtime, "A-9", "650.00")
    created_at = client.get(f"/overrides/{opened}", headers=bearer("fay")).json()["created_at"]

    def ids(**params: str) -> list[str]:
        response = client.get("/overrides", params=params, headers=bearer("fay"))
        assert response.status_code == 200, response.text
        return [o["id"] for o in response.json()]

    assert ids(action=action) == [opened]
    assert ids(action="read_refund") == []
    assert ids(policy="large-refunds") == [opened]
    assert ids(policy="protect-production-instances") == []
    assert ids(agent="billing-bot", status="pending", since=created_at) == [opened]
    assert ids(since="2999-01-01T00:00:00Z") == []
    assert client.get("/overrides", params={"since": "yesterday"}, headers=bearer("fay")).status_code == 422


def test_the_context_shows_the_session_s_calls_similar_decisions_and_the_live_revision(client: TestClient,
                                                                                       runtime: Runtime):
    earlier = refund(runtime, "B-1", "800.00", session="s-1")
    client.post(f"/overrides/{earlier}/deny", json={"reason": "duplicate of B-0"}, headers=bearer("fay"))
    lookup(runtime, "C-1")
    lookup(runtime, "C-2")
    lookup(runtime, "C-3", session="s-other")
    current = refund(runtime, "C-1", "900.00", justification="<b>urgent</b>: charged twice")
    assert runtime.recorder.flush()

    response = client.get(f"/overrides/{current}/context", headers=bearer("gus"))

    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    context = response.json()
    assert context["agent"] == {"id": "billing-bot", "justification": "<b>urgent</b>: charged twice",
                                "confidence": "0.9", "session": "s-42"}
    calls = context["recent_calls"]["calls"]
    assert [(c["method"], c["path"], c["decision"], c["this_request"]) for c in calls] == [
        ("POST", "/v1/refunds/C-1", "escalate", True),
        ("GET", "/v1/refunds/C-2", "allow", False),
        ("GET", "/v1/refunds/C-1", "allow", False),
    ]
    assert calls[1]["upstream_status"] == 200
    similar = context["similar"]
    assert (similar["policy"], similar["tool"], similar["outcomes"]) == ("large-refunds", None, {"denied": 1})
    [before] = similar["requests"]
    assert (before["id"], before["decided_reason"], before["key_arguments"]["amount"]) == (
        earlier, "duplicate of B-0", "800.0")
    policy = context["policy"]
    assert policy["is_live"] is True and policy["revision"] == runtime.engine.status.revision
    assert [p["id"] for p in policy["policies"]] == ["large-refunds"]


def test_a_request_s_audit_rows_are_its_events_and_its_call_s_decision(client: TestClient, runtime: Runtime):
    opened = refund(runtime, "D-1", "990.00")
    client.post(f"/overrides/{opened}/deny", json={"reason": "not this quarter"}, headers=bearer("fay"))
    refund(runtime, "D-2", "990.00")  # another request's rows are not this one's
    assert runtime.recorder.flush()

    rows = client.get(f"/overrides/{opened}/audit", headers=bearer("audra")).json()

    assert [(r["kind"], r["actor"]) for r in rows] == [
        ("decision", None), ("override_created", None), ("denial", "fay"), ("denied", "fay")]
    assert rows[0]["payload"]["path"] == "/v1/refunds/D-1" and rows[0]["payload"]["decision"] == "escalate"
    assert rows[2]["payload"]["reason"] == "not this quarter"
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)


def test_context_and_audit_are_shown_only_to_those_who_may_see_the_request(client: TestClient, runtime: Runtime):
    opened = refund(runtime, "E-1", "1200.00")
    for route in (f"/overrides/{opened}/context", f"/overrides/{opened}/audit"):
        assert client.get(route, headers=bearer("fay")).status_code == 200
        assert client.get(route, headers=bearer("audra")).status_code == 200
        hidden = client.get(route, headers=bearer("erin"))
        assert hidden.status_code == 404 and hidden.json()["detail"] == f"no override request {opened}"
        assert client.get(route).status_code == 401
    assert client.get("/overrides/nope/context", headers=bearer("fay")).status_code == 404


def test_the_api_docs_describe_the_summary_and_the_context(client: TestClient):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"tool", "key_arguments", "severity", "reversible", "seconds_left", "votes", "roles_needed"} <= set(
        schemas["OverrideSummary"]["properties"])
    assert set(schemas["ReviewContextPublic"]["properties"]) == {"id", "agent", "recent_calls", "similar", "policy"}
