"""Notifications through a real `cedargate run`, a logging upstream, httpx as the agent and a signing
webhook receiver on loopback.

While the receiver is down, calls are escalated, allowed and decided as ever (nothing waits for it) and
/status shows the channel failing and what it owes; once it is back, every event arrives, signed, each
once. A cedargate stopped while it owes messages and started again delivers them all, and nothing twice.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e_support import APPROVERS, Cedargate, start_cedargate, write_config

from tests.support.receiver import Receiver, webhook_receiver
from tests.support.waiting import wait_until

SECRET = "whsec-e2e-81c2"
SECRET_ENV = "CEDARGATE_E2E_HOOK_SECRET"


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    monkeypatch.setenv(SECRET_ENV, SECRET)  # the cedargate started by the test inherits it
    with webhook_receiver(SECRET.encode()) as served:
        yield served


def config(tmp_path: Path, policy_dir: Path, upstream, receiver: Receiver, database_url: str | None = None) -> Path:
    extra = {"database_url": database_url} if database_url else {}
    return write_config(tmp_path / "cedargate.yaml", policy_dir, tmp_path / "state", upstream, **extra, notifications={
        "review_url": "https://cedargate.example.test",
        "channels": {"ops-hook": {"type": "webhook", "url": receiver.url, "secret_env": SECRET_ENV}},
        "routes": [{"events": ["opened", "decided", "expired"], "channels": ["ops-hook"]}],
        "retry_initial": "1s", "retry_max": "1s",
    })


def agent(gate: Cedargate) -> httpx.Client:
    return httpx.Client(proxy=gate.proxy_url, verify=ssl.create_default_context(cafile=gate.ca_cert), timeout=30)


def escalate(gate: Cedargate, upstream, instance: str) -> str:
    """The agent's production stop, not waiting for review: its request's id."""
    with agent(gate) as http:
        answer = http.post(f"http://127.0.0.1:{upstream.http_port}/v1/instances/{instance}/stop", json={"grace": 30},
                           headers={"Prefer": "respond-async", "X-Agent-Justification": f"{instance} is wedged"})
    assert answer.status_code == 403 and answer.json()["type"] == "urn:cedargate:problem:override-pending"
    return str(answer.json()["override_id"])


def decide(gate: Cedargate, override_id: str, verdict: str, reason: str) -> None:
    answer = httpx.post(f"{gate.api_url}/overrides/{override_id}/{verdict}", json={"reason": reason},
                        headers={"Authorization": f"Bearer {APPROVERS['erin'][0]}"}, timeout=10)
    assert answer.status_code == 200, answer.text


def channel(gate: Cedargate) -> dict:
    return httpx.get(f"{gate.api_url}/status", timeout=10).json()["notifications"]["ops-hook"]


def told(receiver: Receiver) -> list[tuple[str, str]]:
    return [(d.json["event"], d.json["notice"]["override_id"]) for d in receiver.received()]


def test_a_receiver_down_blocks_nothing_and_gets_every_event_once_it_is_back(
        tmp_path, policy_dir, upstream, receiver, database_url):
    gate = start_cedargate(config(tmp_path, policy_dir, upstream, receiver, database_url))
    try:
        upstream.reset()
        receiver.down()
        first, second = escalate(gate, upstream, "i-0abc"), escalate(gate, upstream, "i-0def")
        with agent(gate) as http:  # calls policy allows go on
            assert http.get(f"http://localhost:{upstream.http_port}/v1/instances").status_code == 200
        decide(gate, first, "approve", "checked with on-call")
        decide(gate, second, "deny", "customer traffic peak")
        wait_until(lambda: channel(gate)["pending"] == 4 and channel(gate)["failing_since"], "the channel owing 4")
        shown = channel(gate)
        assert shown["delivered"] == 0 and "could not be reached" in shown["last_error"]
        assert SECRET not in str(shown)
        # The granted call goes through on the agent's retry: the outage changed no decision.
        with agent(gate) as http:
            released = http.post(f"http://127.0.0.1:{upstream.http_port}/v1/instances/i-0abc/stop", json={"grace": 30})
        assert released.status_code == 200, released.text

        receiver.up()
        delivered = receiver.wait_for(4)
        assert told(receiver) == [("opened", first), ("opened", second), ("granted", first), ("denied", second)]
        assert all(d.signed for d in delivered) and len({d.key for d in delivered}) == 4
        assert delivered[0].json["notice"]["link"] == f"https://cedargate.example.test/inbox/requests/{first}"
        wait_until(lambda: channel(gate)["pending"] == 0 and channel(gate)["failing_since"] is None,
                   "the channel recovered")
        time.sleep(2.5)  # two more sweeps' worth: nothing is sent again
        assert len(receiver.received()) == 4 and channel(gate)["delivered"] == 4
    finally:
        gate.stop()


def test_a_restart_while_messages_are_owed_loses_none_and_repeats_none(tmp_path, policy_dir, upstream, receiver):
    path = config(tmp_path, policy_dir, upstream, receiver)
    gate = start_cedargate(path)
    try:
        receiver.down()
        before = [escalate(gate, upstream, "i-0abc"), escalate(gate, upstream, "i-0def")]
        wait_until(lambda: channel(gate)["pending"] == 2, "two messages owed")
    finally:
        assert gate.stop() == 0
    receiver.up()  # back while cedargate is stopped: nothing is sent until it runs again
    time.sleep(0.5)
    assert receiver.received() == []

    gate = start_cedargate(path)
    try:
        after = escalate(gate, upstream, "i-0ghi")
        receiver.wait_for(3)
        assert told(receiver) == [("opened", before[0]), ("opened", before[1]), ("opened", after)]
        wait_until(lambda: channel(gate)["pending"] == 0, "nothing owed")
        time.sleep(2.5)
        assert len(receiver.received()) == 3 and len({d.key for d in receiver.received()}) == 3
    finally:
        gate.stop()
