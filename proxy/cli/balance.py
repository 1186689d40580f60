"""Spreading the proxy's connections evenly over the workers of `cedargate run --workers N`.

The workers accept from one listening socket that they all inherit. Left to itself each would accept
whatever is queued when it wakes (asyncio takes up to its backlog at once), so 16 connections opened
together landed on one worker; and SO_REUSEPORT sockets, one per worker, let the kernel hash each
connection to a worker by its addresses, which split 16 connections 12/4 or 13/3 in some runs, and
agents keep their connections open, so such a split held for the whole run. So the workers balance
their accepts as Envoy's `exact_balance` does: each keeps the number of agent connections it has open
in a small table shared by all (`ConnectionShares`, made by the supervisor), and takes a new connection,
one per accept, only while its count is the lowest of the live workers' (`SLACK` more at most); above
it, it stops watching the socket until its turn comes again (`Share.wait`), so a burst of connections
is dealt out in turn whatever their addresses hash to, and an agent opening many connections has them
spread too.

A worker waiting for its turn is woken at once by the worker whose accept gave it back the lowest count
(a pipe per worker, written only when that worker waits), by its own connections closing, and by
the supervisor when a worker dies. A worker also beats in the table (`BEAT`): one whose loop has not
run for `STALE` seconds (blocked, stopped, dead and not yet replaced) is left out of the lowest count,
so it cannot keep the others from accepting; a dead worker's entry is cleared by the supervisor, and
its replacement starts at zero, so it is given new connections until it holds its share.

The table is a memfd where there is one (Linux), else an unlinked temporary file. Each entry has one
writer, the worker that owns it (the supervisor writes it only while no worker does); the readers only
compare counts, so a stale read costs at most one connection placed a little unevenly.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import tempfile
import time
from collections.abc import Callable

SLACK = 0  # connections a worker may hold above the least-loaded live worker and still accept
BEAT_INTERVAL = 0.1  # seconds between a worker's beats in the table
STALE = 0.5  # seconds without a beat after which a worker is left out of the lowest count

COUNT, WAITING, BEAT = range(3)  # the fields of a worker's entry, 8-byte integers
_FIELDS = 3
_WORD = 8


class ConnectionShares:
    """The table of the workers' open connections, in shared memory, with a wake-up pipe per worker.

    The supervisor creates it (`create`) and passes its descriptors (`descriptors`, `fds`) to every
    worker, which attaches to it (`inherit`) and keeps its own entry through a `Share`.
    """

    def __init__(self, table_fd: int, wakes: list[tuple[int, int]]) -> None:
        self.table_fd = table_fd
        self.wakes = wakes  # per worker: the pipe's (read end, write end)
        self._map = mmap.mmap(table_fd, len(wakes) * _FIELDS * _WORD)
        self._words = memoryview(self._map).cast("q")

    @classmethod
    def create(cls, workers: int) -> ConnectionShares:
        if hasattr(os, "memfd_create"):
            table_fd = os.memfd_create("cedargate-connection-shares", os.MFD_CLOEXEC)
        else:
            table_fd, path = tempfile.mkstemp(prefix="cedargate-connection-shares-")
            os.unlink(path)
        os.ftruncate(table_fd, workers * _FIELDS * _WORD)  # zeros: no worker has beaten yet
        wakes = [os.pipe() for _ in range(workers)]
        for read_end, write_end in wakes:
            os.set_blocking(read_end, False)
            os.set_blocking(write_end, False)
        return cls(table_fd, wakes)

    @classmethod
    def inherit(cls, descriptors: str) -> ConnectionShares:
        """Attach to the table a worker was given as `descriptors` (from `descriptors`)."""
        table_fd, *ends = (int(fd) for fd in descriptors.split(","))
        return cls(table_fd, list(zip(ends[::2], ends[1::2], strict=True)))

    @property
    def descriptors(self) -> str:
        return ",".join(str(fd) for fd in self.fds)

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.table_fd, *(end for wake in self.wakes for end in wake))

    def get(self, slot: int, field: int) -> int:
        return self._words[slot * _FIELDS + field]

    def set(self, slot: int, field: int, value: int) -> None:
        self._words[slot * _FIELDS + field] = value

    def counts(self) -> list[int | None]:
        """Each worker's open connections, None for one that is not live (gone, or not beating)."""
        fresh = time.monotonic_ns() - int(STALE * 1e9)
        return [self.get(slot, COUNT) if self.get(slot, BEAT) > fresh else None for slot in range(len(self.wakes))]

    def vacate(self, slot: int) -> None:
        """The worker of `slot` is gone: it counts no more, and those waiting behind it are woken."""
        self.set(slot, BEAT, 0)
        self.set(slot, COUNT, 0)
        self.set(slot, WAITING, 0)
        self.wake_waiting(but=slot)

    def wake_waiting(self, but: int) -> None:
        for slot, (_read_end, write_end) in enumerate(self.wakes):
            if slot != but and self.get(slot, WAITING):
                try:
                    os.write(write_end, b"!")
                except BlockingIOError:  # its pipe is full: it has been woken plenty
                    pass

    def wake_fd(self, slot: int) -> int:
        return self.wakes[slot][0]

    def close(self) -> None:
        if self._map.closed:
            return
        self._words.release()
        self._map.close()
        for fd in self.fds:
            os.close(fd)


