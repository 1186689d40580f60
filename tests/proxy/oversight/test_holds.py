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


def counting_timers(loop: asyncio.AbstractEventLoop) -> list[float]:
    """The times of the timers set on `loop` from now on (`call_later` sets them through `call_at`)."""
    set_at: list[float] = []
    call_at = loop.call_at

    def counted(when: float, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        set_at.append(when)
        return call_at(when, *args, **kwargs)

    loop.call_at = counted  # type: ignore[method-assign]
    return set_at


def test_holds_share_the_wheels_timer_and_none_ends_before_its_deadline():
    holds = Holds(tick=0.05)
    timeouts = [0.01 * (n % 25 + 1) for n in range(50)]  # 50 holds, due within 0.25 s: 5 or 6 buckets
    ended: list[tuple[float, float, bool]] = []  # (deadline, when it ended, woken)

    async def held(override_id: str, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        woken = await holds.wait(override_id, timeout)
        ended.append((deadline, loop.time(), woken))

    async def scenario() -> list[float]:
        timers = counting_timers(asyncio.get_running_loop())
        await asyncio.gather(*(held(f"o-{n}", timeout) for n, timeout in enumerate(timeouts)))
        return timers

    loop = asyncio.new_event_loop()
    try:
        timers = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert len(ended) == 50 and not any(woken for _, _, woken in ended)
    assert all(at >= deadline for deadline, at, _ in ended)  # never early
    # One timer a bucket at most (each set when the one before it has run), not one a hold.
    assert 1 <= len(timers) <= 7
    assert holds.held == 0


def test_a_hold_woken_or_cancelled_before_its_time_leaves_the_others_their_time():
    holds = Holds(tick=0.01)

    async def scenario() -> list[bool]:
        woken = asyncio.create_task(holds.wait("o-1", NEVER))
        cancelled = asyncio.create_task(holds.wait("o-2", 0.05))
        expiring = asyncio.create_task(holds.wait("o-3", 0.1))
        await until_held(holds, 3)
        holds.notify("o-1")
        cancelled.cancel()
        results = [await woken, await expiring]
        await asyncio.gather(cancelled, return_exceptions=True)
        return results

    assert asyncio.run(scenario()) == [True, False]
    assert holds.held == 0


def test_holds_in_a_later_event_loop_still_end_at_their_time():
    """Tests (and a restart in one process) run several loops: a wheel's timer set on a closed loop must
    not stand in for one on the new loop."""
    holds = Holds(tick=0.01)

    async def woken_early() -> bool:
        waiter = asyncio.create_task(holds.wait("o-1", 0.05))  # sets the wheel's timer on this loop
        await until_held(holds, 1)
        holds.notify("o-1")
        return await waiter

    async def expires() -> bool:
        return await asyncio.wait_for(holds.wait("o-2", 0.2), NEVER)  # due after that closed loop's timer

    assert asyncio.run(woken_early()) is True
    assert asyncio.run(expires()) is False


def test_a_hold_without_end_waits_for_its_wake_up():
    holds = Holds()

    async def scenario() -> bool:
        waiter = asyncio.create_task(holds.wait("o-1", float("inf")))
        await until_held(holds, 1)
        holds.notify("o-1")
        return await waiter

    assert asyncio.run(scenario()) is True


def test_holds_ended_early_one_after_another_leave_no_entries_in_the_wheel():
    """Approvals that each end the only hold of its bucket: every such hold left a bucket number in the
    wheel's heap until its deadline (one entry per hold, up to hold_max_wait: rate x wait ints)."""
    holds = Holds()

    async def scenario() -> int:
        for n in range(500):
            waiter = asyncio.create_task(holds.wait(f"o-{n}", 300.0))
            while holds.held < 1:
                await asyncio.sleep(0)
            await asyncio.sleep(0)  # asleep in the wheel
            holds.notify(f"o-{n}")
            assert await waiter is True
        return sum(len(wheel._buckets) for wheel in holds._wheels.values())

    # At most the buckets 500 holds begun within a second or two can fall in (0.1 s each), not 500.
    assert asyncio.run(scenario()) <= 50


def test_a_hold_of_a_huge_finite_wait_holds_rather_than_fails():
    """hold_max_wait accepts any float >= 0: 1e308 s (YAML 1.0e+308) made math.ceil(deadline / tick)
    overflow, and every escalated call was refused as 'could not be handled' (41b32e5 held it)."""
    holds = Holds()

    async def scenario() -> bool:
        waiter = asyncio.create_task(holds.wait("o-1", 1e308))
        await asyncio.sleep(0.05)
        assert holds.held == 1
        holds.notify("o-1")
        return await waiter

    assert asyncio.run(scenario()) is True


def test_a_hold_on_a_loop_still_running_keeps_its_deadline_when_another_loop_holds_too():
    """Two live loops on one Holds: the second loop's first hold cleared the wheel, and the first loop's
    hold never ended (no wake-up came)."""
    holds = Holds(tick=0.01)
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        short = first.create_task(holds.wait("o-1", 0.1))
        first.run_until_complete(asyncio.sleep(0.01))
        other = second.create_task(holds.wait("o-2", 30.0))
        second.run_until_complete(asyncio.sleep(0.01))
        ended = first.run_until_complete(asyncio.wait({short}, timeout=2.0))[0]
        assert short in ended and short.result() is False
    finally:
        for loop, task in ((first, short), (second, other)):
            task.cancel()
            loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
            loop.close()
