"""An escalation chain with a real cedargate, a logging upstream and httpx as the agent, on second-scale
delays: the opened request names tier 1 (the on-call) in its `override_created` event; the manager may
not decide before tier 2 is reached, and the `escalated` event names tier 2 once it is; at expiry the
request is rejected, and the agent's retry learns it (`override-expired`). Nothing reaches the upstream.
A local webhook receiver, configured as a notification channel, is told of each of those steps once.
"""

from __future__ import annotations

import json
import sqlite3
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_support import APPROVERS, start_cedargate, write_config

from tests.support.receiver import webhook_receiver

STOP = "/v1/instances/i-0abc/stop"
# The seeds' chain, on seconds: on-call at once, the engineering manager after 5 s, rejected at 12 s.
CHAIN = """@escalate("on-call")
@escalate_after("5s: engineering-manager")
@expires("12s")"""
ON_CALL = {"olga": ("olga-token-7", ["on-call"])}


@pytest.fixture
def gate(tmp_path, policy_dir, upstream, monkeypatch):
    ops = policy_dir / "ops.cedar"
    text = ops.read_text()
    original = '@escalate("engineering-manager")\n@expires("30m")'
    assert original in text
    ops.write_text(text.replace(original, CHAIN, 1))
    monkeypatch.setitem(APPROVERS, "olga", ON_CALL["olga"])
    started = start_cedargate(write_config(tmp_path / "c.yaml", policy_dir, tmp_path / "state", upstream))
    upstream.reset()
    yield started
    started.stop()


def agent(gate) -> httpx.Client:
    return httpx.Client(proxy=gate.proxy_url, verify=ssl.create_default_context(cafile=gate.ca_cert), timeout=60)


def api(gate, method: str, path: str, approver: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{gate.api_url}{path}", headers={"Authorization": f"Bearer {APPROVERS[approver][0]}"},
                         timeout=10, **kwargs)


def audit_events(database: Path, override_id: str, kind: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The payloads of the request's `kind` events, once there is one (or none, past `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(database) as db:
            rows = db.execute("SELECT payload FROM audit_log WHERE override_id = ? AND kind = ? ORDER BY seq",
                              (override_id, kind)).fetchall()
        if rows or time.monotonic() > deadline:
            return [json.loads(payload) for (payload,) in rows]
        time.sleep(0.1)


def test_a_chain_names_tier_1_escalates_to_tier_2_after_its_delay_and_expiry_rejects(gate, upstream):
    url = f"http://127.0.0.1:{upstream.http_port}{STOP}"
    asynchronous = {"Prefer": "respond-async"}
    with agent(gate) as http:
        opened = http.post(url, json={"grace": 30}, headers=asynchronous)
        assert opened.status_code == 403 and opened.json()["type"] == "urn:cedargate:problem:override-pending"
        override_id = opened.json()["override_id"]
        assert opened.json()["required_roles"] == ["on-call"]

        [created] = audit_events(gate.database, override_id, "override_created")
        assert (created["tier"], created["roles"], created["primary"], created["fallback"]) == (
            1, ["on-call"], "olga", [])

        # The manager's tier is not reached yet: the manager may not decide (and so does not see it).
        early = api(gate, "POST", f"/overrides/{override_id}/approve", "erin", json={"reason": "fine"})
        assert early.status_code == 403, early.text
        assert "escalation tier 2" in early.json()["detail"]

        [escalated] = audit_events(gate.database, override_id, "escalated")
        # erin and max hold the role and decide nothing else: the tie goes by name. ops-bot also holds
        # it, but is the agent: never named for its own call.
        assert (escalated["tier"], escalated["roles"], escalated["primary"], escalated["fallback"]) == (
            2, ["engineering-manager"], "erin", ["max"])
        assert escalated["deadline"] == created["expires_at"]
        shown = api(gate, "GET", f"/overrides/{override_id}", "erin")
        assert shown.status_code == 200 and shown.json()["status"] == "pending"

        [expired] = audit_events(gate.database, override_id, "expired")
        assert expired["roles"] == ["engineering-manager", "on-call"]
        told = http.post(url, json={"grace": 30}, headers=asynchronous)
        assert told.status_code == 403
        assert (told.json()["type"], told.json()["override_id"]) == (
            "urn:cedargate:problem:override-expired", override_id)
    assert upstream.calls == []
    assert gate.audit_verify().returncode == 0


WEBHOOK_SECRET = "chain-hook-secret"


def test_a_webhook_receiver_is_told_opened_escalated_and_expired_for_a_chain(tmp_path, policy_dir, upstream,
                                                                             monkeypatch):
    """The notifications read the chain's events: a signed webhook gets the opening (tier 1, the on-call),
    the escalation (tier 2, the manager, named primary) and the expiry, each once, in that order."""
    ops = policy_dir / "ops.cedar"
    ops.write_text(ops.read_text().replace('@escalate("engineering-manager")\n@expires("30m")', CHAIN, 1))
    monkeypatch.setitem(APPROVERS, "olga", ON_CALL["olga"])
    monkeypatch.setenv("CHAINS_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET)
    with webhook_receiver(WEBHOOK_SECRET.encode()) as receiver:
        notifications = {"channels": {"hook": {"type": "webhook", "url": receiver.url,
                                               "secret_env": "CHAINS_TEST_WEBHOOK_SECRET"}},
                         "routes": [{"events": ["opened", "escalated", "expired"], "channels": ["hook"]}]}
        gate = start_cedargate(write_config(tmp_path / "c.yaml", policy_dir, tmp_path / "state", upstream,
                                            notifications=notifications))
        try:
            with agent(gate) as http:
                opened = http.post(f"http://127.0.0.1:{upstream.http_port}{STOP}", json={"grace": 30},
                                   headers={"Prefer": "respond-async"})
            override_id = opened.json()["override_id"]
            about = lambda d: d.json["notice"]["override_id"] == override_id  # noqa: E731
            told = receiver.wait_for(3, timeout=40, predicate=about)
        finally:
            gate.stop()
    assert [d.json["event"] for d in told] == ["opened", "escalated", "expired"]
    assert all(d.signed for d in told)
    assert len({d.key for d in told}) == 3  # each event once
    first, escalated, expired = (d.json["notice"] for d in told)
    assert (first["tier"], first["roles"], first["primary"]) == (1, ["on-call"], "olga")
    assert (escalated["tier"], escalated["roles"], escalated["primary"], escalated["fallback"]) == (
        2, ["engineering-manager"], "erin", ["max"])
    assert expired["status"] == "expired"
