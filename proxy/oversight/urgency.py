"""Reviewers' decisions first on a busy event loop.

The proxy's calls, the override API and the held calls share one asyncio loop. With traffic flowing, the
loop is never idle: each turn runs the callbacks that were ready when it began, in the order they were
scheduled, and what is scheduled meanwhile waits for the next turn behind everything ready then. A step
of an approval (the vote's hand-back from the writer, the held call's wake-up, its release, its connection
to the upstream) waits so behind other calls' steps, and an approval is some twenty such steps.

`ReviewersFirstLoop` keeps two lanes in the loop's ready queue: a callback scheduled in a context marked
urgent (`URGENT`, an active `Urgency`) runs before the others, in the turn it was scheduled in if that
turn has callbacks left, in the order urgent callbacks were scheduled; the others keep their order, and
those an urgent one displaces from a turn run first in the next. asyncio carries a context from a task to
what it schedules (its wake-ups, the tasks it starts, the callbacks it adds), so a mark set at the root of
the work reaches every step of it on the loop:

- an approver's request that changes something (approve, deny, ask; not the inbox's polling reads), once
  the approver is known (`mark_urgent`, from the API's authentication), for `APPROVER_FOR` seconds: its
  handler, the votes it casts, the holds it wakes. Not what comes before (accepting, reading,
  authenticating), which anyone who reaches the API's port can send;
- a held call, marked from when it subscribes (`Holds.watching`), once a decision committed on this loop
  wakes it (a wake-up carrying the decided request: `Holds.notify(..., decided=...)`), for `WOKEN_FOR`
  seconds: its release, its connection to the upstream (a task it starts) and its request there. A
  wake-up without a decision (another process's, a question, the expiry job) marks nothing;
- a unit of work done on the writer thread hands its result back in the awaiting task's context
  (`proxy.oversight.workflow.committed`), so a vote's and a release's commits come back in its lane.

What bounds it: a mark sends at most `MARK_BUDGET` callbacks ahead, and only until its time is up, so
whatever a marked context goes on to do (the released call's connection answering, streaming) waits its
turn like any call's; and marks come only from an approver's change or a decision. Not marked: work a
marked task hands to other threads through `asyncio.to_thread` or anyio (their hand-back comes in the
thread's context). A mark's lane is read when a callback is scheduled, so a context's callbacks queued
before its mark began and after may run in either order. Under the plain asyncio loop (stock
`mitmdump -s`, tests) the marks are kept and mean nothing.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Coroutine
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")

# Callbacks one mark may send ahead: an approval's whole way on the loop (the API's handler, the vote's
# hand-back, the hold's wake-up, release, connection and request upstream) is a few dozen; whatever a mark's
# context goes on to do past this (an upstream streaming its answer) waits its turn like any call.
MARK_BUDGET = 200
WOKEN_FOR = 2.0  # seconds a held call's steps go first after a decision wakes it: its way to the upstream
APPROVER_FOR = 10.0  # seconds an approver's change goes first: its vote, under load, waits for the writer


class Urgency:
    """A mark in a context: its next `budget` callbacks go first, until `until` (the monotonic clock); none
    before it is begun."""

    __slots__ = ("until", "budget")

    def __init__(self, lasting: float = 0.0, budget: int = MARK_BUDGET) -> None:
        self.until = time.monotonic() + lasting if lasting else 0.0
        self.budget = budget

    def begin(self, lasting: float) -> None:
        self.until = time.monotonic() + lasting

    @property
    def active(self) -> bool:
        return self.budget > 0 and time.monotonic() < self.until


URGENT: ContextVar[Urgency | None] = ContextVar("cedargate_urgent", default=None)


def mark_urgent(lasting: float = APPROVER_FOR) -> None:
    """Mark the running task's context urgent for `lasting` seconds: what it schedules from here on."""
    URGENT.set(Urgency(lasting))


class _Lanes(collections.deque[asyncio.Handle]):
    """asyncio's ready queue (`BaseEventLoop._ready`) with an urgent lane. The loop appends to it (from
    other threads too: `call_soon_threadsafe`), reads its length once a turn (`_run_once`: the number of
    callbacks the turn runs) and pops that many from the left: urgent callbacks first, those scheduled
    during the turn too, in the place of the others' last, which run first at the next turn."""

    def __init__(self) -> None:
        super().__init__()
        self.urgent: collections.deque[asyncio.Handle] = collections.deque()

    def append(self, handle: asyncio.Handle) -> None:
        mark = handle._context.get(URGENT)  # type: ignore[attr-defined]  # every Handle has its context
        if mark is not None and mark.active:
            mark.budget -= 1  # from other threads too: a callback more or less, never a race that matters
            self.urgent.append(handle)
        else:
            super().append(handle)

    def popleft(self) -> asyncio.Handle:
        # Only the loop's thread pops (other threads only append), and the turn pops no more than the length
        # it read: when the urgent lane is empty, the other is not.
        if self.urgent:
            return self.urgent.popleft()
        return super().popleft()

    def __len__(self) -> int:
        return len(self.urgent) + super().__len__()

    def __bool__(self) -> bool:
        return bool(self.urgent) or super().__len__() > 0

    def clear(self) -> None:
        self.urgent.clear()
        super().clear()


class ReviewersFirstLoop(asyncio.SelectorEventLoop):
    """The selector event loop, with the urgent lane in its ready queue."""

    def __init__(self) -> None:
        super().__init__()
        self._ready = _Lanes()


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on a `ReviewersFirstLoop`."""
    with asyncio.Runner(loop_factory=ReviewersFirstLoop) as runner:
        return runner.run(main)
