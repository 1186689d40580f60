"""Escalation without a permit, through the real proxy: an override lifts a forbid, never a missing permit.

An agent that trips an `@escalate` forbid on purpose (`X-Agent-Confidence: 0.1` matches
`low-confidence-writes`) on a call no permit allows gets a hard deny, and no reviewer is asked; a grant
whose permit has since been removed is refused at release, on the held call and on the agent's retry.
The upstream is a raw logging server: it records any byte that reaches it.
"""

from __future__ import annotations

import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from e2e_support import APPROVERS, start_cedargate, write_config

PROBLEM = "urn:cedargate:problem:"
LOW_CONFIDENCE = {"X-Agent-Confidence": "0.1"}
OPS_STOP_PERMIT = '''@id("ops-stop-instance")
permit (principal in Team::"ops", action == Action::"post", resource)
when { context.path like "/v1/instances/*/stop" };
'''


@pytest.fixture
def cedargate(tmp_path, policy_dir, upstream, raw_upstream, database_url):
    """A proxy in front of the raw upstream; the grant workflow runs on SQLite and on PostgreSQL."""
    # Held calls give up quickly, so a test of the old behaviour fails in seconds rather than hanging.
    config = write_config(tmp_path / "c.yaml", policy_dir, tmp_path / "state", upstream,
                          database_url=database_url, hold_max_wait=5)
    gate = start_cedargate(config)
    raw_upstream.reset()
    yield gate
    gate.stop()


def agent(gate, **kwargs) -> httpx.Client:
    return httpx.Client(proxy=gate.proxy_url, verify=ssl.create_default_context(cafile=gate.ca_cert),
                        timeout=60, **kwargs)


def api(gate, method: str, path: str, approver: str = "erin", **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {APPROVERS[approver][0]}"}
    return httpx.request(method, f"{gate.api_url}{path}", headers=headers, timeout=10, **kwargs)


def problem_of(response: httpx.Response) -> dict:
    assert response.headers["content-type"] == "application/problem+json"
    return response.json()


def remove_the_stop_permit(gate) -> None:
    """The operator deletes ops-stop-instance; wait until the proxy runs the edited set."""
    revision = httpx.get(f"{gate.api_url}/status").json()["policies"]["revision"]
    ops = gate.policy_dir / "ops.cedar"
    text = ops.read_text()
    assert OPS_STOP_PERMIT in text
    ops.write_text(text.replace(OPS_STOP_PERMIT, ""))
    deadline = time.monotonic() + 10
    while httpx.get(f"{gate.api_url}/status").json()["policies"]["revision"] == revision:
        assert time.monotonic() < deadline, "the edited policies were not loaded"
        time.sleep(0.05)


def test_low_confidence_on_a_call_no_permit_allows_is_a_hard_deny(cedargate, raw_upstream):
    url = f"http://127.0.0.1:{raw_upstream.http_port}/v1/instances/i-1"
    with agent(cedargate) as http:
        # No permit allows a PUT of an instance; the agent trips low-confidence-writes on purpose.
        response = http.put(url, json={"size": "xl"}, headers=LOW_CONFIDENCE)

    assert response.status_code == 403
    problem = problem_of(response)
    assert problem["type"] == PROBLEM + "no-permit"
    assert problem["detail"].startswith(f"no policy permits ops-bot to PUT {url} (default deny).")
    assert [p["id"] for p in problem["policies"]] == ["low-confidence-writes"]
    assert "override_id" not in problem and "retry-after" not in response.headers
    # No reviewer is asked about it (erin holds the role low-confidence-writes names), in any status.
    assert api(cedargate, "GET", "/overrides").json() == []
    assert raw_upstream.calls == []


def test_low_confidence_on_a_permitted_write_still_asks_a_human(cedargate, raw_upstream):
    url = f"http://localhost:{raw_upstream.http_port}/v1/instances/i-1/stop"  # a dev host: stops are permitted
    with agent(cedargate, headers={"Prefer": "respond-async"}) as http:
        response = http.post(url, headers=LOW_CONFIDENCE)

    problem = problem_of(response)
    assert response.status_code == 403 and problem["type"] == PROBLEM + "override-pending"
    assert problem["required_roles"] == ["engineering-manager"]
    [request] = api(cedargate, "GET", "/overrides?status=pending").json()
    assert request["id"] == problem["override_id"]
    assert raw_upstream.calls == []


def test_a_granted_retry_whose_permit_was_removed_is_refused_at_release(cedargate, raw_upstream):
    url = f"http://127.0.0.1:{raw_upstream.http_port}/v1/instances/i-0abc/stop"  # production-critical
    with agent(cedargate, headers={"Prefer": "respond-async"}) as http:
        first = http.post(url, json={"grace": 30})
        override_id = problem_of(first)["override_id"]
        assert problem_of(first)["type"] == PROBLEM + "override-pending"
        granted = api(cedargate, "POST", f"/overrides/{override_id}/approve", json={"reason": "on-call agreed"})
        assert granted.json()["status"] == "granted"

        remove_the_stop_permit(cedargate)
        retry = http.post(url, json={"grace": 30})

    assert retry.status_code == 403
    problem = problem_of(retry)
    assert problem["type"] == PROBLEM + "override-release-refused"
    assert problem["override_id"] == override_id and problem["override_status"] == "release_refused"
    assert problem["detail"].startswith("the override was granted, but the current policies refuse the call: "
                                        f"no policy permits ops-bot to POST {url}")
    assert api(cedargate, "GET", f"/overrides/{override_id}").json()["status"] == "release_refused"
    assert raw_upstream.calls == []


def test_a_held_call_whose_permit_is_removed_before_the_grant_is_refused(cedargate, raw_upstream):
    url = f"http://127.0.0.1:{raw_upstream.http_port}/v1/instances/i-0abc/stop"
    with ThreadPoolExecutor(1) as pool, agent(cedargate, headers={"Prefer": "wait=30"}) as http:
        held = pool.submit(http.post, url)
        deadline = time.monotonic() + 15
        while not (pending := api(cedargate, "GET", "/overrides?status=pending").json()):
            assert time.monotonic() < deadline, "no override request was opened"
            time.sleep(0.05)
        remove_the_stop_permit(cedargate)
        assert api(cedargate, "POST", f"/overrides/{pending[0]['id']}/approve",
                   json={"reason": "ok"}).json()["status"] == "granted"
        response = held.result(timeout=30)

    assert response.status_code == 403
    assert problem_of(response)["type"] == PROBLEM + "override-release-refused"
    assert raw_upstream.calls == []


def test_the_upstream_log_sees_what_is_let_through(cedargate, raw_upstream):
    """The check that the assertions above could fail: an allowed call does reach the raw upstream."""
    with agent(cedargate) as http:
        response = http.get(f"http://127.0.0.1:{raw_upstream.http_port}/v1/instances")
    assert response.status_code == 200
    assert [(c.method, c.target) for c in raw_upstream.calls] == [("GET", "/v1/instances")]
