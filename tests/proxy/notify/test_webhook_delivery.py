"""Webhook notifications from the outbox, on SQLite and PostgreSQL: a signed delivery per event, in the
log's order; a receiver that is down loses nothing and blocks nothing; a retry carries the same
idempotency key; a message refused for good does not hold back the next; one process sweeps at a time;
a restarted notifier goes on where the last one stopped."""

from __future__ import annotations

import json

from notify_support import MANAGER, SECRET, SECURITY, open_request, webhook_config

from proxy.notify.outbox import DeliveryState
from proxy.notify.webhook import SIGNATURE, sign, verify
from proxy.observe import metrics
from proxy.oversight.overrides import OverrideStatus
from proxy.oversight.workflow import OverrideWorkflow
from tests.support.receiver import Receiver

ERIN = frozenset({"engineering-manager"})


def test_an_opened_request_is_posted_signed_with_what_a_reviewer_needs(workflow, receiver, make_notifier):
    notifier = make_notifier(webhook_config(receiver))
    # The manifest route's typed field, as the mapping takes it from the body {"grace": 30}.
    override = open_request(workflow, justification="instance is wedged", context={"grace": 30})

    [delivery] = receiver.wait_for(1, poke=notifier.sweep)
    assert delivery.signed and delivery.headers["content-type"] == "application/json"
    body = delivery.json
    assert body["id"] == delivery.key and len(delivery.key) == 40
    assert body["event"] == "opened" and delivery.headers["cedargate-event"] == "opened"
    notice = body["notice"]
    assert (notice["override_id"], notice["agent"], notice["method"]) == (override.id, "ops-bot", "POST")
    assert notice["url"] == "http://127.0.0.1:9000/v1/instances/i-1/stop"
    assert notice["justification"] == "instance is wedged"
    assert notice["roles"] == ["engineering-manager"] and notice["severity"] == "high"
    assert notice["key_arguments"] == {"grace": "30"}
    assert notice["deadline"].startswith(override.expires_at.isoformat()[:19])
    assert notice["link"] == f"https://cedargate.example.test/inbox/requests/{override.id}"
    [state] = notifier.status()
    assert (state.channel, state.pending, state.delivered, state.failing_since) == ("ops-hook", 0, 1, None)
    assert state.last_delivery_at is not None

    notifier.sweep()  # nothing new: nothing sent again
    assert len(receiver.received()) == 1


def test_a_receiver_that_is_down_blocks_nothing_and_gets_everything_once_it_is_back(
        workflow: OverrideWorkflow, receiver: Receiver, make_notifier):
    notifier = make_notifier(webhook_config(receiver))
    delivered_before, retried_before = counted()
    receiver.down()

    # The workflow goes on while the channel is down: requests open, votes decide them.
    first = open_request(workflow, path="/v1/instances/i-1/stop")
    notifier.sweep()
    second = open_request(workflow, path="/v1/instances/i-2/stop")
    granted, decided = workflow.vote(first.id, "erin", ERIN, "approve", "checked")
    assert decided and granted.status == OverrideStatus.GRANTED.value
    denied, _ = workflow.vote(second.id, "erin", ERIN, "deny", "not now")
    assert denied.status == OverrideStatus.DENIED.value
    assert workflow.recorder.flush()
    notifier.sweep()

    [state] = notifier.status()
    assert state.pending == 4 and state.delivered == 0
    assert state.failing_since is not None and state.retry_at is not None
    assert state.last_error is not None and "could not be reached" in state.last_error
    assert SECRET not in state.last_error and "/hooks/" not in state.last_error  # host only, never the URL

    receiver.up()
    delivered = receiver.wait_for(4, poke=notifier.sweep)
    assert [(d.json["event"], d.json["notice"]["override_id"]) for d in delivered] == [
        ("opened", first.id), ("opened", second.id), ("granted", first.id), ("denied", second.id)]
    assert all(d.signed for d in delivered)
    assert len({d.key for d in delivered}) == 4
    assert delivered[2].json["notice"]["actor"] == "erin" and delivered[3].json["notice"]["reason"] == "not now"
    [state] = notifier.status()
    assert (state.pending, state.delivered, state.failing_since, state.retry_at) == (0, 4, None, None)
    delivered_after, retried_after = counted()
    assert delivered_after - delivered_before == 4 and retried_after - retried_before >= 1


