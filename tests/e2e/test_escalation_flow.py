"""Graceful escalation end to end: held calls, human grants through the API, exactly-once release."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import sqlalchemy
from e2e_support import APPROVERS, CEDARGATE, REPO, TOKEN, start_cedargate, write_config

STOP = "/v1/instances/i-0abc/stop"


@pytest.fixture
def cedargate(tmp_path, policy_dir, upstream, database_url):
    """The override lifecycle runs against both stores: SQLite (default) and PostgreSQL."""
    config = write_config(tmp_path / "c.yaml", policy_dir, tmp_path / "state", upstream, database_url=database_url)
    gate = start_cedargate(config)
    upstream.reset()
    yield gate
    gate.stop()


def agent(gate, **kwargs) -> httpx.Client:
    return httpx.Client(proxy=gate.proxy_url, verify=ssl.create_default_context(cafile=gate.ca_cert),
                        timeout=60, **kwargs)


def api(gate, method: str, path: str, approver: str | None = "erin", token: str | None = None, **kwargs):
    headers = {"Authorization": f"Bearer {token or APPROVERS[approver][0]}"} if (approver or token) else {}
    return httpx.request(method, f"{gate.api_url}{path}", headers=headers, timeout=10, **kwargs)


def pending(gate, count: int = 1, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = api(gate, "GET", "/overrides?status=pending").json()
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"expected {count} pending override requests")


def approve(gate, override_id: str, approver: str = "erin", reason: str = "checked with on-call"):
    return api(gate, "POST", f"/overrides/{override_id}/approve", approver, json={"reason": reason})


def deny(gate, override_id: str, approver: str = "erin", reason: str = "not during business hours"):
    return api(gate, "POST", f"/overrides/{override_id}/deny", approver, json={"reason": reason})


def stop_url(upstream) -> str:
    return f"http://127.0.0.1:{upstream.http_port}{STOP}"


def test_held_call_is_released_once_when_granted(cedargate, upstream):
    with ThreadPoolExecutor(1) as pool, agent(cedargate) as http:
        held = pool.submit(http.post, stop_url(upstream), json={"grace": 30},
                           headers={"X-Agent-Justification": "instance is wedged, paging did not help"})
        [request] = pending(cedargate)
        assert upstream.calls == []  # held, not forwarded

        shown = api(cedargate, "GET", f"/overrides/{request['id']}").json()
        assert shown["agent"] == "ops-bot" and shown["method"] == "POST" and shown["url"] == stop_url(upstream)
        assert shown["justification"] == "instance is wedged, paging did not help"
        assert shown["body"] == '{"grace":30}'
        assert "proxy-authorization" not in {k.lower() for k in shown["headers"]}
        assert shown["requirements"] == [{"policy_id": "protect-production-instances",
                                          "roles": ["engineering-manager"], "approvals": 1}]
        assert shown["reasons"] == ["Stopping an instance on a production-critical host needs a human decision."]

        granted = approve(cedargate, request["id"])
        assert granted.status_code == 200 and granted.json()["status"] == "granted"
        response = held.result(timeout=30)
    assert response.status_code == 200
    assert [(c.method, c.path, c.body) for c in upstream.calls] == [("POST", STOP, b'{"grace":30}')]
    assert api(cedargate, "GET", f"/overrides/{request['id']}").json()["status"] == "released"


def test_held_call_denied_gets_the_reviewers_reason(cedargate, upstream):
    with ThreadPoolExecutor(1) as pool, agent(cedargate) as http:
        held = pool.submit(http.post, stop_url(upstream))
        [request] = pending(cedargate)
        assert deny(cedargate, request["id"]).json()["status"] == "denied"
        response = held.result(timeout=30)
    assert response.status_code == 403
    problem = response.json()
    assert problem["type"] == "urn:cedargate:problem:override-denied"
    assert "not during business hours" in problem["detail"]
    assert problem["override_id"] == request["id"]
    assert upstream.calls == []
    assert approve(cedargate, request["id"]).status_code == 409  # one denial is final


def test_hold_timeout_then_retry_after_grant_goes_through_exactly_once(cedargate, upstream):
    with agent(cedargate, headers={"Prefer": "wait=1"}) as http:
        first = http.post(stop_url(upstream))
        assert first.status_code == 403
        problem = first.json()
        assert problem["type"] == "urn:cedargate:problem:override-pending"
        assert first.headers["retry-after"] == "10"
        assert problem["override_url"] == f"{cedargate.api_url}/overrides/{problem['override_id']}"
        assert problem["required_roles"] == ["engineering-manager"]

        assert approve(cedargate, problem["override_id"]).json()["status"] == "granted"
        retry = http.post(stop_url(upstream))
        again = http.post(stop_url(upstream))
    assert retry.status_code == 200
    # The grant admitted one call; the same call again is a new decision and a new request.
    assert again.status_code == 403 and again.json()["override_id"] != problem["override_id"]
    assert len(upstream.calls) == 1


@pytest.mark.parametrize("prefer", ["respond-async", "wait=0"])
def test_prefer_asks_for_no_hold(cedargate, upstream, prefer):
    with agent(cedargate) as http:
        response = http.post(stop_url(upstream), headers={"Prefer": prefer})
    assert response.status_code == 403
    assert response.json()["type"] == "urn:cedargate:problem:override-pending"


def test_identical_calls_share_one_request_and_a_changed_call_does_not(cedargate, upstream):
    with agent(cedargate, headers={"Prefer": "respond-async"}) as http:
        a = http.post(stop_url(upstream), json={"grace": 30}).json()["override_id"]
        b = http.post(stop_url(upstream), json={"grace": 30}).json()["override_id"]
        other_body = http.post(stop_url(upstream), json={"grace": 0}).json()["override_id"]
        other_path = http.post(stop_url(upstream).replace("i-0abc", "i-0def"), json={"grace": 30}).json()["override_id"]
    assert a == b
    assert len({a, other_body, other_path}) == 3


def test_a_grant_never_admits_a_different_call(cedargate, upstream):
    with agent(cedargate, headers={"Prefer": "respond-async"}) as http:
        granted_id = http.post(stop_url(upstream), json={"grace": 30}).json()["override_id"]
        assert approve(cedargate, granted_id).json()["status"] == "granted"
        changed = http.post(stop_url(upstream), json={"grace": 0})
    assert changed.status_code == 403
    assert changed.json()["override_id"] != granted_id
    assert upstream.calls == []
    assert api(cedargate, "GET", f"/overrides/{granted_id}").json()["status"] == "granted"


def test_two_person_rule_needs_security_and_a_lead_engineer(cedargate, upstream):
    url = f"http://localhost:{upstream.http_port}/v1/volumes/vol-7"
    with agent(cedargate, headers={"Prefer": "respond-async"}) as http:
        override_id = http.delete(url).json()["override_id"]
        assert api(cedargate, "POST", f"/overrides/{override_id}/approve", "erin",
                   json={"reason": "wrong role"}).status_code == 403
        # One person holding both roles is still one person.
        assert approve(cedargate, override_id, "sec-lead").json()["status"] == "pending"
        assert approve(cedargate, override_id, "sam").json()["status"] == "granted"
        # Read by one of its reviewers: erin's roles cannot decide it, so she does not see it.
        shown = api(cedargate, "GET", f"/overrides/{override_id}", "sam").json()
        assert sorted(v["approver"] for v in shown["votes"]) == ["sam", "sec-lead"]
        assert http.delete(url).status_code == 200
    assert [c.method for c in upstream.calls] == ["DELETE"]


def test_same_approver_twice_counts_once(cedargate, upstream):
    url = f"http://localhost:{upstream.http_port}/v1/volumes/vol-8"
    with agent(cedargate, headers={"Prefer": "respond-async"}) as http:
        override_id = http.delete(url).json()["override_id"]
    assert approve(cedargate, override_id, "sam").json()["status"] == "pending"
    assert approve(cedargate, override_id, "sam").json()["status"] == "pending"
    assert approve(cedargate, override_id, "lee").json()["status"] == "granted"


def test_concurrent_approve_and_deny_end_in_exactly_one_state(cedargate, upstream):
    for attempt in range(5):
        with agent(cedargate, headers={"Prefer": "respond-async"}) as http:
            override_id = http.post(stop_url(upstream).replace("i-0abc", f"i-race{attempt}")).json()["override_id"]
        with ThreadPoolExecutor(2) as pool:
            approving = pool.submit(approve, cedargate, override_id, "erin")
            denying = pool.submit(deny, cedargate, override_id, "max")
            answers = {"approve": approving.result(), "deny": denying.result()}
        final = api(cedargate, "GET", f"/overrides/{override_id}").json()
        winner = "approve" if final["status"] == "granted" else "deny"
        assert final["status"] in ("granted", "denied")
        assert answers[winner].status_code == 200 and answers[winner].json()["status"] == final["status"]
        loser = answers["deny" if winner == "approve" else "approve"]
        assert loser.status_code == 409
        assert [v["approver"] for v in final["votes"]] == ["erin" if winner == "approve" else "max"]


def test_self_approval_and_agent_credentials_are_refused(cedargate, upstream):
    with agent(cedargate, headers={"Prefer": "respond-async"}) as http:
        override_id = http.post(stop_url(upstream)).json()["override_id"]
    own = approve(cedargate, override_id, "ops-bot")
    assert own.status_code == 403 and "own identity" in own.json()["detail"]
    as_agent = api(cedargate, "POST", f"/overrides/{override_id}/approve", approver=None, token=TOKEN,
                   json={"reason": "let me through"})
    assert as_agent.status_code == 403 and "agent credentials" in as_agent.json()["detail"]
    assert as_agent.headers["content-type"] == "application/problem+json"
    assert api(cedargate, "GET", "/overrides", approver=None).status_code == 401
    assert api(cedargate, "GET", f"/overrides/{override_id}").json()["status"] == "pending"


def test_agents_cannot_reach_the_override_api_through_the_proxy(cedargate, upstream):
    with agent(cedargate) as http:
        response = http.get(f"http://127.0.0.1:{cedargate.api_port}/overrides",
                            headers={"Authorization": f"Bearer {APPROVERS['erin'][0]}"})
        via_localhost = http.post(f"http://localhost:{cedargate.api_port}/overrides/x/approve")
    assert response.status_code == 403 and response.json()["type"] == "urn:cedargate:problem:proxy-api"
    assert via_localhost.status_code == 403 and via_localhost.json()["type"] == "urn:cedargate:problem:proxy-api"


def test_pending_request_expires_and_never_lets_the_call_through(cedargate, upstream):
    ops = cedargate.policy_dir / "ops.cedar"
    ops.write_text(ops.read_text().replace('@expires("30m")', '@expires("2s")'))
    time.sleep(1.0)  # let the watcher see the edit settle (two polls)
    with agent(cedargate) as http:
        response = http.post(stop_url(upstream), headers={"Prefer": "wait=20"})
    assert response.status_code == 403
    problem = response.json()
    assert problem["type"] == "urn:cedargate:problem:override-expired"
    assert api(cedargate, "GET", f"/overrides/{problem['override_id']}").json()["status"] == "expired"
    assert approve(cedargate, problem["override_id"]).status_code == 409
    assert upstream.calls == []


def test_release_is_rechecked_against_current_policy(cedargate, upstream):
    ops = cedargate.policy_dir / "ops.cedar"
    with ThreadPoolExecutor(1) as pool, agent(cedargate) as http:
        held = pool.submit(http.post, stop_url(upstream))
        [request] = pending(cedargate)
        revision = httpx.get(f"{cedargate.api_url}/status").json()["policies"]["revision"]
        # The operator makes the production stop a hard deny while the call is held.
        ops.write_text(ops.read_text().replace('@escalate("engineering-manager")\n', ""))
        deadline = time.monotonic() + 10
        while httpx.get(f"{cedargate.api_url}/status").json()["policies"]["revision"] == revision:
            assert time.monotonic() < deadline, "the edited policies were not loaded"
            time.sleep(0.05)
        assert approve(cedargate, request["id"]).json()["status"] == "granted"
        response = held.result(timeout=30)
    assert response.status_code == 403
    assert response.json()["type"] == "urn:cedargate:problem:override-release-refused"
    assert upstream.calls == []
    assert api(cedargate, "GET", f"/overrides/{request['id']}").json()["status"] == "release_refused"


def test_cli_reviews_through_the_api(cedargate, upstream):
    with agent(cedargate, headers={"Prefer": "respond-async"}) as http:
        override_id = http.post(stop_url(upstream)).json()["override_id"]
    env = {**os.environ, "CEDARGATE_APPROVER_TOKEN": APPROVERS["erin"][0], "CEDARGATE_API": cedargate.api_url}

    def cli(*args):
        return subprocess.run([str(CEDARGATE), "overrides", *args], capture_output=True, text=True, env=env,
                              timeout=30, cwd=REPO)

    listed = cli("list", "--status", "pending")
    assert listed.returncode == 0 and override_id in listed.stdout and "pending" in listed.stdout
    assert '"justification"' in cli("show", override_id).stdout
    approved = cli("approve", override_id, "--reason", "ok from the terminal")
    assert approved.returncode == 0 and f"{override_id}: granted" in approved.stdout
    again = cli("deny", override_id, "--reason", "too late")
    assert again.returncode == 1 and "409" in again.stderr


def test_held_calls_survive_kill_9_and_each_goes_upstream_exactly_once(tmp_path, policy_dir, upstream,
                                                                       database_url):
    config = write_config(tmp_path / "c.yaml", policy_dir, tmp_path / "state", upstream, database_url=database_url)
    gate = start_cedargate(config)
    upstream.reset()
    urls = [stop_url(upstream).replace("i-0abc", f"i-{n}") for n in range(4)]
    with ThreadPoolExecutor(len(urls)) as pool, agent(gate) as http:
        held = [pool.submit(http.post, url) for url in urls]
        pending(gate, len(urls))
        gate.process.send_signal(signal.SIGKILL)
        gate.process.wait(10)
        outcomes = [f.exception(timeout=30) or f.result() for f in held]
    assert all(not isinstance(o, httpx.Response) or o.status_code != 200 for o in outcomes)
    assert upstream.calls == []

    restarted = start_cedargate(config)
    try:
        requests = pending(restarted, len(urls))
        assert len(requests) == len(urls)
        for request in requests:
            assert approve(restarted, request["id"]).json()["status"] == "granted"
        with agent(restarted) as http:
            retries = [http.post(url) for url in urls]
            repeats = [http.post(url, headers={"Prefer": "respond-async"}) for url in urls]
        assert [r.status_code for r in retries] == [200] * len(urls)
        assert [r.status_code for r in repeats] == [403] * len(urls)
        assert sorted(c.path for c in upstream.calls) == sorted(STOP.replace("i-0abc", f"i-{n}") for n in range(4))
    finally:
        restarted.stop()


def test_the_record_links_the_whole_story_and_audit_verify_catches_tampering(cedargate, upstream, database_url):
    with ThreadPoolExecutor(1) as pool, agent(cedargate) as http:
        held = pool.submit(http.post, stop_url(upstream))
        [request] = pending(cedargate)
        approve(cedargate, request["id"])
        assert held.result(timeout=30).status_code == 200
        http.get(f"http://localhost:{upstream.http_port}/v1/instances")
    url = database_url or f"sqlite:///{cedargate.database}"
    store = sqlalchemy.create_engine(url)

    def verify():
        return subprocess.run([str(CEDARGATE), "audit", "verify", "--database-url", url],
                              capture_output=True, text=True, timeout=30)

    deadline = time.monotonic() + 10
    while True:
        with store.connect() as db:
            story = db.execute(sqlalchemy.text("SELECT seq, kind, actor FROM audit_log WHERE override_id = :id "
                                               "ORDER BY seq"), {"id": request["id"]}).fetchall()
        if [k for _, k, _ in story][-1:] == ["release"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [(kind, actor) for _, kind, actor in story] == [
        ("override_created", None), ("approval", "erin"), ("grant", "erin"), ("release", None)]
    assert verify().returncode == 0

    edited = story[1][0]
    with store.begin() as db:
        db.execute(sqlalchemy.text("UPDATE audit_log SET actor = 'mallory' WHERE seq = :seq"), {"seq": edited})
    store.dispose()
    result = verify()
    assert result.returncode == 1
    assert f"TAMPERED at row seq {edited}" in result.stdout
