"""HeldHeap: what long-held calls leave in memory is kept out of the collector's full passes while they are
held, and handed back (and reclaimed) once most of them have ended."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from proxy.oversight.heap import HeldHeap
from proxy.oversight.holds import Holds


class Remains:
    """What a held call keeps alive while it waits; in a cycle, as a flow and its connection are."""

    def __init__(self) -> None:
        self.itself = self


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    """The collector is the process's: whatever a test froze is handed back."""
    yield
    gc.unfreeze()


def tracked(obj: object) -> bool:
    """Whether the collector's passes (any generation, not the frozen) would walk `obj`."""
    return any(o is obj for o in gc.get_objects())


NEVER = 30.0  # a hold's time: these holds end by a wake-up


async def held(holds: Holds, override_id: str, remains: dict[str, weakref.ref[Remains]],
               decided: set[str] | None = None) -> None:
    """A held call: keeps a `Remains` (noted in `remains`) while it waits on its request. It ends at its
    first wake-up, or with `decided`, at the first once its request is in it: a wake-up without a
    decision sends it back to sleep, as `Oversight._hold` does."""
    kept = Remains()
    remains[override_id] = weakref.ref(kept)
    with holds.watching(override_id) as woken:
        while await holds.sleep(woken, NEVER) and decided is not None and override_id not in decided:
            woken.clear()
    del kept


async def until_held(holds: Holds, count: int) -> None:
    """Until `count` calls are held, each asleep in its wait."""
    while holds.held < count:
        await asyncio.sleep(0)
    await asyncio.sleep(0)


def test_held_calls_past_the_marks_are_frozen_and_handed_back_once_most_have_ended():
    heap = HeldHeap(first=4, growth=2.0, thaw=0.25)
    holds = Holds(heap)
    remains: dict[str, weakref.ref[Remains]] = {}
    seen: dict[str, object] = {}

    async def scenario() -> None:
        calls = [asyncio.create_task(held(holds, f"o-{n}", remains)) for n in range(8)]
        await until_held(holds, 8)
        seen["freezes while 8 held"] = heap.freezes
        seen["walked while held"] = [tracked(remains[f"o-{n}"]()) for n in range(4)]
        for n in range(6):  # 2 of 8 left: a quarter of the 8 last frozen
            holds.notify(f"o-{n}")
        await asyncio.gather(*calls[:6])
        seen["thaws after 6 ended"] = heap.thaws
        seen["frozen after 6 ended"] = gc.get_freeze_count()
        for n in range(6, 8):
            holds.notify(f"o-{n}")
        await asyncio.gather(*calls[6:])

    asyncio.run(scenario())
    # Frozen at 4 held and again at 8 (twice the 4): the first four calls' objects are out of the passes.
    assert seen["freezes while 8 held"] == 2
    assert seen["walked while held"] == [False] * 4
    # Down to a quarter: everything is the collector's again, and the cycles the ended calls left are reclaimed.
    assert seen["thaws after 6 ended"] == 1 and seen["frozen after 6 ended"] == 0
    gc.collect()
    assert [ref() for ref in remains.values()] == [None] * 8


def test_a_few_held_calls_are_never_frozen():
    heap = HeldHeap(first=4)
    holds = Holds(heap)

    async def scenario() -> int:
        waiters = [asyncio.create_task(holds.wait(f"o-{n}", 30.0)) for n in range(3)]
        while holds.held < 3:
            await asyncio.sleep(0)
        frozen = gc.get_freeze_count()
        for n in range(3):
            holds.notify(f"o-{n}")
        await asyncio.gather(*waiters)
        return frozen

    assert asyncio.run(scenario()) == 0
    assert (heap.freezes, heap.thaws) == (0, 0)


def test_holding_goes_on_as_before_without_a_heap():
    holds = Holds()

    async def scenario() -> bool:
        waiter = asyncio.create_task(holds.wait("o-1", 30.0))
        while holds.held < 1:
            await asyncio.sleep(0)
        holds.notify("o-1")
        return await waiter

    assert asyncio.run(scenario()) is True
    assert gc.get_freeze_count() == 0


