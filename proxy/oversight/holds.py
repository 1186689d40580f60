"""Where held calls wait: one asyncio event per waiter, woken when a human decides or the request expires.

A waiter subscribes *before* it reads the override's status, so a decision committed between the read
and the wait still wakes it: no wake-up is lost, and no held call needs to poll the store. The waiter
re-reads the override after waking, except when the wake-up carries the request as the deciding vote
committed it (`notify(..., decided=...)`): a granted request then goes straight to its release, saving
a read and two thread hops on the approval's way upstream, and the release's conditional update is the
check that counts (should the grant be gone meanwhile, the hold reads the request and answers from what
it finds). Reviewers' decisions arrive on the event loop (the API's approve and deny, `vote_soon`) and
on other threads (a vote with changes, a question, the expiry job, and `proxy.oversight.wakeups` for
decisions made by another process), hence `notify` and `waiting` are thread-safe.

The number of held calls that have slept (each has by then built what it keeps) and not yet ended is
told to the process's `HeldHeap`, if it has one (`proxy.oversight.heap`), which keeps long holds out of
the garbage collector's full passes: counted up at a hold's first sleep and down when its `watching`
ends, so a wake-up that finds no decision (another process's change, a retry while the store fails)
is not taken for a call that ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.oversight.heap import HeldHeap
    from proxy.oversight.overrides import Override


class Woken(asyncio.Event):
    """A waiter's event, and the newest decided state a wake-up brought with it (None: read the store)."""

    def __init__(self) -> None:
        super().__init__()
        self.decided: Override | None = None
        self.slept = False  # has slept in `Holds.sleep`: counted for the heap until its `watching` ends

    def take(self) -> Override | None:
        decided, self.decided = self.decided, None
        return decided


class Holds:
    def __init__(self, heap: HeldHeap | None = None) -> None:
        self._events: dict[str, set[Woken]] = defaultdict(set)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()  # `_events` is changed on the loop and read by `waiting` elsewhere
        self._held = 0  # waiters now: read per escalation against max_held_calls, so counted, not summed
        self.heap = heap
        self._slept = 0  # holds that have slept and not ended, told to the heap: on the event loop only

    @property
    def held(self) -> int:
        return self._held

    def waiting(self) -> set[str]:
        """The ids of the override requests some call waits on now."""
        with self._lock:
            return set(self._events)

    @contextlib.contextmanager
    def watching(self, override_id: str) -> Iterator[Woken]:
        """An event set whenever this override may have changed, for as long as the block runs."""
        self._loop = asyncio.get_running_loop()
        event = Woken()
        with self._lock:
            self._events[override_id].add(event)
            self._held += 1
        try:
            yield event
        finally:
            with self._lock:
                self._held -= 1
                waiting = self._events.get(override_id)
                if waiting is not None:
                    waiting.discard(event)
                    if not waiting:
                        del self._events[override_id]
            if event.slept:  # the call ends here, however often it was woken
                self._slept -= 1
                if self.heap is not None:
                    self.heap.held(self._slept)

    async def sleep(self, woken: Woken, timeout: float) -> bool:
        """Wait on a hold's event (from `watching`) until notified (True) or `timeout` passes.

        The heap counts a hold from its first sleep rather than from its subscription: a hold has built
        what it keeps for its whole wait (its read of the request included) only once it sleeps, and in a
        flood of escalations the reads lag far behind the subscriptions.
        """
        if not woken.slept:
            woken.slept = True
            self._slept += 1
            if self.heap is not None:
                self.heap.held(self._slept)
        return await wait_for_event(woken, timeout)

    async def wait(self, override_id: str, timeout: float) -> bool:
        """Wait until notified about this override or `timeout` passes; True if notified."""
        with self.watching(override_id) as woken:
            return await self.sleep(woken, timeout)

    def notify(self, override_id: str, decided: Override | None = None) -> None:
        """Wake the holds on this request; `decided`: the request as the transaction that decided it left
        it (committed), so a hold need not read it again."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._wake, override_id, decided)

    def _wake(self, override_id: str, decided: Override | None = None) -> None:
        with self._lock:
            events = list(self._events.get(override_id, ()))
        for event in events:
            # Wake-ups from several threads may arrive out of order: the newest state (by its version,
            # which every change of status moves on) is kept, and a wake-up without one keeps it too.
            if decided is not None and (event.decided is None or event.decided.version <= decided.version):
                event.decided = decided
            event.set()


async def wait_for_event(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
        return True
    except TimeoutError:
        return False
