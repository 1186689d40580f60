"""Accepting connections at the limits: the proxy's connection ceiling, and accept errors that back off.

asyncio's accept loop (Python 3.11, `BaseSelectorEventLoop._accept_connection`) meets "too many open
files" (EMFILE, ENFILE, ENOBUFS, ENOMEM) by reporting it to the loop's exception handler (mitmproxy's logs
a traceback), pausing the listener for a second, and then going on accepting from the same queue, up to
its backlog of 100 tries a tick, each reported and each scheduling another restart: measured, 1.66 M log
lines in 5 minutes and a core spinning. `guard_accepts` gives the loop an accept step that does what
CPython's should: on such an error it stops accepting from that listener, backs off (doubling from 50 ms
to 1 s), and logs once a minute with the count of failures since the last line.

It also applies the proxy's `max_proxy_connections` (`proxy.calls.capacity.Capacity`) where connections
are accepted: a listener given a `Capacity` (`limit_connections`) counts each agent connection from accept
to close, and one past the ceiling is answered `503 proxy-saturated` with Retry-After and closed, unread
and undecided, so the agent hears at once rather than wait in the listen queue. The answer's connection
lingers briefly (reading and discarding), so that a client still sending its request reads the answer
rather than a reset; at most `MAX_LINGERING` do, the others are closed at once.

Under `cedargate run --workers N` a worker's listener is also given its `Share` (`proxy.cli.balance`): it
accepts one connection per wake, and only while its share says it may, so the workers take turns.

The override API's listener gets the backing off too, not the ceiling: its connections are few and
capped by its own guard (`override_api.connections`), and the files the proxy's ceiling leaves are its.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import socket
import time
from asyncio.trsock import TransportSocket
from collections.abc import Callable
from typing import Any

from proxy.calls.capacity import RETRY_AFTER, Capacity
from proxy.cli.balance import Share
from proxy.vocabulary.problems import MEDIA_TYPE, Problem, problem_document

log = logging.getLogger(__name__)

OUT_OF_FILES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
FIRST_BACKOFF, MAX_BACKOFF = 0.05, 1.0  # seconds a listener pauses after accept ran out of files
LOG_INTERVAL = 60.0  # seconds between two log lines of one kind: a flood must not flood the log
MAX_LINGERING = 64  # refused connections reading on until the client closes: files kept from the reserve
LINGER = 2.0  # seconds one of them reads on at most


class _Tally:
    """Counts an event and logs at most once per interval, with the count since the last line."""

    def __init__(self, level: int, message: str, interval: float = LOG_INTERVAL) -> None:
        self.level, self.message, self.interval = level, message, interval
        self.count = 0
        self.last = -math.inf

    def add(self, *args: object) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.interval:
            log.log(self.level, self.message, self.count, *args)
            self.count = 0
            self.last = now


class Listeners:
    """The accept step of one event loop (`guard_accepts`), and the ceilings of its listeners."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop: Any = loop  # a selector loop: its private serving methods are used below
        self.ceilings: dict[int, Capacity] = {}  # listening socket's descriptor -> its ceiling
        self.shares: dict[int, Share] = {}  # listening socket's descriptor -> its worker's share
        self._backoff: dict[int, float] = {}
        self._lingering: set[asyncio.Task[None]] = set()
        self._out_of_files = _Tally(logging.ERROR, "cannot accept connections: out of files (%d times since "
                                    "the last such line; last: %s); pausing the listener each time, up to "
                                    f"{MAX_BACKOFF:g} s")
        self._refused = _Tally(logging.WARNING, "refused %d new proxy connections with 503 proxy-saturated: "
                               "%d of %d connections open (max_proxy_connections)")

    def accept(self, protocol_factory: Callable[[], asyncio.BaseProtocol], sock: socket.socket,
               sslcontext: Any = None, server: Any = None, backlog: int = 100, *timeouts: Any) -> None:
        """The loop's accept step, called when a listening socket is readable (CPython's signature)."""
        capacity = self.ceilings.get(sock.fileno())
        share = self.shares.get(sock.fileno())
        if share is not None and not share.my_turn():
            self._wait_turn(share, protocol_factory, sock, sslcontext, server, backlog, timeouts)
            return
        for _ in range(backlog if share is None else 1):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # the queue is empty
            except OSError as exc:
                if exc.errno not in OUT_OF_FILES:
                    raise  # the loop logs and ignores it, as CPython's
                self._pause(protocol_factory, sock, sslcontext, server, backlog, timeouts, exc)
                return  # not on to the next try, as CPython's goes: it would fail the same way
            self._backoff.pop(sock.fileno(), None)
            if capacity is not None and not capacity.admit_agent():
                self._refuse(conn, capacity)
                continue
            conn.setblocking(False)
            factory = protocol_factory
            if capacity is not None or share is not None:
                # Counted off when its connection is lost, in the ceiling and in the share alike: a count
                # never given back would hold this worker's turns as if the connection stayed open.
                factory = _counted(protocol_factory, capacity, share)
            if share is not None:
                share.opened()
            self.loop.create_task(self.loop._accept_connection2(factory, conn, {"peername": addr}, sslcontext,
                                                                server, *timeouts))

    def _pause(self, protocol_factory: Any, sock: socket.socket, sslcontext: Any, server: Any, backlog: int,
               timeouts: tuple[Any, ...], exc: OSError) -> None:
        fd = sock.fileno()
        delay = self._backoff[fd] = min(MAX_BACKOFF, self._backoff.get(fd, FIRST_BACKOFF / 2) * 2)
        self._out_of_files.add(exc.strerror or exc)
        self.loop._remove_reader(fd)

        def resume() -> None:
            # The server may have closed meanwhile (a graceful stop): then there is nothing to resume.
            if sock.fileno() == fd and (server is None or server.is_serving()):
                self.loop._start_serving(protocol_factory, sock, sslcontext, server, backlog, *timeouts)

        self.loop.call_later(delay, resume)

    def _wait_turn(self, share: Share, protocol_factory: Any, sock: socket.socket, sslcontext: Any, server: Any,
                   backlog: int, timeouts: tuple[Any, ...]) -> None:
        """Stop watching `sock` until `share` says this worker may accept again: the others take what comes."""
        fd = sock.fileno()
        self.loop._remove_reader(fd)

        def resume() -> None:
            if sock.fileno() == fd and (server is None or server.is_serving()):
                self.loop._start_serving(protocol_factory, sock, sslcontext, server, backlog, *timeouts)

        share.wait(resume)

    def _refuse(self, conn: socket.socket, capacity: Capacity) -> None:
        self._refused.add(capacity.connections, capacity.max_connections)
        body = json.dumps(problem_document(Problem.SATURATED, detail=capacity.saturated_detail(),
                                           retry_after=RETRY_AFTER)).encode()
        answer = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {MEDIA_TYPE}\r\n"
                  f"Retry-After: {RETRY_AFTER}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                  ).encode() + body
        conn.setblocking(False)
        try:
            conn.send(answer)  # a few hundred bytes: a new connection's send buffer takes them whole
        except OSError:
            conn.close()
            return
        if len(self._lingering) >= MAX_LINGERING:
            conn.close()
            return
        task = self.loop.create_task(_linger(self.loop, conn))
        self._lingering.add(task)
        task.add_done_callback(self._lingering.discard)