def test_held_calls_past_the_last_mark_are_frozen_once_they_settle():
    heap = HeldHeap(first=4, growth=2.0, thaw=0.25, settle=0.05)
    holds = Holds(heap)
    remains: dict[str, weakref.ref[Remains]] = {}
    seen: dict[str, object] = {}

    async def scenario() -> None:
        # marks at 4 and 8: 6 reach one
        calls = [asyncio.create_task(held(holds, f"o-{n}", remains)) for n in range(6)]
        await until_held(holds, 6)
        seen["walked before settling"] = [tracked(ref()) for ref in remains.values()]
        await asyncio.sleep(0.2)
        seen["walked once settled"] = [tracked(ref()) for ref in remains.values()]
        seen["frozen at"] = heap.frozen_at
        for n in range(6):
            holds.notify(f"o-{n}")
        await asyncio.gather(*calls)

    asyncio.run(scenario())
    # Frozen at the mark of 4; the two past it stayed in the passes until they had settled.
    assert seen["walked before settling"] == [False] * 4 + [True] * 2
    assert seen["walked once settled"] == [False] * 6 and seen["frozen at"] == 6
    gc.collect()
    assert [ref() for ref in remains.values()] == [None] * 6


def test_calls_ending_while_as_many_are_held_again_are_handed_back_and_reclaimed():
    """A steady level of held calls, each approved and replaced by a new one: the level never falls, yet
    what the ended calls left in cycles is reclaimed, not kept frozen for as long as the process runs."""
    heap = HeldHeap(first=4, growth=2.0, thaw=0.25, settle=0.05)
    holds = Holds(heap)
    remains: dict[str, weakref.ref[Remains]] = {}
    seen: dict[str, object] = {}

    async def scenario() -> None:
        calls = {f"o-{n}": asyncio.create_task(held(holds, f"o-{n}", remains)) for n in range(8)}
        await until_held(holds, 8)
        await asyncio.sleep(0.2)
        seen["frozen at"], seen["thaws before"] = heap.frozen_at, heap.thaws
        for n in range(8, 14):  # six of the eight end, one at a time, each replaced by a new call
            done = f"o-{n - 8}"
            holds.notify(done)
            await calls.pop(done)
            calls[f"o-{n}"] = asyncio.create_task(held(holds, f"o-{n}", remains))
            await until_held(holds, 8)
        seen["thaws after 6 ended"] = heap.thaws
        seen["held"] = holds.held
        gc.collect()
        seen["ended and still alive"] = [remains[f"o-{n}"]() is not None for n in range(6)]
        for override_id in list(calls):
            holds.notify(override_id)
        await asyncio.gather(*calls.values())

    asyncio.run(scenario())
    assert seen["frozen at"] == 8 and seen["thaws before"] == 0
    assert seen["thaws after 6 ended"] == 1 and seen["held"] == 8
    assert seen["ended and still alive"] == [False] * 6


def test_wake_ups_without_a_decision_are_not_counted_as_calls_ended():
    """A held call woken with nothing decided (another process's change, a retry while the store fails)
    sleeps again: it has not ended, and wake-ups alone never hand the frozen calls back."""
    heap = HeldHeap(first=4, growth=2.0, thaw=0.25)
    holds = Holds(heap)
    remains: dict[str, weakref.ref[Remains]] = {}
    decided: set[str] = set()
    seen: dict[str, object] = {}

    async def scenario() -> None:
        calls = [asyncio.create_task(held(holds, f"o-{n}", remains, decided)) for n in range(8)]
        await until_held(holds, 8)
        seen["frozen at"] = heap.frozen_at
        for _ in range(2):  # each of six woken twice, deciding nothing: as many wake-ups as 12 calls ending
            for n in range(6):
                holds.notify(f"o-{n}")
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        seen["thaws after the wake-ups"] = heap.thaws
        seen["walked after the wake-ups"] = [tracked(remains[f"o-{n}"]()) for n in range(8)]
        decided.update(f"o-{n}" for n in range(6))  # now six are decided: they end, and that counts
        for n in range(6):
            holds.notify(f"o-{n}")
        await asyncio.gather(*calls[:6])
        seen["thaws after 6 ended"] = heap.thaws
        decided.update(("o-6", "o-7"))
        for n in range(6, 8):
            holds.notify(f"o-{n}")
        await asyncio.gather(*calls[6:])

    asyncio.run(scenario())
    assert seen["frozen at"] == 8
    assert seen["thaws after the wake-ups"] == 0
    assert seen["walked after the wake-ups"] == [False] * 8
    assert seen["thaws after 6 ended"] == 1
