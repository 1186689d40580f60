"""A history of human reviews made through the real workflow on a started core (`tests.support.runtime`):
calls decided and recorded by the gate, requests opened as a held call opens them, votes cast as reviewers
cast them (approve, approve with changes, deny), one request expired by the expiry job. The report's tests
(its core, its command, its API route) read it; the figures they expect are in `make_history`'s docstring.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

from proxy.calls.mapping import Call
from proxy.runtime import Runtime

MANAGERS = frozenset({"engineering-manager"})
FINANCE = frozenset({"finance"})
# The approvers whose votes make the history ("idle" never votes), and an auditor who reads the report.
REVIEWERS = {"erin": ("engineering-manager",), "max": ("engineering-manager",), "fran": ("finance",),
             "idle": ("engineering-manager",), "audrey": ("auditor",)}


def production_stop(n: int) -> Call:
    return Call(agent="ops-bot", method="POST", scheme="http", host="127.0.0.1", port=9000,
                path=f"/v1/instances/i-{n}/stop", headers={}, body=b"")


def refund(n: int, amount: int = 900) -> Call:
    body = json.dumps({"amount": amount, "currency": "EUR"}).encode()
    return Call(agent="billing-bot", method="POST", scheme="https", host="api.payments.example", port=443,
                path=f"/v1/refunds/o-{n}", headers={"Content-Type": "application/json",
                                                    "Content-Length": str(len(body))}, body=body)


def escalate(runtime: Runtime, call: Call, *, expires_in: int | None = None) -> str:
    """As the proxy does: decide, record, open the request (the agent asked not to wait)."""
    verdict = runtime.gate.decide(call)
    assert verdict.escalation is not None, verdict.detail
    runtime.gate.record(verdict).result(10)
    if expires_in is not None:
        verdict = replace(verdict, escalation=replace(verdict.escalation, expires_in=expires_in))
    resolution = asyncio.run(runtime.oversight.resolve(verdict, 0, "please", client_alive=lambda: True))
    assert resolution.override_id is not None
    return resolution.override_id


def allowed(runtime: Runtime, n: int) -> None:
    verdict = runtime.gate.decide(Call(agent="ops-bot", method="GET", scheme="http", host="localhost", port=9000,
                                       path="/v1/instances", query=f"page={n}", headers={}, body=b""))
    assert verdict.allowed
    runtime.gate.record(verdict).result(10)


def make_history(runtime: Runtime) -> None:
    """protect-production-instances: 5 approved as sent (erin), 1 denied (max), 1 expired.
    large-refunds: 2 approved with changes and 1 as sent, 1 denied (all fran). And 3 allowed calls."""
    vote = runtime.workflow.vote
    for n in range(5):
        vote(escalate(runtime, production_stop(n)), "erin", MANAGERS, "approve", "fine")
    vote(escalate(runtime, production_stop(5)), "max", MANAGERS, "deny", "not now")
    escalate(runtime, production_stop(6), expires_in=0)
    assert [status for _, status in runtime.workflow.expire_due()] == ["expired"]
    for n in range(2):
        vote(escalate(runtime, refund(n)), "fran", FINANCE, "approve", "half", {"amount": 400})
    vote(escalate(runtime, refund(2)), "fran", FINANCE, "approve", "fine")
    vote(escalate(runtime, refund(3)), "fran", FINANCE, "deny", "no")
    for n in range(3):
        allowed(runtime, n)
    assert runtime.recorder.flush(10)


