"""Workers taking turns to accept (proxy/cli/balance.py): two workers' entries in one table, on one loop.

The real processes are in tests/e2e/test_workers.py (16 connections opened together land 8/8); here the
rules themselves: who may accept, who is woken, and a worker that stops beating or dies; and, through
the real accept step on a loopback listener, that a worker's count is the connections it holds."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator

import pytest

from proxy.calls.capacity import Capacity
from proxy.cli.balance import BEAT, BEAT_INTERVAL, COUNT, ConnectionShares, Share
from proxy.cli.listeners import guard_accepts, limit_connections

WAIT = 30  # seconds one step may take before the test gives up (a bound, not a measurement)


@pytest.fixture(params=["memfd", "file"])
def shares(request, monkeypatch) -> Iterator[ConnectionShares]:
    if request.param == "file":  # where there is no memfd (macOS): an unlinked temporary file
        monkeypatch.delattr(os, "memfd_create")
    table = ConnectionShares.create(2)
    yield table
    table.close()


def test_a_worker_accepts_only_while_it_holds_no_more_than_the_other(shares):
    async def run() -> list[tuple[bool, bool]]:
        loop = asyncio.get_running_loop()
        first, second = Share(shares, 0, loop), Share(shares, 1, loop)
        first.join()
        second.join()
        turns = [(first.my_turn(), second.my_turn())]
        first.opened()
        turns.append((first.my_turn(), second.my_turn()))
        second.opened()
        turns.append((first.my_turn(), second.my_turn()))
        second.opened()
        first.closed()
        turns.append((first.my_turn(), second.my_turn()))
        first.leave()
        second.leave()
        return turns

    assert asyncio.run(run()) == [(True, True), (False, True), (True, True), (True, False)]


def test_a_waiting_worker_is_woken_when_the_other_accepts_past_it(shares):
    async def run() -> list[str]:
        loop = asyncio.get_running_loop()
        first, second = Share(shares, 0, loop), Share(shares, 1, loop)
        first.join()
        second.join()
        woken: list[str] = []
        first.opened()
        first.wait(lambda: woken.append("first"))
        await asyncio.sleep(0.02)
        assert woken == []  # still ahead of the other
        second.opened()  # level again: the first's turn, told through its pipe
        for _ in range(100):
            if woken:
                break
            await asyncio.sleep(0.01)
        first.leave()
        second.leave()
        return woken

    assert asyncio.run(run()) == ["first"]


def test_a_worker_that_stops_beating_or_dies_holds_no_one_back(shares):
    async def run() -> tuple[bool, list[str]]:
        loop = asyncio.get_running_loop()
        first, second = Share(shares, 0, loop), Share(shares, 1, loop)
        first.join()
        second.join()
        first.opened()
        shares.set(1, BEAT, 1)  # the second's loop has not run for ages: its count of 0 does not count
        stalled = first.my_turn()
        second._beat.cancel()  # type: ignore[union-attr]
        second._heartbeat()  # it runs again
        woken: list[str] = []
        first.wait(lambda: woken.append("first"))
        shares.vacate(1)  # it died: the supervisor clears its entry and wakes those waiting
        for _ in range(100):
            if woken:
                break
            await asyncio.sleep(0.01)
        first.leave()
        second._beat.cancel()  # type: ignore[union-attr]
        return stalled, woken

    assert asyncio.run(run()) == (True, ["first"])


def test_a_worker_that_joined_twice_and_left_no_longer_counts(shares):
    """`leave` ends the worker's heartbeat: had a second `join` started a second one, a stopping worker
    would go on looking live at 0 connections, and the others would not accept for its whole drain."""

    async def run() -> list[int | None]:
        loop = asyncio.get_running_loop()
        first, second = Share(shares, 0, loop), Share(shares, 1, loop)
        first.join()
        first.join()
        second.join()
        first.leave()
        await asyncio.sleep(3 * BEAT_INTERVAL)  # beats that were still due would have run by now
        counts = shares.counts()
        second.leave()
        return counts

    assert asyncio.run(run())[0] is None


def test_a_worker_that_accepted_before_joining_counts_what_it_holds(shares):
    """Connections queued at a worker's start may be accepted before it joins the table: joining at 0
    would leave it never again its turn, and the other worker, seeing it at 0, stopped at one."""
    async def run() -> list[tuple[bool, bool]]:
        loop = asyncio.get_running_loop()
        first, second = Share(shares, 0, loop), Share(shares, 1, loop)
        for _ in range(3):
            first.opened()
        first.join()
        second.join()
        turns = [(first.my_turn(), second.my_turn())]
        for _ in range(3):
            second.opened()
        turns.append((first.my_turn(), second.my_turn()))
        first.leave()
        second.leave()
        return turns

    assert asyncio.run(run()) == [(False, True), (True, True)]


class Served(asyncio.Protocol):
    """The server's end of each connection: `made` and `lost` count them, in order."""

    def __init__(self, events: asyncio.Queue[str]) -> None:
        self.events = events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.put_nowait("made")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.put_nowait("lost")