class Share:
    """One worker's entry in the table: its count kept, whether it may accept now (`my_turn`), and the
    wait for its turn (`wait`), on the worker's event loop."""

    def __init__(self, shares: ConnectionShares, slot: int, loop: asyncio.AbstractEventLoop) -> None:
        self.shares, self.slot, self.loop = shares, slot, loop
        self.open = 0
        self.left = False
        self._on_turn: Callable[[], None] | None = None
        self._beat: asyncio.TimerHandle | None = None

    def join(self) -> None:
        """Start counting and beating: from now on this worker takes its share. A worker joins before it
        serves (`proxy.cli.listeners.limit_connections`), so it holds nothing yet; were it to hold some all
        the same, that is its count, not 0: a count below what it holds would never be its turn again, and
        the others, seeing a live worker at 0, would stop too (review finding 1: every worker stopped
        accepting)."""
        self.shares.set(self.slot, COUNT, self.open)
        self.shares.set(self.slot, WAITING, 1 if self._on_turn is not None else 0)
        if self._beat is not None:  # joined again: one heartbeat, the one `leave` cancels
            self._beat.cancel()
        self._heartbeat()

    def leave(self) -> None:
        """This worker accepts no more (a graceful stop): the others no longer wait for it."""
        self.left = True
        self._stop_waiting()
        if self._beat is not None:
            self._beat.cancel()
        self.shares.vacate(self.slot)

    def my_turn(self) -> bool:
        if self.left:
            return True
        live = [count for count in self.shares.counts() if count is not None]
        return not live or self.open <= min(live) + SLACK

    def opened(self) -> None:
        self.open += 1
        self.shares.set(self.slot, COUNT, self.open)
        # Another worker waiting may now hold the lowest count (this one held it): its turn.
        self.shares.wake_waiting(but=self.slot)

    def closed(self) -> None:
        self.open = max(0, self.open - 1)
        self.shares.set(self.slot, COUNT, self.open)
        self._check()

    def wait(self, on_turn: Callable[[], None]) -> None:
        """Call `on_turn` (once) when this worker may accept again."""
        if self._on_turn is None:
            self._drain()
            self.loop.add_reader(self.shares.wake_fd(self.slot), self._woken)
        self._on_turn = on_turn
        self.shares.set(self.slot, WAITING, 1)
        # Again after saying so: a worker that accepted meanwhile did not know to wake this one.
        self._check()

    def _woken(self) -> None:
        self._drain()
        self._check()

    def _check(self) -> None:
        if self._on_turn is not None and self.my_turn():
            on_turn = self._on_turn
            self._stop_waiting()
            on_turn()

    def _stop_waiting(self) -> None:
        if self._on_turn is not None:
            self._on_turn = None
            self.shares.set(self.slot, WAITING, 0)
            self.loop.remove_reader(self.shares.wake_fd(self.slot))

    def _drain(self) -> None:
        try:
            while os.read(self.shares.wake_fd(self.slot), 4096):
                pass
        except BlockingIOError:
            pass

    def _heartbeat(self) -> None:
        self.shares.set(self.slot, BEAT, time.monotonic_ns())
        self._check()  # a worker ahead of this one may have stopped beating: it no longer counts
        self._beat = self.loop.call_later(BEAT_INTERVAL, self._heartbeat)
