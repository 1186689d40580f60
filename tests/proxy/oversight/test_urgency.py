"""Reviewers' decisions first: on a `ReviewersFirstLoop`, urgent callbacks run before the others, each lane
in its own order, within what a mark may send ahead (its budget, its time); a held call's steps go first
once a decision wakes it; a commit comes back from the writer in its awaiter's lane."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

from proxy.oversight.holds import Holds
from proxy.oversight.urgency import URGENT, Urgency, run
from proxy.oversight.workflow import committed

MINUTE = 60.0


def in_context(urgency: Urgency | None) -> contextvars.Context:
    context = contextvars.copy_context()
    context.run(URGENT.set, urgency)
    return context


def decided(version: int = 1) -> Any:
    """What a deciding vote hands `Holds.notify` (only its version is read there)."""
    return SimpleNamespace(version=version)


def test_urgent_callbacks_run_before_those_already_waiting_each_lane_in_its_order():
    ran: list[str] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        urgent, calm = in_context(Urgency(MINUTE)), in_context(None)
        for i in range(3):
            loop.call_soon(ran.append, f"call-{i}", context=calm)
        for i in range(2):
            loop.call_soon(ran.append, f"reviewer-{i}", context=urgent)
        loop.call_soon(ran.append, "call-3", context=calm)
        await asyncio.sleep(0.01)

    run(scenario())
    assert ran == ["reviewer-0", "reviewer-1", "call-0", "call-1", "call-2", "call-3"]


def test_an_urgent_callback_scheduled_during_a_turn_runs_next_in_the_place_of_the_turns_last():
    ran: list[str] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        urgent = in_context(Urgency(MINUTE))

        def first() -> None:
            ran.append("call-0")
            loop.call_soon(ran.append, "reviewer", context=urgent)
            loop.call_soon(ran.append, "call-0's own next step")

        loop.call_soon(first)
        loop.call_soon(ran.append, "call-1")
        loop.call_soon(ran.append, "call-2")
        await asyncio.sleep(0.01)

    run(scenario())
    # The reviewer's step goes right after the callback that scheduled it; the turn ran three callbacks, as
    # many as were ready when it began, so call-2 ran first in the next.
    assert ran == ["call-0", "reviewer", "call-1", "call-2", "call-0's own next step"]


def test_urgent_work_that_never_ends_goes_ahead_only_as_far_as_its_budget():
    steps = {"urgent": 0, "calm": 0}
    calm_when_urgent_ended: list[int] = []

    async def loop_forever(lane: str, count: int) -> None:
        for _ in range(count):
            steps[lane] += 1
            await asyncio.sleep(0)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        calm = loop.create_task(loop_forever("calm", 100_000))
        urgent = loop.create_task(loop_forever("urgent", 1000), context=in_context(Urgency(MINUTE, budget=50)))
        await urgent
        calm_when_urgent_ended.append(steps["calm"])
        calm.cancel()

    run(scenario())
    # Its first 50 steps ran back to back; the rest took turns with the calm task's, one each.
    assert 940 <= calm_when_urgent_ended[0] <= 960


def test_a_mark_not_begun_over_or_spent_changes_no_order():
    ran: list[str] = []
    for_a_moment = Urgency()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        for_a_moment.begin(0.02)
        assert for_a_moment.active
        await asyncio.sleep(0.1)
        marks = (("call", None), ("not begun", Urgency()), ("over", for_a_moment),
                 ("spent", Urgency(MINUTE, budget=0)))
        for name, mark in marks:
            loop.call_soon(ran.append, name, context=in_context(mark))
        await asyncio.sleep(0.01)

    run(scenario())
    assert not for_a_moment.active
    assert ran == ["call", "not begun", "over", "spent"]


def test_the_plain_asyncio_loop_keeps_its_order_whatever_the_marks():
    ran: list[str] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.call_soon(ran.append, "call")
        loop.call_soon(ran.append, "reviewer", context=in_context(Urgency(MINUTE)))
        await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert ran == ["call", "reviewer"]


def test_a_marked_task_and_the_tasks_it_starts_go_first_at_every_step():
    ran: list[str] = []

    async def steps(name: str, count: int) -> None:
        for i in range(count):
            ran.append(f"{name}-{i}")
            await asyncio.sleep(0)

    async def reviewer() -> None:
        await asyncio.get_running_loop().create_task(steps("started by the API", 2))
        await steps("API", 2)

    async def scenario() -> None:
        calls = [asyncio.create_task(steps(f"call{n}", 3)) for n in range(2)]
        await asyncio.sleep(0)  # the calls' first steps have run
        api = asyncio.get_running_loop().create_task(reviewer(), context=in_context(Urgency(MINUTE)))
        await asyncio.gather(api, *calls)

    run(scenario())
    # Once started, the API's task and the one it started ran every step before the calls' next ones.
    assert ran == ["call0-0", "call1-0", "started by the API-0", "started by the API-1", "API-0", "API-1",
                   "call0-1", "call1-1", "call0-2", "call1-2"]


async def held(holds: Holds, ran: list[str]) -> None:
    assert await holds.wait("o-1", 30.0)
    ran.append("released")
    await asyncio.sleep(0)
    ran.append("sent upstream")


async def busy(n: int, ran: list[str]) -> None:
    for i in range(4):
        ran.append(f"call{n}-{i}")
        await asyncio.sleep(0)


def woken_while_busy(notify) -> list[str]:
    """A held call woken by `notify(holds)` while three calls run steps: the order everything ran in."""
    holds = Holds()
    ran: list[str] = []

    async def scenario() -> None:
        hold = asyncio.create_task(held(holds, ran))
        while holds.held < 1:
            await asyncio.sleep(0)
        calls = [asyncio.create_task(busy(n, ran)) for n in range(3)]
        await asyncio.sleep(0)
        notify(holds)
        await asyncio.gather(hold, *calls)

    run(scenario())
    return ran


def test_a_held_call_woken_with_a_decision_goes_ahead_of_the_calls_on_the_loop():
    ran = woken_while_busy(lambda holds: holds.notify("o-1", decided()))  # as the API's approve does
    woke = ran.index("released")
    # From its wake-up on, the held call's steps ran back to back, ahead of the calls' waiting steps.
    assert ran[woke + 1] == "sent upstream"
    assert ran.index("sent upstream") < ran.index("call0-2")


def test_a_wake_up_without_a_decision_marks_nothing():
    ran = woken_while_busy(lambda holds: holds.notify("o-1"))  # another process's change, a question
    assert ran.index("released") > ran.index("call2-2")


def test_a_decision_that_comes_before_the_hold_sleeps_still_marks_it_and_the_mark_ends():
    holds = Holds()
    seen: list[bool] = []

    async def scenario() -> None:
        with holds.watching("o-1") as woken:
            holds.notify("o-1", decided())  # between the subscription and the sleep (the hold's read)
            await asyncio.sleep(0.01)
            assert await holds.sleep(woken, 30.0)
            seen.append(URGENT.get() is woken.urgency and woken.urgency.active)
            woken.urgency.until = time.monotonic()  # as WOKEN_FOR passing would
            seen.append(woken.urgency.active)

    run(scenario())
    assert seen == [True, False]


def test_a_decision_from_another_thread_marks_the_hold_too():
    def from_a_thread(holds: Holds) -> None:  # a vote with changes, decided on a worker thread
        thread = threading.Thread(target=holds.notify, args=("o-1", decided()))
        thread.start()
        thread.join()

    ran = woken_while_busy(from_a_thread)
    assert ran[ran.index("released") + 1] == "sent upstream"


def test_a_commit_handed_back_from_the_writer_thread_runs_in_the_awaiting_tasks_lane():
    ran: list[str] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        unit: Future[str] = Future()

        async def reviewer() -> None:
            ran.append(await committed(unit))

        waiting = loop.create_task(reviewer(), context=in_context(Urgency(MINUTE)))
        await asyncio.sleep(0)
        # Calls' steps queued while the writer commits: the hand-back still goes first.
        for i in range(5):
            loop.call_soon(ran.append, f"call-{i}")
        thread = threading.Thread(target=unit.set_result, args=("vote committed",))
        thread.start()
        thread.join()
        await waiting

    run(scenario())
    assert ran == ["vote committed", "call-0", "call-1", "call-2", "call-3", "call-4"]
