"""Two instances on one database: a decision or an expiry made by one wakes the calls held by the other,
identical calls through both open one request, one sweeps expiry at a time, and a grant comes back
when its released call never reached the upstream.

Each instance here is what a `cedargate run` process builds: its own engine (its own connections), its
recorder, override store, holds and wake-ups; they share only the database, a SQLite file or a
PostgreSQL schema. (The e2e tests, tests/e2e/test_several_instances.py, run the same with real processes.)
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from threading import Barrier

import pytest
from proxy_support import wait_until
from sqlalchemy import event, text
from sqlmodel import Session, col, select
from test_overrides import (
    ERIN,
    MANAGER,
    MAX,
    ROUNDS,
    THREADS,
    TWO_MANAGERS,
    approve,
    open_request,
    release,
    status_of,
    stop_call,
)

from proxy.cedar.escalation import Escalation
from proxy.oversight import wakeups
from proxy.oversight.holds import Holds
from proxy.oversight.overrides import Override, OverrideStatus, OverrideStore
from proxy.oversight.wakeups import Wakeups
from proxy.oversight.workflow import OverrideWorkflow
from proxy.record.audit import AuditEntry, verify
from proxy.record.store import Recorder, make_engine

NEVER = 60.0  # a hold's time: a missed wake-up shows as False, never as a pass


@dataclass
class Instance:
    workflow: OverrideWorkflow
    wakeups: Wakeups

    @property
    def holds(self) -> Holds:
        return self.workflow.holds

    @property
    def store(self) -> OverrideStore:
        return self.workflow.store


@pytest.fixture
def instances(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Instance, Instance]]:
    # No slow re-read on PostgreSQL: a hold on one instance is woken by the other's notification or not at all.
    monkeypatch.setattr(wakeups, "FALLBACK_INTERVAL", 3600.0)
    made = []
    for _ in range(2):
        database = make_engine(database_url)
        workflow = OverrideWorkflow(OverrideStore(database), Recorder(database), Holds())
        made.append(Instance(workflow, Wakeups(database, workflow.holds)))
    for instance in made:
        instance.wakeups.start()
        if instance.wakeups.postgresql:
            wait_until(instance.wakeups.listening.is_set, "the listener to LISTEN")
    try:
        yield made[0], made[1]
    finally:
        for instance in made:
            instance.wakeups.stop()
            instance.workflow.recorder.close()
            instance.store.engine.dispose()


def held_on(instance: Instance, override_id: str, change) -> bool:
    """Hold on `instance` (subscribed, as a held call is), make `change` elsewhere: True if woken."""
    async def scenario() -> bool:
        waiter = asyncio.create_task(instance.holds.wait(override_id, NEVER))
        while override_id not in instance.holds.waiting():
            await asyncio.sleep(0.001)
        await asyncio.to_thread(change)
        return await waiter

    return asyncio.run(scenario())


def test_a_grant_through_one_instance_wakes_the_call_held_on_the_other(instances):
    a, b = instances
    override, _ = open_request(a.store)
    assert held_on(a, override.id, lambda: approve(b.workflow, override.id, ERIN)) is True
    assert status_of(a.store, override.id) == "granted"


def test_an_expiry_swept_by_one_instance_wakes_the_call_held_on_the_other(instances):
    a, b = instances
    override, _ = open_request(a.store, expires_in=0)  # due at once: the sweep moves it
    assert held_on(a, override.id, b.workflow.expire_due) is True
    assert status_of(a.store, override.id) == "expired"


def test_a_question_asked_through_one_instance_wakes_the_call_held_on_the_other(instances):
    a, b = instances
    override, _ = open_request(a.store)
    asked = held_on(a, override.id, lambda: b.workflow.request_info(override.id, "erin", ERIN[1], "why now?"))
    assert asked is True
    assert status_of(a.store, override.id) == "needs_info"


def test_a_change_that_concerns_no_held_call_wakes_nobody(instances):
    a, b = instances
    held, _ = open_request(a.store)
    other, _ = open_request(a.store, stop_call(body=b'{"grace": 1}'))

    async def scenario() -> bool:
        waiter = asyncio.create_task(a.holds.wait(held.id, 1.0))
        while held.id not in a.holds.waiting():
            await asyncio.sleep(0.001)
        await asyncio.to_thread(approve, b.workflow, other.id, ERIN)
        return await waiter

    assert asyncio.run(scenario()) is False


def test_a_vote_that_decides_nothing_wakes_no_held_call_and_the_deciding_one_does(instances):
    a, b = instances
    held, _ = open_request(a.store, None, TWO_MANAGERS)

    async def scenario() -> tuple[bool, bool]:
        waiter = asyncio.create_task(a.holds.wait(held.id, NEVER))
        while held.id not in a.holds.waiting():
            await asyncio.sleep(0.001)
        # Opened through B too (an identical call joins it) and one of two approvals: the status stays
        # pending, so the held call has nothing to learn, and is not woken to read it again.
        await asyncio.to_thread(open_request, b.store, None, TWO_MANAGERS)
        await asyncio.to_thread(approve, b.workflow, held.id, ERIN)
        await asyncio.sleep(0.5)  # ten of the watcher's looks on SQLite
        woken_early = waiter.done()
        await asyncio.to_thread(approve, b.workflow, held.id, MAX)
        return woken_early, await waiter

    assert asyncio.run(scenario()) == (False, True)
    assert status_of(a.store, held.id) == "granted"


def test_identical_calls_through_two_instances_at_once_open_one_request(instances):
    a, b = instances
    for round_ in range(ROUNDS):
        call = stop_call(body=json.dumps({"grace": round_}).encode())
        start = Barrier(THREADS)

        def open_through(instance: Instance) -> tuple[str, bool]:
            start.wait()
            override, created = instance.workflow.open(
                call, decision_id=str(uuid.uuid4()), escalation=_escalation(), policies=[],
                cedar_request=_cedar_request(), revision="rev-1", justification=None)
            return override.id, created

        with ThreadPoolExecutor(THREADS) as pool:
            opened = list(pool.map(open_through, [a, b] * (THREADS // 2)))
        assert len({override_id for override_id, _ in opened}) == 1
        assert [created for _, created in opened].count(True) == 1
        assert len(a.store.list(status="pending")) == round_ + 1


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_one_instance_sweeps_expiry_at_a_time(instances):
    a, b = instances
    override, _ = open_request(a.store, expires_in=0)
    with b.store.engine.connect() as sweeping:  # b is sweeping: it holds the sweep's lock
        assert sweeping.execute(text(
            "SELECT pg_try_advisory_xact_lock(hashtext('cedargate-expiry:' || current_schema()))")).scalar_one()
        assert a.workflow.expire_due() == []
        assert status_of(a.store, override.id) == "pending"
    assert a.workflow.expire_due() == [(override.id, OverrideStatus.EXPIRED)]


def test_a_request_left_live_past_its_time_expires_when_its_call_comes_again(instances):
    a, _ = instances
    stale, _ = open_request(a.store, expires_in=0)  # no sweep has run: still marked pending
    def call_again() -> tuple[Override, bool]:
        return a.workflow.open(stop_call(), decision_id=str(uuid.uuid4()), escalation=_escalation(),
                               policies=[], cedar_request=_cedar_request(), revision="rev-1", justification=None)

    # The call's return expires it, and is told so, once; the next return asks the reviewers again.
    told, created = call_again()
    assert not created and (told.id, told.status) == (stale.id, "expired")
    fresh, created = call_again()
    assert created and fresh.id != stale.id
    assert status_of(a.store, stale.id) == "expired"
    assert [(e.kind, e.override_id) for e in _events(a)][-3:] == [("expired", stale.id), ("outcome_told", stale.id),
                                                                  ("override_created", fresh.id)]


def test_a_grant_whose_call_never_reached_the_upstream_is_put_back_once(instances):
    a, b = instances
    override, _ = open_request(a.store)
    approve(b.workflow, override.id, ERIN)
    assert release(a.workflow, override.id, decision_id="d-released")
    failure = {"kind": "connect-refused", "message": "[Errno 111] Connection refused"}
    assert not a.workflow.restore_grant(override.id, decision_id="d-other", failure=failure)
    assert a.workflow.restore_grant(override.id, decision_id="d-released", failure=failure)
    assert not a.workflow.restore_grant(override.id, decision_id="d-released", failure=failure)
    assert status_of(a.store, override.id) == "granted"
    assert release(b.workflow, override.id, decision_id="d-retry")  # the retry, through either instance
    kinds = [e.kind for e in _events(a) if e.override_id == override.id]
    assert kinds == ["approval", "grant", "release", "grant_restored", "release"]
    restored = [e for e in _events(a) if e.kind == "grant_restored"][0]
    assert json.loads(restored.payload)["not_forwarded"] == failure
    assert verify(a.store.engine).ok


def _escalation() -> Escalation:
    return Escalation((MANAGER,), 1800)


def _cedar_request() -> dict:
    return {"principal": 'Agent::"ops-bot"', "action": 'Action::"post"', "resource": 'Host::"127.0.0.1"',
            "context": {"path": "/v1/instances/i-1/stop"}}


def _events(instance: Instance) -> list[AuditEntry]:
    instance.workflow.recorder.flush()
    with Session(instance.store.engine) as session:
        return list(session.exec(select(AuditEntry).order_by(col(AuditEntry.seq))).all())


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_listener_whose_connection_is_cut_reconnects_and_hears_the_next_decision(instances):
    a, b = instances
    with a.store.engine.connect() as conn:
        channel = conn.execute(text(f"SELECT {wakeups._CHANNEL}")).scalar_one()
        # The connections of these two listeners only: the channel is this test's schema's.
        listeners = conn.execute(text("SELECT pid FROM pg_stat_activity WHERE query = :q"),
                                 {"q": f'LISTEN "{channel}"'}).scalars().all()
        assert len(listeners) == 2
        for pid in listeners:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    wait_until(lambda: not a.wakeups.listening.is_set(), "the listener to notice its connection is gone")
    wait_until(a.wakeups.listening.is_set, "the listener to LISTEN again")
    override, _ = open_request(a.store)
    assert held_on(a, override.id, lambda: approve(b.workflow, override.id, ERIN)) is True


def test_with_no_call_held_commits_cost_the_watcher_no_read_of_the_log_and_a_later_hold_is_woken(instances,
                                                                                                   monkeypatch):
    a, b = instances
    if a.wakeups.postgresql:
        pytest.skip("on PostgreSQL the watcher is the slow fallback, not looking on commits")
    monkeypatch.setattr(wakeups, "IDLE_INTERVAL", 3600.0)  # nothing held: it never moves on, however long
    looks, reads = [], []
    changed = wakeups._DataVersion.changed

    def counted(self) -> bool:
        seen = changed(self)
        looks.append(seen)
        return seen

    monkeypatch.setattr(wakeups._DataVersion, "changed", counted)

    @event.listens_for(a.wakeups.engine, "before_cursor_execute")
    def read(conn, cursor, statement, *args) -> None:
        if threading.current_thread().name == "cedargate-watch" and "audit_log" in statement:
            reads.append(statement)

    # Two looks: the first may read the log's last seq, if the watcher could not at its start (a busy store).
    wait_until(lambda: len(looks) >= 2, "a's watcher's first looks")
    reads.clear()
    before = len(looks)
    first, _ = open_request(b.store)
    approve(b.workflow, first.id, ERIN)
    wait_until(lambda: True in looks[before:] and looks[-1] is False, "a's watcher to see the commits, then none")
    assert reads == []  # seen to change, not read: nobody is held on a

    held, _ = open_request(a.store, stop_call(body=b'{"grace": 2}'))
    assert held_on(a, held.id, lambda: approve(b.workflow, held.id, ERIN)) is True
    assert reads  # held: the log was read, from where the watcher last moved on
