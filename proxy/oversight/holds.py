"""Where held calls wait: one `Woken` per waiter, woken when a human decides or the request expires, and
one timer wheel for all their deadlines.

A waiter subscribes *before* it reads the override's status, so a decision committed between the read
and the wait still wakes it: no wake-up is lost, and no held call needs to poll the store. The waiter
re-reads the override after waking, except when the wake-up carries the request as the deciding vote
committed it (`notify(..., decided=...)`): a granted request then goes straight to its release, saving
a read and two thread hops on the approval's way upstream, and the release's conditional update is the
check that counts (should the grant be gone meanwhile, the hold reads the request and answers from what
it finds). Reviewers' decisions arrive on the event loop (the API's approve and deny, `vote_soon`) and
on other threads (a vote with changes, a question, the expiry job, and `proxy.oversight.wakeups` for
decisions made by another process), hence `notify` and `waiting` are thread-safe.

A sleeping hold also keeps its release prepared (its call checked against the current policies), which
an approval cast on the loop takes with it (`pledge`): should the vote grant the request, its
transaction commits the release too, and the hold is woken with the request released for its call
(`settle`). That saves the approval a second transaction, and its wait for the writer, on its way
upstream. The hold answers nothing until that transaction's outcome is known: its deadline coming
meanwhile must not refuse a call whose grant the vote spends.

A hold's time is kept by a coarse timer wheel, not by a loop timer of its own (`asyncio.wait_for` gave
each hold a timer, a task, and a contextvars Context for each): deadlines fall into buckets of `TICK`
seconds, and one loop timer, set for the earliest bucket, ends every hold due in it. At 10,000 held
that is 10,000 timers fewer in the loop's heap, where each stayed until its deadline, and where the
cancelled timers of all other traffic then lingered too (the loop sweeps cancelled timers only once they
are half its heap): with their Contexts, most of what the collector's full passes still walked. A hold
ends when its bucket comes due: never before its deadline, at most one `TICK` after it.

The number of held calls that have slept (each has by then built what it keeps) and not yet ended is
told to the process's `HeldHeap`, if it has one (`proxy.oversight.heap`), which keeps long holds out of
the garbage collector's full passes: counted up at a hold's first sleep and down when its `watching`
ends, so a wake-up that finds no decision (another process's change, a retry while the store fails)
is not taken for a call that ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.oversight.urgency import URGENT, WOKEN_FOR, Urgency

if TYPE_CHECKING:
    from proxy.oversight.heap import HeldHeap
    from proxy.oversight.overrides import Override

# Seconds per bucket of the timer wheel: how late a hold may end after its deadline. The wheel has one
# loop timer whatever the tick; the tick sets how many buckets (sets) the held calls' deadlines fill, and
# how often the loop wakes to end holds: 10 times a second at most.
TICK = 0.1
LONGEST_SLEEP = 86400.0  # seconds: a longer wait is slept a day at a time


class Woken:
    """A hold's wake-up flag (set by `Holds.notify`), the newest decided state a wake-up brought with it
    (None: read the store), and the one coroutine waiting on it (`wait`)."""

    __slots__ = ("decided", "slept", "urgency", "release", "pledged", "owed", "ended", "went", "_set", "_waiter")

    def __init__(self) -> None:
        self.decided: Override | None = None
        self.slept = False  # has slept in `Holds.sleep`: counted for the heap until its `watching` ends
        # While the hold sleeps: its release, prepared for a deciding vote to commit with itself (`pledge`).
        self.release: Callable[[], Prepared | None] | None = None
        # Once a vote's transaction carries that release, until its outcome is known (`settle`).
        self.pledged: Pledge | None = None
        # A vote committed its release and woke it: until the hold takes that (`take`), a grant spent for
        # its call alone, put back should the hold end first (cancelled before it ran again).
        self.owed: Pledge | None = None
        self.ended = False  # its `watching` is over
        self.went = False  # its call was released, to go upstream
        self._set = False
        self._waiter: asyncio.Future[None] | None = None
        # The holding task's mark (`proxy.oversight.urgency`), begun by a wake-up that brings a decision.
        self.urgency = Urgency()

    def take(self) -> Override | None:
        # Taken, a release the vote committed for this hold is its to answer (it goes, or, its client
        # gone, puts the grant back): no longer owed by `watching`'s end.
        decided, self.decided, self.owed = self.decided, None, None
        return decided

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        self._resume()

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        """Until set (True), or until its hold's time is up (False; `Holds.sleep` keeps that time).
        One waiter at a time: a hold is one coroutine."""
        if self._set:
            return True
        if self._waiter is not None:
            raise RuntimeError("a hold's wake-up has one waiter")
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        return self._set

    @property
    def asleep(self) -> bool:
        return self._waiter is not None and not self._set

    def time_up(self) -> None:
        """End the wait without setting the flag (`wait` answers False): the hold's time is up."""
        self._resume()

    def _resume(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


@dataclass(frozen=True)
class Prepared:
    """A held call's release, checked against current policy and ready to commit: the call's decision
    and what the `release` event records."""
    decision_id: str
    payload: dict[str, Any]


@dataclass
class Pledge:
    """A sleeping hold's release, given to the vote that may decide its request (`Holds.pledge`).

    `abandoned` (set on the loop, read by the writer thread): the hold no longer waits for it (it ended,
    or waited too long), so the vote's transaction leaves the grant unspent. `unused`: called on the loop
    when the release was committed and its call will not go (its hold ended first): it puts the grant back."""
    override_id: str
    release: Prepared
    woken: Woken
    outcome: asyncio.Future[None]
    unused: Callable[[Pledge], None]
    abandoned: bool = False


class Holds:
    def __init__(self, heap: HeldHeap | None = None, tick: float = TICK) -> None:
        self._events: dict[str, set[Woken]] = defaultdict(set)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()  # `_events` is changed on the loop and read by `waiting` elsewhere
        self._held = 0  # waiters now: read per escalation against max_held_calls, so counted, not summed
        self.heap = heap
        self._slept = 0  # holds that have slept and not ended, told to the heap: on the event loop only
        self.tick = tick
        self._wheels: dict[asyncio.AbstractEventLoop, _Wheel] = {}  # the timer wheel of each loop

    @property
    def held(self) -> int:
        return self._held

    def waiting(self) -> set[str]:
        """The ids of the override requests some call waits on now."""
        with self._lock:
            return set(self._events)

    def asleep(self, override_id: str) -> bool:
        """Whether a call held on this request sleeps now, waiting for a decision (on the loop)."""
        with self._lock:
            return any(woken.asleep for woken in self._events.get(override_id, ()))

    @contextlib.contextmanager
    def watching(self, override_id: str) -> Iterator[Woken]:
        """An event set whenever this override may have changed, for as long as the block runs."""
        self._loop = asyncio.get_running_loop()
        event = Woken()
        URGENT.set(event.urgency)  # in the holding task's context: what it schedules from here carries it
        with self._lock:
            self._events[override_id].add(event)
            self._held += 1
        try:
            yield event
        finally:
            event.ended = True
            if event.pledged is not None:  # a vote still commits with its release: leave the grant
                event.pledged.abandoned = True
            if event.owed is not None and not event.went:  # released, and cancelled before it went
                event.owed.unused(event.owed)
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
        """Wait on a hold's event (from `watching`) until notified (True) or `timeout` passes (False).

        The timeout is kept by the timer wheel: the wait ends in the first tick at or after it, never
        before it and at most `tick` seconds after it. The heap counts a hold from its first sleep rather
        than from its subscription: a hold has built what it keeps for its whole wait (its read of the
        request included) only once it sleeps, and in a flood of escalations the reads lag far behind the
        subscriptions.
        """
        if not woken.slept:
            woken.slept = True
            self._slept += 1
            if self.heap is not None:
                self.heap.held(self._slept)
        if woken.is_set():
            return True
        if timeout <= 0:
            return False
        if math.isinf(timeout):  # no end but a wake-up (`hold_max_wait: .inf`)
            return await woken.wait()
        # A wait longer than a day ends after a day, and its hold, finding its request pending and time
        # left, sleeps again: a huge finite wait (1e308 s) would overflow the bucket's number.
        timeout = min(timeout, LONGEST_SLEEP)
        loop = asyncio.get_running_loop()
        wheel = self._wheels.get(loop)
        if wheel is None:  # one wheel per loop (tests run several, a process may run two)
            for other in [other for other in self._wheels if other.is_closed()]:
                del self._wheels[other]
            wheel = self._wheels[loop] = _Wheel(self.tick)
        bucket = wheel.enter(woken, loop, loop.time() + timeout)
        try:
            return await woken.wait()
        finally:
            sleepers = wheel.due.get(bucket)
            if sleepers is not None:  # woken before its time, or cancelled (the client went away)
                sleepers.discard(woken)  # an emptied bucket stays until due: entered again, not pushed again

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

    def pledge(self, override_id: str, unused: Callable[[Pledge], None]) -> Pledge | None:
        """On the loop, before a vote that may decide this request is queued: the release of one of its
        held calls, asleep and with its release prepared (checked against the current policies), for the
        vote's transaction to commit with the grant. The approval then reaches the upstream after one
        transaction, not two; the release is the same conditional move, recorded the same way.

        The hold waits for that transaction's outcome before it answers anything (`settle`), so a deadline
        coming meanwhile cannot refuse a call whose grant the vote spends. None: no such hold here."""
        with self._lock:
            events = list(self._events.get(override_id, ()))
        for woken in events:
            if woken.release is None or woken.pledged is not None or not woken.asleep:
                continue
            prepared = woken.release()
            if prepared is not None:
                pledge = woken.pledged = Pledge(override_id, prepared, woken,
                                                asyncio.get_running_loop().create_future(), unused)
                return pledge
        return None

    def settle(self, pledge: Pledge, released: Override | None) -> None:
        """On the loop, once the pledging vote's transaction has an outcome: `released`, the request as it
        left it if the release was committed with it (its hold is woken with it and goes), else None.
        A release committed for a hold that ends without its call going (cancelled, or answered once it
        stopped waiting for the vote) is `unused`: nobody forwards that call, so its grant goes back."""
        woken = pledge.woken
        if woken.pledged is pledge:
            woken.pledged = None  # a retried vote may pledge it again
        if not pledge.outcome.done():
            pledge.outcome.set_result(None)
        if released is None:
            return
        if woken.ended:
            if not woken.went:
                pledge.unused(pledge)
            return
        woken.owed = pledge
        self._wake(pledge.override_id, released)

    def _wake(self, override_id: str, decided: Override | None = None) -> None:
        with self._lock:
            events = list(self._events.get(override_id, ()))
        for event in events:
            # Wake-ups from several threads may arrive out of order: the newest state (by its version,
            # which every change of status moves on) is kept, and a wake-up without one keeps it too.
            if decided is not None and (event.decided is None or event.decided.version <= decided.version):
                event.decided = decided
            if decided is not None:  # a decision committed on this loop: its way upstream goes first
                event.urgency.begin(WOKEN_FOR)
            event.set()


class _Wheel:
    """One loop's timer wheel: bucket n ends the holds due by n * tick."""

    def __init__(self, tick: float) -> None:
        self.tick = tick
        self.due: dict[int, set[Woken]] = {}
        self._buckets: list[int] = []  # a heap of the buckets made, each once
        self._timer: asyncio.TimerHandle | None = None
        self._timer_bucket = 0  # the bucket `_timer` is set for

    def enter(self, woken: Woken, loop: asyncio.AbstractEventLoop, deadline: float) -> int:
        """Put a sleeping hold in the bucket of its deadline (on the loop's clock); that bucket's number."""
        bucket = math.ceil(deadline / self.tick)
        if bucket * self.tick < deadline:  # the division rounded down: never end a hold early
            bucket += 1
        sleepers = self.due.get(bucket)
        if sleepers is None:
            sleepers = self.due[bucket] = set()
            heapq.heappush(self._buckets, bucket)
            if self._timer is None or bucket < self._timer_bucket:
                self._arm(loop, bucket)
        sleepers.add(woken)
        return bucket

    def _arm(self, loop: asyncio.AbstractEventLoop, bucket: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_bucket = loop.call_at(bucket * self.tick, self._expire, loop), bucket

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """The wheel's timer: end the holds of every bucket now due, and set the timer for the next."""
        self._timer = None
        now = loop.time()
        buckets = self._buckets
        while buckets:
            bucket = buckets[0]
            if bucket not in self.due:  # emptied by wake-ups (or already ended: pushed twice)
                heapq.heappop(buckets)
            elif bucket * self.tick > now:  # the loop may run a timer a clock resolution early
                self._arm(loop, bucket)
                return
            else:
                heapq.heappop(buckets)
                for woken in self.due.pop(bucket):
                    woken.time_up()
