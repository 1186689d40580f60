"""Approve with changes through the real proxy: a reviewer edits a value of a held call, and what reaches
the upstream, once, is the changed call; the agent's answer says it was changed.

A REST refund of 100 (over a limit of 50) approved with amount=50: the logging upstream receives one
refund of exactly 50, with a Content-Length that is its body's, and the agent sees `Cedargate-Changed`
(the reviewer approves with `cedargate overrides approve --change amount=50`).
An MCP tool call (the SDK's agent and server, as in test_mcp_flow) approved with a changed argument:
the server runs the tool once with it, and the result the agent's model reads carries
`_meta["cedargate/changes"]`, over JSON and event-stream answers alike.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from e2e_support import APPROVERS, CEDARGATE, start_cedargate, write_config
from test_mcp_flow import PEER_PYTHON, _pending, _start_gate, mcp_server, run_agent  # noqa: F401 (a fixture)

from tests.support.manifests import use_manifest

MANIFEST = {"hosts": [{"host": "localhost", "routes": [
    {"route": "POST /v1/refunds/{order_id}", "action": "process_refund", "severity": "high", "reversible": False,
     "fields": {"order_id": {"from": "path"}, "amount": {"from": "body", "type": "Decimal"},
                "currency": {"from": "body", "required": False}}},
]}]}
POLICIES = """
@id("ops-refunds")
permit (principal in Team::"ops", action == Action::"process_refund", resource);

@id("refunds-over-50")
@reason("Refunds over 50 need an engineering manager.")
@escalate("engineering-manager")
forbid (principal, action == Action::"process_refund", resource)
when { context.amount.greaterThan(decimal("50.0")) };
"""


def api(gate, method: str, path: str, approver: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{gate.api_url}{path}", headers={"Authorization": f"Bearer {APPROVERS[approver][0]}"},
                         timeout=10, **kwargs)


def pending(gate, approver: str) -> dict:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = api(gate, "GET", "/overrides?status=pending", approver).json()
        items = found["items"] if isinstance(found, dict) else found
        if items:
            return items[0]
        time.sleep(0.05)
    raise AssertionError("no override request appeared")


@pytest.fixture
def refunds_gate(tmp_path, policy_dir, upstream):
    use_manifest(policy_dir, MANIFEST, POLICIES, into="payments.cedar", replaces="github.cedar")
    gate = start_cedargate(write_config(tmp_path / "c.yaml", policy_dir, tmp_path / "state", upstream,
                                        hold_max_wait=30))
    upstream.reset()
    yield gate
    gate.stop()


def test_a_refund_approved_with_a_smaller_amount_reaches_the_upstream_changed_once(refunds_gate, upstream):
    url = f"http://localhost:{upstream.http_port}/v1/refunds/o-7"
    with ThreadPoolExecutor(1) as pool, httpx.Client(
            proxy=refunds_gate.proxy_url, verify=ssl.create_default_context(cafile=refunds_gate.ca_cert),
            timeout=60) as http:
        held = pool.submit(http.post, url, json={"amount": 100, "currency": "EUR", "note": "damaged in transit"})
        request = pending(refunds_gate, "erin")
        shown = api(refunds_gate, "GET", f"/overrides/{request['id']}", "erin").json()
        assert {f["name"]: (f["type"], f["value"]) for f in shown["editable_fields"]} == {
            "amount": ("Decimal", 100), "currency": ("String", "EUR")}
        refused = api(refunds_gate, "POST", f"/overrides/{request['id']}/approve", "erin",
                      json={"reason": "half now", "changes": {"amount": "50"}})
        assert refused.status_code == 422
        assert upstream.calls == []  # still held
        # From a terminal, as a reviewer would: the value is typed as the request's field is (Decimal).
        approved = subprocess.run(
            [str(CEDARGATE), "overrides", "--api", refunds_gate.api_url, "approve", request["id"],
             "--reason", "half now, half once the parcel is back", "--change", "amount=50"],
            capture_output=True, text=True, timeout=30, env={**os.environ,
                                                             "CEDARGATE_APPROVER_TOKEN": APPROVERS["erin"][0]})
        assert approved.returncode == 0, approved.stderr
        assert approved.stdout.strip() == f'{request["id"]}: granted (changed: {{"amount": 50}})'
        response = held.result(timeout=30)
        retry = http.post(url, json={"amount": 100, "currency": "EUR", "note": "damaged in transit"},
                          headers={"Prefer": "respond-async"})
    assert response.status_code == 200, response.text
    assert response.headers["Cedargate-Changed"] == "amount"
    [seen] = upstream.calls
    assert (seen.method, seen.path) == ("POST", "/v1/refunds/o-7")
    assert json.loads(seen.body) == {"amount": 50, "currency": "EUR", "note": "damaged in transit"}
    assert {k.lower(): v for k, v in seen.headers.items()}["content-length"] == str(len(seen.body))
    # The grant went with the changed call: the agent's identical retry is a new request for a human.
    assert retry.status_code == 403 and retry.json()["type"] == "urn:cedargate:problem:override-pending"
    assert "Cedargate-Changed" not in retry.headers
    decided = api(refunds_gate, "GET", f"/overrides/{request['id']}", "erin").json()
    assert decided["status"] == "released" and decided["changes"] == {"amount": 50}


@pytest.mark.skipif(not PEER_PYTHON.exists(), reason="the MCP peers' venv is built by `make test`")
def test_a_tool_call_approved_with_a_changed_argument_runs_once_changed(tmp_path, policy_dir, upstream,
                                                                        mcp_server):  # noqa: F811
    gate = _start_gate(tmp_path, policy_dir, upstream)
    refund = {"op": "call_tool", "name": "refund", "arguments": {"order_id": "B7", "amount": 900}}
    outcome: list = []
    agent = threading.Thread(target=lambda: outcome.append(run_agent(gate, mcp_server.url, [refund])))
    agent.start()
    try:
        request = _pending(gate)
        shown = api(gate, "GET", f"/overrides/{request['id']}", "sam").json()
        assert {"name": "amount", "type": "Decimal", "value": 900} in shown["editable_fields"]
        assert mcp_server.calls() == []
        approved = api(gate, "POST", f"/overrides/{request['id']}/approve", "sam",
                       json={"reason": "the rest goes as a voucher", "changes": {"amount": 400}})
        assert approved.status_code == 200, approved.text
    finally:
        agent.join(60)
        gate.stop()
    [[result]] = outcome
    assert result["is_error"] is False and result["text"] == "refunded 400.0 EUR on B7"
    assert result["meta"]["cedargate/changes"] == {"amount": 400}
    assert mcp_server.calls() == ['refund {"order_id": "B7", "amount": 400.0, "currency": "EUR"}']
