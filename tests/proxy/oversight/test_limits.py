"""Override floods: the limits on opening override requests, applied by the store where a request is
opened, on SQLite and PostgreSQL; and the per-agent token bucket behind the rate.

Time is a fake clock handed to the store, so no test depends on how fast the machine is.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from proxy_support import make_call

from proxy.calls.mapping import Call
from proxy.cedar.escalation import Escalation, Requirement
from proxy.oversight.holds import Holds
from proxy.oversight.limits import OverrideLimits, OverrideRefused, Refusal, TokenBuckets
from proxy.oversight.overrides import Override, OverrideStore
from proxy.oversight.workflow import OverrideWorkflow
from proxy.record.store import Recorder, make_engine

MANAGER = Requirement("protect-production-instances", ("engineering-manager",), 1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_store(database_url: str, clock: Clock) -> Iterator:
    engines = []

    def make(**limits: Any) -> OverrideStore:
        database = make_engine(database_url)
        engines.append(database)
        return OverrideStore(database, limits=OverrideLimits(**limits), clock=clock)

    yield make
    for database in engines:
        database.dispose()


def deny(store: OverrideStore, override_id: str) -> None:
    """A reviewer denies the request, through the workflow as the API does: it leaves the pending ones."""
    recorder = Recorder(store.engine)
    try:
        OverrideWorkflow(store, recorder, Holds()).vote(
            override_id, "erin", frozenset({"engineering-manager"}), "deny", "no")
    finally:
        recorder.close()


def stop_call(n: int | str = 1, agent: str = "ops-bot", body: bytes = b'{"grace": 30}') -> Call:
    return make_call("POST", f"http://127.0.0.1:9000/v1/instances/i-{n}/stop", agent=agent, body=body,
                     headers={"Content-Type": "application/json"})


def open_request(store: OverrideStore, call: Call, expires_in: int = 1800) -> tuple[Override, bool]:
    return store.open_or_attach(
        call, decision_id=str(uuid.uuid4()), escalation=Escalation((MANAGER,), expires_in),
        policies=[{"id": MANAGER.policy_id, "reason": None, "annotations": {}}],
        cedar_request={"principal": f'Agent::"{call.agent}"', "action": 'Action::"post"',
                       "resource": 'Host::"127.0.0.1"', "context": {"path": call.path, "query": call.query}},
        revision="rev-1", justification=None,
    )


def refusal(store: OverrideStore, call: Call) -> OverrideRefused:
    with pytest.raises(OverrideRefused) as refused:
        open_request(store, call)
    return refused.value


# --- the body kept for reviewers --------------------------------------------------------------------


def test_a_body_larger_than_a_reviewer_is_shown_whole_opens_no_request(make_store):
    store = make_store(max_body_bytes=100)
    refused = refusal(store, stop_call(body=b"x" * 101))
    assert refused.reason is Refusal.BODY_TOO_LARGE and refused.retry_after is None
    assert "101 bytes" in refused.detail and "max_override_body_bytes" in refused.detail
    assert store.list() == []
    opened, created = open_request(store, stop_call(body=b"x" * 100))
    assert created and opened.body == b"x" * 100  # stored whole, never cut


# --- open requests per agent ----------------------------------------------------------------------


def test_an_agent_at_its_cap_opens_no_more_but_its_pending_calls_still_find_their_requests(make_store):
    store = make_store(max_pending_per_agent=3)
    opened = [open_request(store, stop_call(n))[0] for n in range(3)]

    refused = refusal(store, stop_call(3))
    assert refused.reason is Refusal.TOO_MANY_PENDING
    assert 1 <= refused.retry_after <= 60 and "max_pending_overrides_per_agent" in refused.detail
    assert len(store.list(status="pending")) == 3

    again, created = open_request(store, stop_call(0))  # an identical retry is not a new request
    assert (again.id, created) == (opened[0].id, False)
    assert open_request(store, stop_call(0, agent="billing-bot"))[1]  # another agent has its own cap

    deny(store, opened[1].id)
    assert open_request(store, stop_call(3))[1]  # a decided request frees its place


def test_expired_requests_do_not_count_against_the_cap(make_store):
    store = make_store(max_pending_per_agent=1)
    open_request(store, stop_call(0), expires_in=0)  # pending, but past its time (not yet swept)
    assert open_request(store, stop_call(1))[1]


def test_concurrent_calls_never_open_more_than_the_cap(make_store):
    """The count, the check and the insert are one step under the store's lock: the cap is exact."""
    store = make_store(max_pending_per_agent=3)
    threads = 8
    for round_ in range(3):
        barrier = threading.Barrier(threads)

        def attempt(i: int, round_: int = round_) -> object:
            barrier.wait(timeout=30)
            try:
                return open_request(store, stop_call(f"{round_}-{i}"))
            except OverrideRefused as exc:
                return exc

        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(attempt, range(threads)))
        assert sum(not isinstance(r, OverrideRefused) for r in results) == 3
        assert all(r.reason is Refusal.TOO_MANY_PENDING for r in results if isinstance(r, OverrideRefused))
        pending = store.list(status="pending")
        assert len(pending) == 3
        for override in pending:  # make room for the next round
            deny(store, override.id)


# --- the rate of new requests ---------------------------------------------------------------------


def test_new_requests_past_the_rate_wait_for_the_bucket_to_refill(make_store, clock: Clock):
    store = make_store(rate_per_minute=2)
    first, _ = open_request(store, stop_call(0))
    open_request(store, stop_call(1))

    refused = refusal(store, stop_call(2))
    assert refused.reason is Refusal.RATE_LIMITED and refused.retry_after == 30
    assert "override_rate" in refused.detail
    again, created = open_request(store, stop_call(0))  # an identical retry is not a new request
    assert (again.id, created) == (first.id, False)
    assert open_request(store, stop_call(0, agent="billing-bot"))[1]  # buckets are per agent

    clock.now += 29
    assert refusal(store, stop_call(2)).retry_after == 1
    clock.now += 1
    assert open_request(store, stop_call(2))[1]


def test_a_call_refused_for_the_cap_takes_no_token(make_store):
    store = make_store(max_pending_per_agent=1, rate_per_minute=2)
    first, _ = open_request(store, stop_call(0))
    assert refusal(store, stop_call(1)).reason is Refusal.TOO_MANY_PENDING
    assert refusal(store, stop_call(1)).reason is Refusal.TOO_MANY_PENDING
    deny(store, first.id)
    assert open_request(store, stop_call(1))[1]  # the second token was still there


def test_token_buckets_refill_at_the_rate_up_to_the_burst():
    clock = Clock()
    buckets = TokenBuckets(6, clock)  # one token every 10 s, bursts of 6
    for _ in range(6):
        assert buckets.wait("a") == 0
        buckets.take("a")
    assert buckets.wait("a") == 10 and buckets.wait("b") == 0
    clock.now += 3600
    assert buckets.wait("a") == 0
    for _ in range(6):
        buckets.take("a")
    assert buckets.wait("a") == 10  # an hour idle refills no more than the burst