async def _linger(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    """Half-close, then read and discard until the client closes (or `LINGER` passes): closing a socket
    with unread data resets the connection, and the client would lose the answer."""
    try:
        conn.shutdown(socket.SHUT_WR)
        deadline = loop.time() + LINGER
        while (left := deadline - loop.time()) > 0:
            if not await asyncio.wait_for(loop.sock_recv(conn, 65536), left):
                break
    except (OSError, TimeoutError):
        pass
    finally:
        conn.close()


def _counted(protocol_factory: Callable[[], asyncio.BaseProtocol], capacity: Capacity | None,
             share: Share | None) -> Callable[[], asyncio.BaseProtocol]:
    """The factory, its protocols counted off `capacity` and `share` (those given) when their connection is
    lost."""
    def closed() -> None:
        if capacity is not None:
            capacity.agent_closed()
        if share is not None:
            share.closed()

    def factory() -> asyncio.BaseProtocol:
        try:
            protocol = protocol_factory()
        except BaseException:
            closed()
            raise
        lost = protocol.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            closed()
            lost(exc)

        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        return protocol
    return factory


def guard_accepts(loop: asyncio.AbstractEventLoop | None = None) -> Listeners:
    """Give `loop` (the running one by default) the accept step above, for every listener it serves; once."""
    loop = loop or asyncio.get_running_loop()
    current = getattr(loop, "_cedargate_listeners", None)
    if isinstance(current, Listeners):
        return current
    listeners = Listeners(loop)
    if hasattr(loop, "_accept_connection") and hasattr(loop, "_start_serving"):
        # An instance attribute: `_start_serving` registers `self._accept_connection` as the reader.
        loop._accept_connection = listeners.accept
    else:  # not a selector loop (uvloop, Windows' proactor): its own accept step stays
        log.warning("cannot guard this event loop's accept step (%s): accept errors are logged as it logs them",
                    type(loop).__name__)
    loop._cedargate_listeners = listeners  # type: ignore[attr-defined]
    return listeners


def limit_connections(sock: socket.socket | TransportSocket, capacity: Capacity,
                      loop: asyncio.AbstractEventLoop | None = None, share: Share | None = None) -> None:
    """Apply `capacity`'s connection ceiling to the listening socket `sock` (served on `loop`, whose accept
    step `guard_accepts` must have given it before it started serving), and with `share` take only this
    worker's share of the connections: the share joins the table here, before the listener serves, so the
    worker is counted by the others from its first accept (connections queued at its start are accepted
    as soon as it serves)."""
    listeners = guard_accepts(loop)
    listeners.ceilings[sock.fileno()] = capacity
    if share is not None:
        listeners.shares[sock.fileno()] = share
        share.join()
    capacity.serving()