def counted() -> tuple[float, float]:
    """This process's metrics of the ops-hook channel: deliveries, and tries retried."""
    return (metrics.sample("cedargate_notification_deliveries_total", {"channel": "ops-hook"}) or 0.0,
            metrics.sample("cedargate_notification_failures_total", {"channel": "ops-hook", "outcome": "retried"})
            or 0.0)


def test_a_delivery_whose_answer_was_lost_comes_again_with_the_same_key(workflow, receiver, make_notifier):
    """At least once: the receiver took it but answered 503 (as if the answer never came); the retry
    carries the same Idempotency-Key and body id, so the receiver can tell it is the same event."""
    notifier = make_notifier(webhook_config(receiver))
    receiver.answer = 503
    open_request(workflow)
    notifier.sweep()
    receiver.answer = 200
    tries = receiver.wait_for(2, poke=notifier.sweep)
    assert len(tries) == 2 and tries[0].key == tries[1].key and tries[0].json["id"] == tries[1].json["id"]
    assert json.loads(tries[0].body)["notice"] == json.loads(tries[1].body)["notice"]
    [state] = notifier.status()
    assert (state.pending, state.delivered) == (0, 1)


def test_a_message_refused_for_good_is_kept_as_failed_and_the_next_goes_on(workflow, receiver, make_notifier):
    notifier = make_notifier(webhook_config(receiver))
    receiver.answer = 422
    refused = open_request(workflow, path="/v1/instances/i-1/stop")
    notifier.sweep()
    receiver.answer = 200
    later = open_request(workflow, path="/v1/instances/i-2/stop")
    delivered = receiver.wait_for(2, poke=notifier.sweep)
    assert [d.json["notice"]["override_id"] for d in delivered] == [refused.id, later.id]
    [state] = notifier.status()
    assert (state.pending, state.failed, state.delivered, state.failing_since) == (0, 1, 1, None)
    [kept] = notifier.outbox.deliveries(refused.id)
    assert kept["state"] == DeliveryState.FAILED and "answered 422" in kept["last_error"]


def test_routes_send_only_the_events_and_roles_they_name(workflow, receiver, make_notifier):
    notifier = make_notifier(webhook_config(receiver, roles=["security"]))
    open_request(workflow, MANAGER, path="/v1/instances/i-1/stop")
    security = open_request(workflow, SECURITY, path="/v1/volumes/vol-1")
    notifier.sweep()
    [delivery] = receiver.wait_for(1, poke=notifier.sweep)
    assert delivery.json["notice"]["override_id"] == security.id
    assert delivery.json["notice"]["roles"] == ["security"]


def test_a_signature_is_refused_for_another_body_another_secret_or_an_old_time():
    body = b'{"id": "k"}'
    header = sign(SECRET.encode(), 1_700_000_000, body)
    assert verify(SECRET.encode(), header, body, now=1_700_000_010)
    assert not verify(SECRET.encode(), header, body + b" ", now=1_700_000_010)
    assert not verify(b"another secret", header, body, now=1_700_000_010)
    assert not verify(SECRET.encode(), header, body, now=1_700_000_000 + 301)
    assert not verify(SECRET.encode(), "v1=" + header.split("v1=")[1], body, now=1_700_000_010)
    assert SIGNATURE == "Cedargate-Signature"


def test_without_its_secret_a_webhook_sends_nothing_and_says_which_variable(workflow, receiver, make_notifier):
    notifier = make_notifier(webhook_config(receiver), environ={})
    open_request(workflow)
    notifier.sweep()
    assert receiver.received() == []
    [state] = notifier.status()
    assert state.pending == 1 and state.last_error is not None and "CEDARGATE_HOOK_SECRET" in state.last_error


def test_one_notifier_sweeps_at_a_time_and_a_restarted_one_goes_on_where_it_stopped(
        workflow, receiver, make_notifier):
    config = webhook_config(receiver)
    first, second = make_notifier(config), make_notifier(config)
    opened = [open_request(workflow, path=f"/v1/instances/i-{n}/stop") for n in range(3)]
    first.sweep()
    second.sweep()  # the lease is first's: it does nothing
    assert len(receiver.received()) == 3

    first.close()  # gives the lease back, as a stopping cedargate does
    more = [open_request(workflow, path=f"/v1/instances/i-{n}/stop") for n in range(3, 5)]
    delivered = receiver.wait_for(5, poke=second.sweep)
    assert [d.json["notice"]["override_id"] for d in delivered] == [o.id for o in opened + more]
    assert len({d.key for d in delivered}) == 5
