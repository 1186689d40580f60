"""Where held calls wait: one asyncio event per override request, woken when a human decides.

The waiter always re-reads the override from the store after waking: the wake-up is only a hint, so
a lost or spurious one costs a little latency, never a wrong release. Reviewers' decisions arrive on
other threads (the API's worker threads), hence `notify` is thread-safe.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict


class Holds:
    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def held(self) -> int:
        return sum(len(events) for events in self._events.values())

    async def wait(self, override_id: str, timeout: float) -> bool:
        """Wait until notified about this override or `timeout` passes; True if notified."""
        self._loop = asyncio.get_running_loop()
        event = asyncio.Event()
        self._events[override_id].add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            waiting = self._events.get(override_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._events[override_id]

    def notify(self, override_id: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._wake, override_id)

    def _wake(self, override_id: str) -> None:
        for event in list(self._events.get(override_id, ())):
            event.set()
