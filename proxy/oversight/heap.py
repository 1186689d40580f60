"""Keeping held calls out of Python's full garbage collections, so approvals are not paused behind them.

A held call is about two hundred objects the collector tracks (its connection's tasks and coroutines,
mitmproxy's layers and buffers, the flow, the verdict, the hold's own waiters): at 10,000 held, some
two million, and a full (generation 2) collection walks every one of them while the event loop waits:
1.2-1.7 s at 2,000 held on a busy 2-core machine, long enough to stall every approval, every allowed
call and `/healthz` behind it. Those objects live as long as their hold (minutes), so walking them again
and again finds nothing.

`HeldHeap` moves them out of the collector's reach with `gc.freeze()` (which only relinks lists: no
pause): once at start-up (modules, policies, the core), then each time the number of held calls that
have slept in their wait (`Holds.sleep`: by then each has built what it keeps) and not ended reaches a
new mark, `GROWTH` times the count at the last freeze (at least `FIRST`), so a flood of 10,000 holds is
frozen about twenty times, not once per call; and `SETTLE` seconds after a call fell asleep past the
last freeze, whatever has slept by then. Without that settle point the calls held after the last mark (up to a fifth of
them: 8,943 frozen of 10,000) stayed in every full pass: some 200,000 objects, 80 ms a pass on this
project's busy machine, within one approval in six. A freeze is preceded by a collection of the young
generations, so the garbage of the calls that just ended is reclaimed rather than frozen.

Frozen objects are still freed by reference counting when their call ends; only cyclic garbage among
them waits (measured at about 19 objects per released call). So that this stays bounded, everything is
handed back to the collector (`gc.unfreeze()`) once the calls that ended since the last hand-back reach
`1 - THAW` of the count last frozen (a flood drained to a quarter, or 7,500 calls ended while 10,000
stay held): the next freeze first runs a full collection, which walks the calls still held once and
reclaims what the ended ones left.

One per process (the collector is the process's): `cedargate run` and each `--workers` process start one;
the runtime alone (tests, `mitmdump -s`) has none, and holding works the same without it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math

log = logging.getLogger(__name__)

FIRST = 200  # held calls: below this a full collection is short, and freezing would gain nothing
GROWTH = 1.25  # the next freeze when this many times the calls last frozen are held
THAW = 0.25  # hand back once the calls ended reach (1 - THAW) of the calls last frozen
SETTLE = 1.0  # seconds after a call fell asleep past the last freeze, what is asleep then is frozen


class HeldHeap:
    def __init__(self, first: int = FIRST, growth: float = GROWTH, thaw: float = THAW,
                 settle: float = SETTLE) -> None:
        self.first, self.growth, self.thaw, self.settle = first, growth, thaw, settle
        self.frozen_at = 0  # held calls at the last freeze; 0 when nothing held is frozen
        self.freezes = 0  # since start, for /status-style reporting and tests
        self.thaws = 0
        self._next = first
        self._asleep = 0  # the count last told
        self._ended = 0  # calls ended since the last hand-back, while some were frozen
        self._settling: asyncio.TimerHandle | None = None
        self._collect_first = False  # a hand-back's garbage not yet collected: collect before freezing

    def started(self) -> None:
        """Freeze what start-up built: it lives as long as the process."""
        gc.freeze()

    def held(self, count: int) -> None:
        """Called on the event loop whenever the number of held calls that have slept and not ended changes:
        one up at a hold's first sleep, one down when a call that slept ends (`Holds.watching`'s exit). A
        wake-up after which the call sleeps again is neither: counted as an end, a few rounds of them
        (another process's changes, retries while the store fails) would hand everything back early."""
        arrived, self._asleep = count > self._asleep, count
        if count >= self._next:
            self._freeze(count)
        elif not arrived and self.frozen_at:
            self._ended += 1
            if self._ended >= self.frozen_at * (1 - self.thaw):
                self._hand_back(count)
        elif arrived and count > self.frozen_at and count >= self.first and self._settling is None:
            self._settling = asyncio.get_running_loop().call_later(self.settle, self._settled)

    def _settled(self) -> None:
        self._settling = None
        if self._asleep > self.frozen_at and self._asleep >= self.first:
            self._freeze(self._asleep)

    def _freeze(self, count: int) -> None:
        if self._settling is not None:
            self._settling.cancel()
            self._settling = None
        # Not garbage into the permanent generation: what the young generations hold is collected first
        # (a few ms), and after a hand-back everything once, the pass that reclaims the ended calls' cycles.
        gc.collect(2 if self._collect_first else 1)
        self._collect_first = False
        gc.freeze()
        self.freezes += 1
        self.frozen_at = count
        self._next = max(self.first, math.ceil(count * self.growth))

    def _hand_back(self, count: int) -> None:
        # Most frozen holds have ended: what they left in cycles is collectable again, and the full
        # collection that reclaims it (the collector's own, or the next freeze's) walks the calls still held.
        gc.unfreeze()
        self.thaws += 1
        log.debug("%d held calls ended of %d frozen (%d held now): objects handed back to the collector",
                  self._ended, self.frozen_at, count)
        self.frozen_at = 0
        self._ended = 0
        self._collect_first = True
        self._next = max(self.first, math.ceil(count * self.growth))
