"""Request more information and the agent's side of a review, through the real proxy, a logging upstream
and httpx as the agent.

A held production stop: the reviewer asks a question (`cedargate overrides request-info`), the held call
is answered `override-needs-info` with it, the agent's retry with a new X-Agent-Justification is held
again, the reviewer reads the answer (`cedargate overrides show`) and approves, and the upstream receives
the call once. An agent that does not wait (`Prefer: respond-async`) learns on its retry that its request
was denied, and why. A retry that changes only `Prefer` joins the request it already has.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from e2e_support import APPROVERS, CEDARGATE, start_cedargate, write_config

STOP = "/v1/instances/i-0abc/stop"
QUESTION = "Which customers are on i-0abc right now?"
ANSWER = "None: it was drained at 09:00, ticket OPS-12."


@pytest.fixture
def gate(tmp_path, policy_dir, upstream):
    started = start_cedargate(write_config(tmp_path / "c.yaml", policy_dir, tmp_path / "state", upstream,
                                           hold_max_wait=30))
    upstream.reset()
    yield started
    started.stop()


def agent(gate) -> httpx.Client:
    return httpx.Client(proxy=gate.proxy_url, verify=ssl.create_default_context(cafile=gate.ca_cert), timeout=60)


def api(gate, method: str, path: str, approver: str = "erin", **kwargs) -> httpx.Response:
    return httpx.request(method, f"{gate.api_url}{path}", headers={"Authorization": f"Bearer {APPROVERS[approver][0]}"},
                         timeout=10, **kwargs)


def listed(gate, status: str) -> list[dict]:
    found = api(gate, "GET", f"/overrides?status={status}").json()
    return found["items"] if isinstance(found, dict) else found


def one(gate, status: str) -> dict:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        items = listed(gate, status)
        if items:
            return items[0]
        time.sleep(0.05)
    raise AssertionError(f"no {status} override request appeared")


def cli(gate, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CEDARGATE), "overrides", "--api", gate.api_url, *args], capture_output=True,
                          text=True, timeout=30, env={**os.environ, "CEDARGATE_APPROVER_TOKEN": APPROVERS["erin"][0]})


def logged(gate, text: str) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(text in line for line in list(gate.output)):
            return True
        time.sleep(0.05)
    return False


def test_a_question_reaches_the_held_agent_and_its_answer_the_reviewer(gate, upstream):
    url = f"http://127.0.0.1:{upstream.http_port}{STOP}"
    with ThreadPoolExecutor(1) as pool, agent(gate) as http:
        held = pool.submit(http.post, url, json={"grace": 30},
                           headers={"X-Agent-Justification": "instance is wedged"})
        request = one(gate, "pending")
        assert logged(gate, f"under override {request['id']}")  # said while the call is still held
        assert not held.done()

        asked = cli(gate, "request-info", request["id"], "--question", QUESTION)
        assert asked.returncode == 0, asked.stderr
        answer = held.result(timeout=30)
        assert answer.status_code == 403
        problem = answer.json()
        assert problem["type"] == "urn:cedargate:problem:override-needs-info"
        assert (problem["question"], problem["override_id"]) == (QUESTION, request["id"])

        # The agent answers by retrying the identical call with a new justification: held again.
        retry = pool.submit(http.post, url, json={"grace": 30}, headers={"X-Agent-Justification": ANSWER})
        assert one(gate, "pending")["id"] == request["id"]
        shown = cli(gate, "show", request["id"])
        assert shown.returncode == 0, shown.stderr
        assert f"erin asks: {QUESTION}" in shown.stdout and f"ops-bot answers: {ANSWER}" in shown.stdout
        assert upstream.calls == []

        approved = api(gate, "POST", f"/overrides/{request['id']}/approve", json={"reason": "drained, fine"})
        assert approved.status_code == 200
        assert [m["kind"] for m in approved.json()["conversation"]] == ["question", "answer"]
        released = retry.result(timeout=30)
    assert released.status_code == 200, released.text
    assert [(c.method, c.path, c.body) for c in upstream.calls] == [("POST", STOP, b'{"grace":30}')]


def test_an_agent_that_did_not_wait_learns_the_denial_and_why_on_its_retry(gate, upstream):
    url = f"http://127.0.0.1:{upstream.http_port}{STOP}"
    asynchronous = {"Prefer": "respond-async"}
    with agent(gate) as http:
        first = http.post(url, json={"grace": 30}, headers=asynchronous)
        assert first.status_code == 403 and first.json()["type"] == "urn:cedargate:problem:override-pending"
        override_id = first.json()["override_id"]
        denied = api(gate, "POST", f"/overrides/{override_id}/deny", json={"reason": "customer traffic peak"})
        assert denied.status_code == 200

        told = http.post(url, json={"grace": 30}, headers=asynchronous)
        assert told.status_code == 403
        problem = told.json()
        assert problem["type"] == "urn:cedargate:problem:override-denied"
        assert (problem["override_id"], problem["reason"]) == (override_id, "customer traffic peak")
        assert "customer traffic peak" in problem["detail"]

        # Told once: the next retry asks the reviewers again.
        again = http.post(url, json={"grace": 30}, headers=asynchronous)
        assert again.json()["type"] == "urn:cedargate:problem:override-pending"
        assert again.json()["override_id"] != override_id
    assert upstream.calls == []


def test_a_retry_that_changes_only_prefer_joins_the_same_request(gate, upstream):
    url = f"http://127.0.0.1:{upstream.http_port}{STOP}"
    with agent(gate) as http:
        first = http.post(url, json={"grace": 30}, headers={"Prefer": "respond-async"})
        retry = http.post(url, json={"grace": 30}, headers={"Prefer": "wait=1"})
    assert first.json()["type"] == retry.json()["type"] == "urn:cedargate:problem:override-pending"
    assert retry.json()["override_id"] == first.json()["override_id"]
    assert [item["id"] for item in listed(gate, "pending")] == [first.json()["override_id"]]
    assert upstream.calls == []
