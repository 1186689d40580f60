"""What one client may hold of the proxy and the API: connections, time, and the size of a request.

The fronts report their connections' events to a `ConnectionGuard` (the proxy's addon `ClientLimits`,
the API's uvicorn protocol); the guard keeps each connection's deadline and the cap on unproven
connections, and tells the front which connection to close. A connection must send a complete request
head within `header_read_timeout` of opening; after an answer, its next one within `idle_timeout`; while
a request is in progress it has no deadline (a held call, a slow upstream, a stream). Unproven
connections (on the proxy: not yet authenticated; on the API: any) with no request in progress are
capped in number, and a new one past the cap closes the oldest: a flood of idle connections cannot lock
out the agent or reviewer that connects next, nor exhaust the open files.

Plain Python: a connection is any hashable key, and the clock and timer are injectable for tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from proxy.vocabulary.problems import Problem, problem_document

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

LOG_INTERVAL = 60.0  # seconds between two warnings of the same kind: a flood must not flood the log


class Timer(Protocol):
    def cancel(self) -> None: ...


Schedule = Callable[[float, Callable[[], None]], Timer]


@dataclass
class _Connection:
    proven: bool = False
    requests: set[Hashable] = field(default_factory=set)
    timer: Timer | None = None


class _Tally:
    """Counts an event and warns at most once per interval, with the count since the last warning."""

    def __init__(self, message: str, clock: Callable[[], float], interval: float = LOG_INTERVAL) -> None:
        self.message = message
        self.clock = clock
        self.interval = interval
        self.count = 0
        self.last = -math.inf

    def add(self, *args: object) -> None:
        self.count += 1
        now = self.clock()
        if now - self.last >= self.interval:
            log.warning(self.message, self.count, *args)
            self.count = 0
            self.last = now


class ConnectionGuard(Generic[K]):
    """Deadlines and the unproven-connection cap of one front; `close(key, why)` closes a connection.

    The front calls `opened` and `closed` for every connection, `request_started`/`request_finished`
    around each request in progress, `proven` once a connection authenticated, and `await_request` when
    a connection must send its next request head promptly again (a CONNECT tunnel just opened).
    """

    def __init__(
        self, front: str, *, header_timeout: float, idle_timeout: float, max_unproven: int,
        close: Callable[[K, str], None], schedule: Schedule | None = None,
        clock: Callable[[], float] = time.monotonic, unproven: str = "had not authenticated",
    ) -> None:
        if max_unproven < 1:
            raise ValueError("max_unproven must be at least 1")
        self.front = front
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.max_unproven = max_unproven
        self._close = close
        self._schedule = schedule
        self._connections: dict[K, _Connection] = {}
        # Unproven connections with no request in progress, longest-waiting first: the ones to evict.
        self._evictable: OrderedDict[K, None] = OrderedDict()
        self._evicted = _Tally(
            f"{front}: closed %d connections that {unproven}, to keep at most %d such open "
            "(max_unauthenticated_connections)", clock,
        )
        self._slow = _Tally(
            f"{front}: closed %d connections that sent no complete request head within %gs "
            "(header_read_timeout)", clock,
        )

    def __len__(self) -> int:
        return len(self._connections)

    @property
    def unproven_idle(self) -> int:
        return len(self._evictable)

    def opened(self, key: K) -> None:
        self._connections[key] = _Connection()
        self._deadline(key, self.header_timeout, "header")
        self._make_evictable(key)

    def proven(self, key: K) -> None:
        connection = self._connections.get(key)
        if connection is not None:
            connection.proven = True
            self._evictable.pop(key, None)

    def request_started(self, key: K, request: Hashable) -> None:
        connection = self._connections.get(key)
        if connection is None:
            return
        connection.requests.add(request)
        self._evictable.pop(key, None)
        self._cancel(connection)

    def request_finished(self, key: K, request: Hashable) -> None:
        connection = self._connections.get(key)
        if connection is None or request not in connection.requests:
            return
        connection.requests.discard(request)
        if not connection.requests:
            self._deadline(key, self.idle_timeout, "idle")
            self._make_evictable(key)

    def await_request(self, key: K) -> None:
        connection = self._connections.get(key)
        if connection is not None and not connection.requests:
            self._deadline(key, self.header_timeout, "header")

    def closed(self, key: K) -> None:
        connection = self._connections.pop(key, None)
        self._evictable.pop(key, None)
        if connection is not None:
            self._cancel(connection)

    def _make_evictable(self, key: K) -> None:
        if self._connections[key].proven:
            return
        self._evictable[key] = None
        self._evictable.move_to_end(key)
        while len(self._evictable) > self.max_unproven:
            oldest = next(iter(self._evictable))
            self._evicted.add(self.max_unproven)
            self._shut(oldest, "too many unauthenticated connections")

    def _deadline(self, key: K, seconds: float, kind: str) -> None:
        connection = self._connections[key]
        self._cancel(connection)
        connection.timer = self._timer(seconds, lambda: self._expired(key, connection, kind))

    def _expired(self, key: K, connection: _Connection, kind: str) -> None:
        if self._connections.get(key) is not connection or connection.requests:
            return  # closed meanwhile, or a timer cancelled too late
        if kind == "header":
            self._slow.add(self.header_timeout)
            self._shut(key, f"no complete request head within {self.header_timeout:g}s")
        else:
            log.debug("%s: closing a connection idle for %gs", self.front, self.idle_timeout)
            self._shut(key, f"idle for {self.idle_timeout:g}s")

    def _shut(self, key: K, why: str) -> None:
        self.closed(key)
        try:
            self._close(key, why)
        except Exception:  # one connection that will not close must not stop the others'
            log.exception("%s: cannot close a connection (%s)", self.front, why)

    def _timer(self, seconds: float, callback: Callable[[], None]) -> Timer:
        schedule = self._schedule or asyncio.get_running_loop().call_later
        return schedule(seconds, callback)

    @staticmethod
    def _cancel(connection: _Connection) -> None:
        if connection.timer is not None:
            connection.timer.cancel()
            connection.timer = None


def default_connection_cap(open_files: int) -> int:
    """The default cap on unproven connections per front: a quarter of the open files, at least 16."""
    return max(16, open_files // 4)


def open_file_limit(raise_to_hard: bool = False, ceiling: int = 65536) -> int:
    """The process's open-file limit, first raised to the hard limit (at most `ceiling`) if asked.

    Many systems start processes with a soft limit of 1,024 though the hard one is far higher; a proxy
    holding two sockets per call reaches 1,024 soon.
    """
    try:
        import resource
    except ImportError:  # not on POSIX: assume the common default
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if raise_to_hard:
        wanted = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
        if wanted > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                soft = wanted
            except (OSError, ValueError):
                log.warning("cannot raise the open-file limit from %d to %d", soft, wanted)
    return soft if soft != resource.RLIM_INFINITY else ceiling


def refusal(problem: Problem, status: int, detail: str) -> bytes:
    """The problem+json body of a request refused by a limit, before any decision."""
    return json.dumps(problem_document(problem, status, detail)).encode()


def body_too_large(limit: int) -> str:
    return (f"the request body exceeds the proxy's limit of {limit} bytes (max_request_body_bytes); "
            "send a smaller body, or ask the operator to raise the limit")


def head_too_large(limit: int) -> str:
    return (f"the request line and headers exceed the proxy's limit of {limit} bytes (max_header_bytes); "
            "send fewer or shorter headers")
