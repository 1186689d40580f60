"""Where held calls wait: one asyncio event per waiter, woken when a human decides or the request expires.

A waiter subscribes *before* it reads the override's status, so a decision committed between the read
and the wait still wakes it: no wake-up is lost, and no held call needs to poll the store. The waiter
always re-reads the override after waking; a wake-up is only a hint. Reviewers' decisions arrive on
other threads (the API's worker threads, and `proxy.oversight.wakeups` for decisions made by another
process), hence `notify` and `waiting` are thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import defaultdict
from collections.abc import Iterator


class Holds:
    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()  # `_events` is changed on the loop and read by `waiting` elsewhere
        self._held = 0  # waiters now: read per escalation against max_held_calls, so counted, not summed

    @property
    def held(self) -> int:
        return self._held

    def waiting(self) -> set[str]:
        """The ids of the override requests some call waits on now."""
        with self._lock:
            return set(self._events)

    @contextlib.contextmanager
    def watching(self, override_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever this override may have changed, for as long as the block runs."""
        self._loop = asyncio.get_running_loop()
        event = asyncio.Event()
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

    async def wait(self, override_id: str, timeout: float) -> bool:
        """Wait until notified about this override or `timeout` passes; True if notified."""
        with self.watching(override_id) as woken:
            return await wait_for_event(woken, timeout)

    def notify(self, override_id: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._wake, override_id)

    def _wake(self, override_id: str) -> None:
        with self._lock:
            events = list(self._events.get(override_id, ()))
        for event in events:
            event.set()


async def wait_for_event(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
        return True
    except TimeoutError:
        return False