async def _serve(listening: socket.socket, protocol_factory) -> asyncio.Server:
    return await asyncio.get_running_loop().create_server(protocol_factory, sock=listening)


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


@pytest.mark.parametrize("ceiling", [None, 1])
def test_a_workers_count_is_the_connections_it_holds(shares, ceiling):
    """Through the accept step (proxy/cli/listeners.py): a connection counts from accept to close, with or
    without the connection ceiling; one the ceiling refuses is never counted."""
    async def run() -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        listening = _listening()
        share = Share(shares, 0, loop)
        listeners = guard_accepts(loop)
        if ceiling is None:  # a share alone: no ceiling to count connections off when they close
            share.join()
            listeners.shares[listening.fileno()] = share
        else:
            limit_connections(listening, Capacity(ceiling, 1, 1024), loop, share)
        events: asyncio.Queue[str] = asyncio.Queue()
        server = await _serve(listening, lambda: Served(events))
        seen = []
        address = listening.getsockname()
        _, first = await asyncio.open_connection(*address)
        seen.append((await asyncio.wait_for(events.get(), WAIT), shares.get(0, COUNT)))
        if ceiling is not None:  # the ceiling is full: the next is answered 503, and not counted
            refused, refused_end = await asyncio.open_connection(*address)
            assert (await asyncio.wait_for(refused.readline(), WAIT)).startswith(b"HTTP/1.1 503")
            seen.append(("refused", shares.get(0, COUNT)))
            refused_end.close()
        first.close()
        seen.append((await asyncio.wait_for(events.get(), WAIT), shares.get(0, COUNT)))
        server.close()
        share.leave()
        return seen

    expected = [("made", 1), ("lost", 0)]
    if ceiling is not None:
        expected.insert(1, ("refused", 1))
    assert asyncio.run(run()) == expected


def test_a_worker_has_joined_when_it_accepts_its_first_connection(shares):
    """A connection queued before the worker serves is accepted at once when it does: by then the worker
    must be in the table, live, or the others would not count it while it accepts (review leftover)."""
    async def run() -> list[tuple[int, bool]]:
        loop = asyncio.get_running_loop()
        listening = _listening()
        queued = socket.create_connection(listening.getsockname())  # in the listen queue before any serving
        share = Share(shares, 0, loop)
        limit_connections(listening, Capacity(16, 1, 1024), loop, share)  # as the worker: then it serves
        seen: list[tuple[int, bool]] = []
        events: asyncio.Queue[str] = asyncio.Queue()

        def served() -> Served:  # called as the accept step hands over the connection
            seen.append((share.open, shares.counts()[0] is not None))
            return Served(events)

        server = await _serve(listening, served)
        assert await asyncio.wait_for(events.get(), WAIT) == "made"
        queued.close()
        assert await asyncio.wait_for(events.get(), WAIT) == "lost"
        server.close()
        share.leave()
        return seen

    assert asyncio.run(run()) == [(1, True)]
