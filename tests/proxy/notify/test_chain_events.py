"""The events of an escalation chain and of expiry reach the channels routed to them: a reminder and an
escalation to the next tier are told with what their audit payload says (the tier, its roles, the
primary reviewer named first and the fallback, the tier's deadline), and an expired request is told as
rejected. Routing follows the payload's roles, not the request's, where the chain names them."""

from __future__ import annotations

import time

from notify_support import SECURITY, open_request, webhook_config

from proxy.oversight.workflow import OverrideWorkflow
from tests.support.receiver import Receiver


def chain_event(workflow: OverrideWorkflow, kind: str, override_id: str, **payload: object) -> None:
    """An event as the escalation chains record it (`reminder`, `escalated`), on the audit log."""
    workflow.recorder.record_event({"kind": kind, "override_id": override_id, "agent": "ops-bot",
                                    "payload": payload})
    assert workflow.recorder.flush()


def test_an_escalation_names_its_tier_primary_reviewer_fallback_and_deadline(
        workflow: OverrideWorkflow, receiver: Receiver, make_notifier):
    notifier = make_notifier(webhook_config(receiver, roles=["security"]))
    override = open_request(workflow)  # needs engineering-manager: not routed to a security-only channel
    chain_event(workflow, "reminder", override.id, tier=1, roles=["engineering-manager"], primary="erin",
                fallback=["max"], deadline="2026-12-02T06:10:00+00:00")
    chain_event(workflow, "escalated", override.id, tier=2, roles=["security"], primary="sam", fallback=[],
                deadline="2026-12-02T06:30:00+00:00")
    [delivery] = receiver.wait_for(1, poke=notifier.sweep)
    notice = delivery.json["notice"]
    assert delivery.json["event"] == "escalated"
    assert (notice["tier"], notice["roles"], notice["primary"], notice["fallback"], notice["deadline"]) == (
        2, ["security"], "sam", [], "2026-12-02T06:30:00+00:00")


def test_an_expired_request_is_told_as_rejected(workflow: OverrideWorkflow, receiver: Receiver, make_notifier):
    notifier = make_notifier(webhook_config(receiver))
    override = open_request(workflow, SECURITY, path="/v1/volumes/vol-1", expires_in=1)
    receiver.wait_for(1, poke=notifier.sweep)
    time.sleep(1.1)
    assert [moved for moved, _ in workflow.expire_due()] == [override.id]
    delivered = receiver.wait_for(2, poke=notifier.sweep)
    assert [(d.json["event"], d.json["notice"]["status"]) for d in delivered] == [
        ("opened", "pending"), ("expired", "expired")]
