"""Workers taking turns to accept (proxy/cli/balance.py): two workers' entries in one table, on one loop.

The real processes are in tests/e2e/test_workers.py (16 connections opened together land 8/8); here the
rules themselves: who may accept, who is woken, and a worker that stops beating or dies."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from proxy.cli.balance import BEAT, ConnectionShares, Share


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
