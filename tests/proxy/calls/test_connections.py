"""The connection guard on its own: deadlines, the unproven-connection cap, and what it logs.

Time is a fake clock and timers a list the test advances, so no test waits; the fronts (the proxy addon,
the API's protocol) are exercised end to end in tests/e2e/test_boundary_limits.py.
"""

from __future__ import annotations

import json
import logging
import resource
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from proxy.calls.connections import ConnectionGuard, default_connection_cap, open_file_limit, refusal
from proxy.vocabulary.problems import Problem


@dataclass
class Timer:
    at: float
    callback: object
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Clock:
    now: float = 0.0
    timers: list[Timer] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    def schedule(self, delay: float, callback) -> Timer:
        timer = Timer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for timer in sorted(self.timers, key=lambda t: t.at):
            if timer.at <= self.now and not timer.cancelled:
                timer.cancelled = True
                timer.callback()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def closed() -> list[tuple[str, str]]:
    return []


def make_guard(clock: Clock, closed: list, cap: int = 3) -> ConnectionGuard[str]:
    return ConnectionGuard(
        "proxy", header_timeout=10, idle_timeout=60, max_unproven=cap,
        close=lambda key, why: closed.append((key, why)), schedule=clock.schedule, clock=clock,
    )


def test_a_connection_without_a_complete_head_is_closed_at_the_header_timeout(clock, closed):
    guard = make_guard(clock, closed)
    guard.opened("a")
    clock.advance(9.9)
    assert closed == []
    clock.advance(0.2)
    assert closed == [("a", "no complete request head within 10s")]
    assert len(guard) == 0


def test_a_request_in_progress_has_no_deadline_and_the_idle_one_follows_it(clock, closed):
    guard = make_guard(clock, closed)
    guard.opened("a")
    guard.proven("a")
    guard.request_started("a", 1)
    clock.advance(3600)  # held for a human, or a slow upstream
    assert closed == []
    guard.request_finished("a", 1)
    clock.advance(59)
    assert closed == []
    clock.advance(2)
    assert closed == [("a", "idle for 60s")]


def test_the_idle_deadline_waits_for_every_request_of_the_connection(clock, closed):
    guard = make_guard(clock, closed)
    guard.opened("h2")
    guard.request_started("h2", 1)
    guard.request_started("h2", 3)
    guard.request_finished("h2", 1)
    clock.advance(120)
    assert closed == []
    guard.request_finished("h2", 3)
    guard.request_finished("h2", 3)  # reported twice (response, then error): no second deadline
    clock.advance(61)
    assert closed == [("h2", "idle for 60s")]


def test_a_new_tunnel_must_send_its_first_request_as_promptly_as_a_new_connection(clock, closed):
    guard = make_guard(clock, closed)
    guard.opened("a")
    clock.advance(8)
    guard.proven("a")
    guard.await_request("a")  # CONNECT answered: the clock starts again for the tunnel's first request
    clock.advance(9)
    assert closed == []
    clock.advance(2)
    assert closed == [("a", "no complete request head within 10s")]


def test_a_closed_connection_forgets_its_deadline(clock, closed):
    guard = make_guard(clock, closed)
    guard.opened("a")
    guard.closed("a")
    clock.advance(100)
    assert closed == [] and len(guard) == 0


def test_past_the_cap_the_oldest_unproven_connection_is_closed(clock, closed):
    guard = make_guard(clock, closed, cap=3)
    for key in "abc":
        guard.opened(key)
    assert closed == []
    guard.opened("d")
    assert closed == [("a", "too many unauthenticated connections")]
    assert guard.unproven_idle == 3


def test_authenticated_and_busy_connections_are_neither_counted_nor_evicted(clock, closed):
    guard = make_guard(clock, closed, cap=2)
    guard.opened("agent")
    guard.proven("agent")
    guard.opened("busy")
    guard.request_started("busy", 1)  # the API: a request in progress on an unauthenticated connection
    guard.opened("x")
    guard.opened("y")
    assert closed == []
    guard.opened("z")
    assert closed == [("x", "too many unauthenticated connections")]
    # Idle again, "busy" queues behind the others as the newest.
    guard.request_finished("busy", 1)
    evicted = "too many unauthenticated connections"
    assert closed == [("x", evicted), ("y", evicted)]


def test_floods_are_logged_once_per_interval_with_a_count(clock, closed, caplog):
    guard = make_guard(clock, closed, cap=1)
    with caplog.at_level(logging.WARNING, logger="proxy.calls.connections"):
        for key in range(6):
            guard.opened(key)
        clock.advance(61)  # the last one times out: a warning of its own kind
        for key in range(10, 14):  # 11 evicts the first of the interval, 12 and 13 wait for the next
            guard.opened(key)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "proxy: closed 1 connections that had not authenticated, to keep at most 1 such open "
        "(max_unauthenticated_connections)",
        "proxy: closed 1 connections that sent no complete request head within 10s (header_read_timeout)",
        "proxy: closed 5 connections that had not authenticated, to keep at most 1 such open "
        "(max_unauthenticated_connections)",
    ]


def test_a_connection_that_cannot_be_closed_does_not_stop_the_others(clock, caplog):
    calls = []

    def close(key, why):
        calls.append(key)
        if key == "a":
            raise OSError("gone")

    guard = ConnectionGuard("API", header_timeout=1, idle_timeout=1, max_unproven=1, close=close,
                            schedule=clock.schedule, clock=clock)
    guard.opened("a")
    guard.opened("b")
    guard.opened("c")
    assert calls == ["a", "b"]
    assert "cannot close a connection" in caplog.text


def test_default_cap_is_a_quarter_of_the_open_files():
    assert default_connection_cap(1024) == 256
    assert default_connection_cap(65536) == 16384
    assert default_connection_cap(20) == 16


def test_the_open_file_limit_is_raised_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert open_file_limit() == soft
    low = min(256, hard)
    result = subprocess.run(
        [sys.executable, "-c", "from proxy.calls.connections import open_file_limit; print(open_file_limit(True))"],
        capture_output=True, text=True, check=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard)),
    )
    expected = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    assert int(result.stdout) == expected


def test_refusals_are_problem_json():
    body = json.loads(refusal(Problem.HEADERS_TOO_LARGE, 431, "too long"))
    assert body == {
        "type": "urn:cedargate:problem:request-headers-too-large",
        "title": "Request headers too large; call refused",
        "status": 431,
        "detail": "too long",
        "next_step": "The call was not forwarded; send shorter headers.",
    }
