"""Escalation chains on real databases: a request stores its chain, the chain job announces each tier
and reminder once (in the transaction that moves the request), a later tier's approver may vote only
once the tier is reached, and the primary reviewer is the least loaded qualified approver.

Most tests move a request's clock rather than wait: `backdate` shifts every stored time of a request
into the past, as if it had been opened that long ago. One test waits out a real delay of seconds.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from threading import Barrier
from typing import Any

import pytest
from proxy_support import make_call
from sqlalchemy import update
from sqlmodel import Session, col
from test_workflow import audit_rows

from proxy.cedar.escalation import Escalation, Requirement, Tier
from proxy.oversight.chains import Routing, due_step, routing, standing
from proxy.oversight.holds import Holds
from proxy.oversight.overrides import Override, OverrideError, OverrideStore, aware
from proxy.oversight.workflow import OverrideWorkflow
from proxy.record import audit
from proxy.record.store import Recorder, make_engine, utcnow

# The seeds' IT-operations chain on the clock of a test: on-call at once, the secondary after 10 s, the
# engineering manager after 30 s, rejected at 60 s; reminders every 5 s.
SEEDS = Requirement("staging-stop", ("on-call",), 1,
                    (Tier(10, ("secondary-on-call",)), Tier(30, ("engineering-manager",))))
REVIEWERS = {"olga": frozenset({"on-call"}), "oscar": frozenset({"on-call"}),
             "sid": frozenset({"secondary-on-call"}), "erin": frozenset({"engineering-manager"}),
             "ops-bot": frozenset({"on-call"})}  # the agent's own identity: never named


@pytest.fixture
def chained(database_url: str) -> Iterator[OverrideWorkflow]:
    database = make_engine(database_url)
    recorder = Recorder(database)
    try:
        yield OverrideWorkflow(OverrideStore(database), recorder, Holds(), reviewers=REVIEWERS)
    finally:
        recorder.close()
        database.dispose()


def open_chained(workflow: OverrideWorkflow, requirement: Requirement = SEEDS, *, expires_in: int = 60,
                 remind_every: int | None = 5, body: bytes = b'{"grace": 30}', agent: str = "ops-bot") -> Override:
    call = make_call("POST", "http://127.0.0.1:9000/v1/instances/i-1/stop", body=body, agent=agent)
    override, created = workflow.open(
        call, decision_id=str(uuid.uuid4()), escalation=Escalation((requirement,), expires_in, remind_every),
        policies=[{"id": requirement.policy_id, "reason": None, "annotations": {}}],
        cedar_request={"principal": f'Agent::"{agent}"', "action": 'Action::"post"',
                       "resource": 'Host::"127.0.0.1"', "context": {}},
        revision="rev-1", justification="instance is wedged")
    assert created
    return override


def backdate(workflow: OverrideWorkflow, override_id: str, seconds: float) -> None:
    """Move every stored time of the request `seconds` into the past: as if opened that long ago."""
    shift = timedelta(seconds=seconds)
    with Session(workflow.store.engine) as session:
        row = session.get(Override, override_id)
        assert row is not None
        values = {name: aware(getattr(row, name)) - shift for name in
                  ("created_at", "expires_at", "tier_started_at", "next_step_at") if getattr(row, name) is not None}
        session.exec(update(Override).where(col(Override.id) == override_id).values(**values))  # type: ignore[call-overload]
        session.commit()


def events(workflow: OverrideWorkflow, override_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [(row.kind, json.loads(row.payload)) for row in audit_rows(workflow, override_id)]


# --- the request's chain, stored and announced --------------------------------------------------


def test_opening_stores_the_chain_and_names_tier_1_in_the_created_event(chained: OverrideWorkflow):
    override = open_chained(chained)
    stored = chained.store.get(override.id)
    assert stored is not None and (stored.tier, stored.reminders_sent, stored.primary_reviewer) == (1, 0, "olga")
    assert json.loads(stored.chain or "")["tiers"] == [
        {"after": 0, "roles": ["on-call"]}, {"after": 10, "roles": ["secondary-on-call"]},
        {"after": 30, "roles": ["engineering-manager"]}]
    assert aware(stored.next_step_at) == aware(stored.created_at) + timedelta(seconds=5)  # the first reminder
    [(kind, payload)] = events(chained, override.id)
    assert kind == "override_created"
    # olga and oscar both decide nothing else yet: the tie goes by name; the agent itself is never named.
    assert (payload["tier"], payload["roles"], payload["primary"], payload["fallback"]) == (
        1, ["on-call"], "olga", ["oscar"])
    assert payload["deadline"] == (aware(stored.created_at) + timedelta(seconds=10)).isoformat()


def test_the_job_announces_each_tier_once_and_reminds_in_between(chained: OverrideWorkflow):
    override = open_chained(chained)
    assert chained.advance_due() == []  # nothing due yet: nothing written

    backdate(chained, override.id, 6)  # 6 s in: tier 1's first reminder is due
    assert [kind for _, kind in chained.advance_due()] == ["reminder"]
    assert chained.advance_due() == []  # once
    backdate(chained, override.id, 5)  # 11 s in: tier 2
    assert [kind for _, kind in chained.advance_due()] == ["escalated"]
    stored = chained.store.get(override.id)
    assert stored is not None and (stored.tier, stored.reminders_sent, stored.primary_reviewer) == (2, 0, "sid")
    backdate(chained, override.id, 25)  # 36 s in: tier 2's reminders were missed; tier 3 is due
    assert [kind for _, kind in chained.advance_due()] == ["escalated"]

    kinds_and_tiers = [(kind, payload.get("tier")) for kind, payload in events(chained, override.id)]
    assert kinds_and_tiers == [("override_created", 1), ("reminder", 1), ("escalated", 2), ("escalated", 3)]
    _, reminder, second, third = events(chained, override.id)
    assert (reminder[1]["roles"], reminder[1]["primary"]) == (["on-call"], "olga")
    assert (second[1]["roles"], second[1]["primary"], second[1]["fallback"]) == (["secondary-on-call"], "sid", [])
    assert (third[1]["roles"], third[1]["primary"]) == (["engineering-manager"], "erin")
    opened = aware(chained.store.get(override.id).created_at)  # type: ignore[union-attr]
    # Tier 2's deadline was tier 3's start, 30 s after an opening then 25 s later than it is now.
    assert second[1]["deadline"] == (opened + timedelta(seconds=25 + 30)).isoformat()
    assert third[1]["deadline"] == (opened + timedelta(seconds=60)).isoformat()  # the last tier's: the expiry
    assert audit.verify(chained.store.engine).ok


def test_tiers_passed_while_the_job_was_away_are_each_announced_in_order(chained: OverrideWorkflow):
    override = open_chained(chained, remind_every=None)
    backdate(chained, override.id, 45)
    assert [kind for _, kind in chained.advance_due()] == ["escalated", "escalated"]
    assert [p.get("tier") for _, p in events(chained, override.id)] == [1, 2, 3]
    assert chained.store.get(override.id).next_step_at is None  # type: ignore[union-attr]  # only the expiry left


def test_a_request_waiting_for_the_agent_is_escalated_but_not_reminded(chained: OverrideWorkflow):
    override = open_chained(chained)
    chained.request_info(override.id, "olga", frozenset({"on-call"}), "which instance?")
    backdate(chained, override.id, 6)
    assert chained.advance_due() == []  # the reminder's time passes silently
    assert chained.store.get(override.id).reminders_sent == 1  # type: ignore[union-attr]
    backdate(chained, override.id, 5)
    assert [kind for _, kind in chained.advance_due()] == ["escalated"]


def test_a_decided_or_expired_request_is_never_moved(chained: OverrideWorkflow):
    decided = open_chained(chained)
    chained.vote(decided.id, "olga", frozenset({"on-call"}), "deny", "not now")
    backdate(chained, decided.id, 11)
    lapsed = open_chained(chained, body=b'{"grace": 1}')
    backdate(chained, lapsed.id, 61)
    assert chained.advance_due() == []
    assert chained.expire_due() == [(lapsed.id, "expired")]
    [(_, expired)] = [e for e in events(chained, lapsed.id) if e[0] == "expired"]
    # Who was asked, for the notifications to tell: every tier's roles reached by then.
    assert expired == {"tier": 1, "roles": ["engineering-manager", "on-call", "secondary-on-call"]}


def test_two_processes_sweeping_at_once_write_each_step_once(database_url: str):
    sweepers = []
    for _ in range(2):  # two processes: each its own engine, recorder and workflow on the one database
        database = make_engine(database_url)
        sweepers.append(OverrideWorkflow(OverrideStore(database), Recorder(database), Holds(), reviewers=REVIEWERS))
    try:
        first = sweepers[0]
        opened = [open_chained(first, body=json.dumps({"grace": n}).encode()) for n in range(4)]
        for override in opened:
            backdate(first, override.id, 11)  # tier 2 is due on each (its reminder at 5 s is passed over)
        start = Barrier(2)

        def sweep(workflow: OverrideWorkflow) -> list:
            start.wait()
            return workflow.advance_due()

        with ThreadPoolExecutor(2) as pool:
            written = [step for steps in pool.map(sweep, sweepers) for step in steps]
        assert sorted(override_id for override_id, _ in written) == sorted(o.id for o in opened)
        for override in opened:
            assert [kind for kind, _ in events(first, override.id)] == ["override_created", "escalated"]
        assert audit.verify(first.store.engine).ok
    finally:
        for workflow in sweepers:
            workflow.recorder.close()
            workflow.store.engine.dispose()


# --- who may vote when ----------------------------------------------------------------------------


def test_a_later_tiers_approver_is_refused_before_its_delay_and_may_grant_after(chained: OverrideWorkflow):
    """A real wait of seconds: tier 2 is reached 2 s after the opening, on the clock, whether or not the
    job has announced it yet."""
    override = open_chained(chained, SEEDS_FAST, expires_in=30, remind_every=None)
    with pytest.raises(OverrideError) as refused:
        chained.vote(override.id, "sid", frozenset({"secondary-on-call"}), "approve", "go ahead")
    assert refused.value.status == 403
    assert "may decide this request from its escalation tier 2" in refused.value.detail
    assert [kind for kind, _ in events(chained, override.id)] == ["override_created"]  # nothing recorded

    opened = aware(chained.store.get(override.id).created_at)  # type: ignore[union-attr]
    while utcnow() < opened + timedelta(seconds=2):
        time.sleep(0.1)
    granted, decided = chained.vote(override.id, "sid", frozenset({"secondary-on-call"}), "approve", "go ahead")
    assert (granted.status, decided) == ("granted", True)
    # Earlier tiers still may decide a request that has moved on: the on-call's denial would have counted too.
    assert [kind for kind, _ in events(chained, override.id)] == ["override_created", "approval", "grant"]


SEEDS_FAST = Requirement("staging-stop", ("on-call",), 1, (Tier(2, ("secondary-on-call",)),))


def test_an_earlier_tier_may_still_decide_after_the_chain_moved_on(chained: OverrideWorkflow):
    override = open_chained(chained)
    backdate(chained, override.id, 31)
    chained.advance_due()
    denied, decided = chained.vote(override.id, "oscar", frozenset({"on-call"}), "deny", "not on a Friday")
    assert (denied.status, decided) == ("denied", True)


def test_a_reached_tier_fills_a_role_slot_and_the_two_person_rule_holds(chained: OverrideWorkflow):
    two_person = Requirement("no-volume-deletion", ("security", "lead-engineer"), 2,
                             (Tier(10, ("engineering-manager",)),))
    override = open_chained(chained, two_person, remind_every=None)
    backdate(chained, override.id, 11)
    first, decided = chained.vote(override.id, "erin", frozenset({"engineering-manager"}), "approve", "fine")
    assert (first.status, decided) == ("pending", False)  # one person is not two
    second, decided = chained.vote(override.id, "sam", frozenset({"security"}), "approve", "fine by security")
    assert (second.status, decided) == ("granted", True)


def test_a_later_tiers_approver_sees_the_request_only_once_it_is_reached(chained: OverrideWorkflow):
    override = open_chained(chained)
    manager = frozenset({"engineering-manager"})
    assert [o.id for o in chained.store.list(roles=manager)] == []
    backdate(chained, override.id, 31)
    assert [o.id for o in chained.store.list(roles=manager)] == [override.id]


# --- the primary reviewer -------------------------------------------------------------------------


def test_the_primary_is_the_qualified_approver_with_the_fewest_requests_they_may_decide(chained: OverrideWorkflow):
    first = open_chained(chained, body=b'{"grace": 1}')
    second = open_chained(chained, body=b'{"grace": 2}')
    # Both on-call approvers may decide each request: equal loads, so the tie goes by name.
    assert chained.store.get(first.id).primary_reviewer == "olga"  # type: ignore[union-attr]
    assert chained.store.get(second.id).primary_reviewer == "olga"  # type: ignore[union-attr]
    # A request only oscar's roles decide makes him busier.
    oscar_only = Requirement("other", ("pager",), 1)
    chained.reviewers["oscar"] = frozenset({"on-call", "pager"})
    open_chained(chained, oscar_only, body=b'{"grace": 3}', remind_every=None)
    third = open_chained(chained, body=b'{"grace": 4}')
    [(_, payload)] = [e for e in events(chained, third.id) if e[0] == "override_created"]
    assert (payload["primary"], payload["fallback"]) == ("olga", ["oscar"])
    chained.reviewers["olga"] = frozenset({"on-call", "pager", "audit"})
    chained.reviewers["oscar"] = frozenset({"on-call"})
    fourth = open_chained(chained, body=b'{"grace": 5}')
    [(_, payload)] = [e for e in events(chained, fourth.id) if e[0] == "override_created"]
    assert (payload["primary"], payload["fallback"]) == ("oscar", ["olga"])


def test_routing_counts_only_what_each_may_decide_now_and_never_names_the_agent(chained: OverrideWorkflow):
    waiting = [open_chained(chained, body=json.dumps({"grace": n}).encode(), remind_every=None) for n in range(3)]
    now = utcnow()
    # Nobody but the on-call may decide any of them yet: sid and erin carry no load.
    route = routing(waiting[0], ["secondary-on-call", "engineering-manager"], REVIEWERS, waiting, now)
    assert route == Routing("erin", ("sid",))
    assert routing(waiting[0], ["on-call"], REVIEWERS, waiting, now) == Routing("olga", ("oscar",))
    assert routing(waiting[0], ["nobody-holds-this"], REVIEWERS, waiting, now) == Routing(None, ())
    # Once tier 2 is reached on two of them, sid has two waiting and erin none.
    for override in waiting[1:]:
        backdate(chained, override.id, 11)
    rows = [chained.store.get(o.id) for o in waiting]
    route = routing(waiting[0], ["secondary-on-call", "engineering-manager"], REVIEWERS, rows, utcnow())  # type: ignore[arg-type]
    assert route == Routing("erin", ("sid",))
    busy = {"sid": frozenset({"secondary-on-call"}), "ann": frozenset({"secondary-on-call"})}
    assert routing(waiting[0], ["secondary-on-call"], busy, rows, utcnow()) == Routing("ann", ("sid",))  # type: ignore[arg-type]


# --- where a request stands -----------------------------------------------------------------------


def test_standing_shows_every_tier_the_current_one_and_the_next_step(chained: OverrideWorkflow):
    override = open_chained(chained)
    backdate(chained, override.id, 12)
    chained.advance_due()
    stored = chained.store.get(override.id)
    assert stored is not None
    shown = standing(stored, utcnow())
    opened = aware(stored.created_at)
    assert [(t["tier"], t["roles"], t["reached"]) for t in shown["tiers"]] == [
        (1, ["on-call"], True), (2, ["secondary-on-call"], True), (3, ["engineering-manager"], False)]
    assert (shown["tier"], shown["tier_count"], shown["next_step"]) == (2, 3, "tier 3")
    assert shown["next_step_at"] == opened + timedelta(seconds=30)
    assert shown["primary_reviewer"] == "sid"
    backdate(chained, override.id, 20)  # 32 s in: the last tier; only the expiry is left
    later = standing(chained.store.get(override.id), utcnow())  # type: ignore[arg-type]
    assert (later["tier"], later["next_step"], later["next_step_at"]) == (
        3, "expiry", opened + timedelta(seconds=60 - 20))


def test_due_step_from_where_the_job_left_the_request(chained: OverrideWorkflow):
    override = open_chained(chained)
    stored = chained.store.get(override.id)
    assert stored is not None
    opened = aware(stored.created_at)
    step = due_step(stored, opened + timedelta(seconds=7))
    assert (step.escalate_to, step.remind, step.tier, step.reminders_sent) == ((), True, 1, 1)
    assert step.next_step_at == opened + timedelta(seconds=10)
    step = due_step(stored, opened + timedelta(seconds=31))
    assert (step.escalate_to, step.remind, step.tier) == ((2, 3), False, 3)
    assert step.next_step_at == opened + timedelta(seconds=35)  # tier 3's first reminder

