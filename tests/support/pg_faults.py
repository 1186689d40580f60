"""A TCP proxy in front of PostgreSQL that loses a commit's acknowledgement on demand.

    with pg_fault_proxy("127.0.0.1", 5432) as faults:
        url = faults.url(PG_URL)          # the same database, reached through the proxy
        faults.cut_commit(b"some-id")     # arm: the next COMMIT of a transaction that sent b"some-id"
        ...                               # the client's COMMIT reaches the server and commits; the
        assert faults.wait_cut(10)        # client's connection is cut before it hears so
        faults.refuse_connections(3)      # and the next three connections are closed at once

It relays bytes both ways unchanged and reads only the client's side of the protocol: the startup
message, then typed messages. A COMMIT is a simple query ('Q' whose text is COMMIT, as psycopg sends
it) or its extended-protocol form (a Parse of COMMIT, taken as sent at the Sync that follows). When
armed, the proxy forwards that COMMIT, reads the server's answer up to its ReadyForQuery (so the commit
has certainly happened), and closes both connections without passing the answer on: exactly "the
server committed, the client saw an error". `containing` narrows which transaction is cut: one whose
messages since its last COMMIT or ROLLBACK carried those bytes (a statement's text or a bound value,
such as a decision id). Each arming cuts one commit. Plain TCP only: give the client `sslmode=disable`
(`url` does).
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

_SSL_REQUEST = 80877103
_GSS_REQUEST = 80877104
_TRANSACTION_ENDS = (b"COMMIT", b"ROLLBACK", b"END", b"ABORT")


class PgFaults:
    """The proxy's controls (thread-safe; the proxy runs on an event loop of its own)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._armed: list[bytes | None] = []
        self._lock = threading.Lock()
        self._cut = threading.Condition(self._lock)
        self.cuts = 0  # commits whose acknowledgement was lost so far
        self._open: set[asyncio.StreamWriter] = set()
        self._refuse = 0

    def url(self, url: str) -> str:
        """`url` (a SQLAlchemy or libpq URL) pointed at the proxy, without TLS."""
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials + '@' if credentials else ''}127.0.0.1:{self.port}"
        query = "&".join(q for q in (parts.query, "sslmode=disable") if q)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

    def cut_commit(self, containing: bytes | None = None) -> None:
        """Arm: lose the acknowledgement of the next COMMIT (of a transaction that sent `containing`)."""
        with self._lock:
            self._armed.append(containing)

    def refuse_connections(self, count: int) -> None:
        """Close the next `count` new client connections at once, as a server that cannot be reached."""
        with self._lock:
            self._refuse += count

    def wait_cut(self, timeout: float, count: int = 1) -> bool:
        """Wait until `count` commits in all have been cut; False if that did not happen in time."""
        with self._cut:
            return self._cut.wait_for(lambda: self.cuts >= count, timeout)

    def _take(self, transaction: bytes) -> bool:
        with self._lock:
            for index, containing in enumerate(self._armed):
                if containing is None or containing in transaction:
                    del self._armed[index]
                    return True
        return False

    def _count_cut(self) -> None:
        with self._cut:
            self.cuts += 1
            self._cut.notify_all()

    async def serve(self, started: threading.Event, stop: asyncio.Event) -> None:
        server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        started.set()
        async with server:
            await stop.wait()
        for writer in list(self._open):  # the relays then end as connections do
            writer.close()
        relays = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        await asyncio.wait(relays, timeout=5) if relays else None

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        with self._lock:
            refused, self._refuse = self._refuse > 0, max(0, self._refuse - 1)
        if refused:
            client_writer.close()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        self._open.update((client_writer, server_writer))
        backward = asyncio.create_task(_pipe(server_reader, client_writer))
        try:
            await self._forward(client_reader, server_writer, server_reader, backward)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            backward.cancel()
            for writer in (client_writer, server_writer):
                writer.close()
                self._open.discard(writer)

    async def _forward(self, reader: asyncio.StreamReader, server: asyncio.StreamWriter,
                       server_reader: asyncio.StreamReader, backward: asyncio.Task[None]) -> None:
        # The startup phase: untyped messages (an SSL or GSS request the server refuses, then startup).
        while True:
            length = struct.unpack("!I", await reader.readexactly(4))[0]
            body = await reader.readexactly(length - 4)
            server.write(struct.pack("!I", length) + body)
            await server.drain()
            if struct.unpack("!I", body[:4])[0] not in (_SSL_REQUEST, _GSS_REQUEST):
                break
        transaction = bytearray()
        commit_pending = False  # an extended-protocol COMMIT parsed, sent at the next Sync
        while True:
            kind = await reader.readexactly(1)
            length = struct.unpack("!I", await reader.readexactly(4))[0]
            body = await reader.readexactly(length - 4)
            message = kind + struct.pack("!I", length) + body
            text = body.rstrip(b"\0").strip().upper() if kind in (b"Q", b"P") else b""
            if kind == b"P":
                text = body.split(b"\0", 2)[1].strip().upper()  # Parse: statement name, then its text
            commits = (kind == b"Q" and text == b"COMMIT") or (kind == b"S" and commit_pending)
            commit_pending = commit_pending or (kind == b"P" and text == b"COMMIT")
            if commits and self._take(bytes(transaction)):
                backward.cancel()  # the server's answer is read here, and never passed on
                try:
                    await backward
                except asyncio.CancelledError:
                    pass
                server.write(message)
                await server.drain()
                await _read_until_ready(server_reader)
                self._count_cut()
                return
            server.write(message)
            await server.drain()
            if commits or text.startswith(_TRANSACTION_ENDS):
                transaction.clear()
                commit_pending = False
            elif kind != b"S":
                transaction += body


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    writer.close()  # the server closed: so does the client's side (not when cancelled to cut a commit)


async def _read_until_ready(reader: asyncio.StreamReader) -> None:
    """Read the server's messages up to ReadyForQuery ('Z'): the COMMIT has then been carried out."""
    while True:
        kind = await reader.readexactly(1)
        length = struct.unpack("!I", await reader.readexactly(4))[0]
        await reader.readexactly(length - 4)
        if kind == b"Z":
            return


@contextmanager
def pg_fault_proxy(host: str = "127.0.0.1", port: int = 5432) -> Iterator[PgFaults]:
    """Run the proxy in front of PostgreSQL at `host`:`port` for the block's duration."""
    faults = PgFaults((host, port))
    started = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def run() -> None:
        loop.run_until_complete(faults.serve(started, stop))

    thread = threading.Thread(target=run, name="pg-fault-proxy", daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the PostgreSQL fault proxy did not start")
    try:
        yield faults
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
