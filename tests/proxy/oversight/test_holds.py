"""Holds: a held call sleeps until a decision made on another thread wakes it, or until its time ends."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

from proxy.oversight.holds import Holds

# Long enough that a missed wake-up shows as a False, never as a pass; a working wake-up is immediate.
NEVER = 30.0


async def until_held(holds: Holds, count: int) -> None:
    for _ in range(10_000):
        if holds.held >= count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{count} holds never registered; {holds.held} did")


def test_a_notify_from_another_thread_wakes_the_waiter():
    holds = Holds()

    async def scenario() -> tuple[bool, int, int]:
        waiter = asyncio.create_task(holds.wait("o-1", NEVER))
        await until_held(holds, 1)
        held_while_waiting = holds.held
        await asyncio.get_running_loop().run_in_executor(None, holds.notify, "o-1")
        return await waiter, held_while_waiting, holds.held

    woken, held_while_waiting, held_after = asyncio.run(scenario())
    assert woken is True
    assert (held_while_waiting, held_after) == (1, 0)


def test_a_notify_from_a_plain_thread_wakes_every_waiter_on_that_request():
    holds = Holds()

    async def scenario() -> list[bool]:
        waiters = [asyncio.create_task(holds.wait("o-1", NEVER)) for _ in range(3)]
        await until_held(holds, 3)
        reviewer = threading.Thread(target=holds.notify, args=("o-1",))
        reviewer.start()
        results = await asyncio.gather(*waiters)
        reviewer.join()
        return results

    assert asyncio.run(scenario()) == [True, True, True]
    assert holds.held == 0


def test_a_wait_that_is_never_notified_times_out():
    holds = Holds()
    assert asyncio.run(holds.wait("o-1", 0.05)) is False
    assert holds.held == 0


def test_a_notify_for_another_request_wakes_nobody():
    holds = Holds()

    async def scenario() -> bool:
        waiter = asyncio.create_task(holds.wait("o-1", 0.3))
        await until_held(holds, 1)
        await asyncio.to_thread(holds.notify, "o-2")
        return await waiter

    assert asyncio.run(scenario()) is False
    assert holds.held == 0


def test_a_notify_with_no_one_waiting_is_harmless():
    holds = Holds()
    holds.notify("o-1")  # before any hold ever ran: no loop yet
    assert asyncio.run(holds.wait("o-1", 0.01)) is False
    holds.notify("o-1")  # the loop of that hold is closed now

    async def later() -> bool:
        await asyncio.to_thread(holds.notify, "nobody")
        waiter = asyncio.create_task(holds.wait("o-1", NEVER))
        await until_held(holds, 1)
        holds.notify("o-1")
        return await waiter

    # An earlier, unmatched notify leaves nothing behind that would wake or break a later hold.
    assert asyncio.run(later()) is True
    assert holds.held == 0


def test_held_counts_each_waiting_call():
    holds = Holds()

    async def scenario() -> list[int]:
        seen = [holds.held]
        first = asyncio.create_task(holds.wait("o-1", NEVER))
        second = asyncio.create_task(holds.wait("o-1", NEVER))
        other = asyncio.create_task(holds.wait("o-2", NEVER))
        await until_held(holds, 3)
        seen.append(holds.held)
        holds.notify("o-2")
        await other
        seen.append(holds.held)
        holds.notify("o-1")
        await asyncio.gather(first, second)
        seen.append(holds.held)
        return seen

    assert asyncio.run(scenario()) == [0, 3, 2, 0]


def test_a_cancelled_hold_is_no_longer_counted():
    holds = Holds()

    async def scenario() -> int:
        waiter = asyncio.create_task(holds.wait("o-1", NEVER))
        await until_held(holds, 1)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        return holds.held

    assert asyncio.run(scenario()) == 0


def decided(version: int, status: str = "granted") -> Any:
    """A request as a deciding transaction leaves it: the holds read only its version (and pass it on)."""
    return SimpleNamespace(id="o-1", version=version, status=status)


def test_a_wake_up_brings_the_decided_request_to_the_waiter_and_the_newest_one_wins():
    holds = Holds()

    async def scenario() -> list[Any]:
        seen = []
        with holds.watching("o-1") as woken:
            await asyncio.to_thread(holds.notify, "o-1", decided(3))
            await asyncio.wait_for(woken.wait(), NEVER)
            seen.append(woken.take())
            seen.append(woken.take())  # taken once
            woken.clear()
            # From two threads, out of order: the older state arriving last does not replace the newer,
            # and a wake-up without a state (another process's change) keeps what was brought.
            holds.notify("o-1", decided(5, "released"))
            holds.notify("o-1", decided(4))
            holds.notify("o-1")
            await asyncio.wait_for(woken.wait(), NEVER)
            await asyncio.sleep(0)  # every wake-up queued has run
            seen.append(woken.take())
        return seen

    first, again, newest = asyncio.run(scenario())
    assert (first.version, again) == (3, None)
    assert (newest.version, newest.status) == (5, "released")
