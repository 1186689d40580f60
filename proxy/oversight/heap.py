"""Keeping held calls out of Python's full garbage collections, so approvals are not paused behind them.

A held call is a few hundred objects the collector tracks (its connection's tasks and coroutines, the
flow, the verdict, the hold's own waiters): at 10,000 held, several million, and a full (generation 2)
collection walks every one of them while the event loop waits: 1.2-1.7 s at 2,000 held on a busy
2-core machine, long enough to stall every approval, every allowed call and `/healthz` behind it.
Those objects live as long as their hold (minutes), so walking them again and again finds nothing.

`HeldHeap` moves them out of the collector's reach with `gc.freeze()` (which only relinks lists: no
pause): once at start-up (modules, policies, the core), then each time the number of held calls asleep
in their wait (`Holds.sleep`: by then each has built what it keeps) reaches a new mark, `GROWTH` times
the count at the last freeze (at least `FIRST`), so a flood of 10,000 holds is frozen about twenty
times, not once per call. Frozen objects are still freed by reference counting when their call ends;
only cyclic garbage among them waits (measured at about 19 objects per released call). So that this
stays bounded, everything is handed back to the collector (`gc.unfreeze()`) once the calls asleep fall
to `THAW` of the count last frozen: the full collection that follows walks the few calls still held,
and reclaims what the ended ones left.

One per process (the collector is the process's): `cedargate run` and each `--workers` process start one;
the runtime alone (tests, `mitmdump -s`) has none, and holding works the same without it.
"""

from __future__ import annotations

import gc
import logging
import math

log = logging.getLogger(__name__)

FIRST = 200  # held calls: below this a full collection is short, and freezing would gain nothing
GROWTH = 1.25  # the next freeze when this many times the calls last frozen are held
THAW = 0.25  # unfreeze once the calls held fall to this share of the calls last frozen


class HeldHeap:
    def __init__(self, first: int = FIRST, growth: float = GROWTH, thaw: float = THAW) -> None:
        self.first, self.growth, self.thaw = first, growth, thaw
        self.frozen_at = 0  # held calls at the last freeze; 0 when nothing held is frozen
        self.freezes = 0  # since start, for /status-style reporting and tests
        self.thaws = 0
        self._next = first

    def started(self) -> None:
        """Freeze what start-up built: it lives as long as the process."""
        gc.freeze()

    def held(self, count: int) -> None:
        """Called on the event loop whenever the number of held calls asleep changes (two comparisons)."""
        if count >= self._next:
            gc.freeze()
            self.freezes += 1
            self.frozen_at = count
            self._next = max(self.first, math.ceil(count * self.growth))
        elif self.frozen_at and count <= self.frozen_at * self.thaw:
            # Most frozen holds have ended: what they left in cycles is collectable again, and the
            # full collection that reclaims it walks only the calls still held.
            gc.unfreeze()
            self.thaws += 1
            log.debug("held calls down to %d of %d frozen: objects handed back to the collector", count,
                      self.frozen_at)
            self.frozen_at = 0
            self._next = max(self.first, math.ceil(count * self.growth))
