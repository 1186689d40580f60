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


def test_held_calls_past_the_marks_are_frozen_and_handed_back_once_most_have_ended():
    heap = HeldHeap(first=4, growth=2.0, thaw=0.25)
    holds = Holds(heap)
    remains: list[weakref.ref[Remains]] = []
    seen: dict[str, object] = {}

    async def held(override_id: str) -> None:
        kept = Remains()
        remains.append(weakref.ref(kept))
        with holds.watching(override_id) as woken:
            await holds.sleep(woken, 30.0)
        del kept

    async def scenario() -> None:
        calls = [asyncio.create_task(held(f"o-{n}")) for n in range(8)]
        while holds.held < 8:
            await asyncio.sleep(0)
        await asyncio.sleep(0)  # each asleep in its wait
        seen["freezes while 8 held"] = heap.freezes
        seen["walked while held"] = [tracked(ref()) for ref in remains[:4]]
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
    assert [ref() for ref in remains] == [None] * 8


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
    remains: list[weakref.ref[Remains]] = []
    seen: dict[str, object] = {}

    async def held(override_id: str) -> None:
        kept = Remains()
        remains.append(weakref.ref(kept))
        with holds.watching(override_id) as woken:
            await holds.sleep(woken, 30.0)
        del kept

    async def scenario() -> None:
        calls = [asyncio.create_task(held(f"o-{n}")) for n in range(6)]  # marks at 4 and 8: 6 reach one
        while holds.held < 6:
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        seen["walked before settling"] = [tracked(ref()) for ref in remains]
        await asyncio.sleep(0.2)
        seen["walked once settled"] = [tracked(ref()) for ref in remains]
        seen["frozen at"] = heap.frozen_at
        for n in range(6):
            holds.notify(f"o-{n}")
        await asyncio.gather(*calls)

    asyncio.run(scenario())
    # Frozen at the mark of 4; the two past it stayed in the passes until they had settled.
    assert seen["walked before settling"] == [False] * 4 + [True] * 2
    assert seen["walked once settled"] == [False] * 6 and seen["frozen at"] == 6
    gc.collect()
    assert [ref() for ref in remains] == [None] * 6


def test_calls_ending_while_as_many_are_held_again_are_handed_back_and_reclaimed():
    """A steady level of held calls, each approved and replaced by a new one: the level never falls, yet
    what the ended calls left in cycles is reclaimed, not kept frozen for as long as the process runs."""
    heap = HeldHeap(first=4, growth=2.0, thaw=0.25, settle=0.05)
    holds = Holds(heap)
    ended: list[weakref.ref[Remains]] = []
    seen: dict[str, object] = {}

    async def held(override_id: str) -> None:
        kept = Remains()
        with holds.watching(override_id) as woken:
            await holds.sleep(woken, 30.0)
        ended.append(weakref.ref(kept))
        del kept

    async def scenario() -> None:
        calls = {f"o-{n}": asyncio.create_task(held(f"o-{n}")) for n in range(8)}
        while holds.held < 8:
            await asyncio.sleep(0)
        await asyncio.sleep(0.2)
        seen["frozen at"], seen["thaws before"] = heap.frozen_at, heap.thaws
        for n in range(8, 14):  # six of the eight end, one at a time, each replaced by a new call
            done = f"o-{n - 8}"
            holds.notify(done)
            await calls.pop(done)
            calls[f"o-{n}"] = asyncio.create_task(held(f"o-{n}"))
            while holds.held < 8:
                await asyncio.sleep(0)
            await asyncio.sleep(0)
        seen["thaws after 6 ended"] = heap.thaws
        seen["held"] = holds.held
        gc.collect()
        seen["ended and still alive"] = [ref() is not None for ref in ended]
        for override_id in list(calls):
            holds.notify(override_id)
        await asyncio.gather(*calls.values())

    asyncio.run(scenario())
    assert seen["frozen at"] == 8 and seen["thaws before"] == 0
    assert seen["thaws after 6 ended"] == 1 and seen["held"] == 8
    assert seen["ended and still alive"] == [False] * 6
