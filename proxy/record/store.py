"""The decision record: one row per decided call, appended through a batching writer thread.

Writing a row per call in the request path would cost a commit each (the naive design ran at 0.6x of
plain mitmproxy). Callers only enqueue; one writer thread drains the queue in batches, one transaction
each, and in that same transaction chains every decision and event, in the order they were enqueued,
onto the hash-chained audit log (`proxy.record.audit`). Each transaction reads and locks the chain's
head afresh, so any number of processes may record into one database (on SQLite the writer's
transactions take the write lock at BEGIN, and wait their turn).

Record before forward: a call about to go upstream enqueues its row with `Recorder.commit` and waits
on the future it returns, which the writer resolves once the row is committed; the calls that arrive
while one commit runs share the next (group commit), so waiting costs a fraction of a commit each.
What became of the call (the upstream's status, the duration, a failure) follows with
`record_outcome`: an UPDATE of the row by decision id and an `outcome` event on the chain, since the
row alone can be edited unseen. A refused call went nowhere: `record` enqueues its row and nobody waits.
Under load, rows nobody waits on linger briefly so that they share a transaction (`Recorder._linger`).

Nothing is dropped: a failed batch is kept and retried, and while the store is failing (or the queue
is full) `Recorder.healthy` is False so the gate refuses new calls; a waiting call is failed at the
first failed try, so it is refused at once (503 store-unavailable) rather than at its timeout. The
refusals themselves are counted per agent (`count_refusal`) and chained as one `store_refusals` event
per agent and commit, so a failing store's backlog cannot refill the space it needs to recover.
Writing twice is harmless: decision rows are inserted with ON CONFLICT (decision_id) DO NOTHING. A
commit whose acknowledgement was lost (the server committed, the connection died) is never repeated:
the head each transaction would leave names it (`audit.landed`), so before a retry the writer reads
the log to learn whether the commit happened. `close` writes everything queued while it makes
progress, and says loudly what it could not. On SQLite a thread of its own checkpoints the WAL while
rows are committed (truncating it past `wal_limit`), never the writer in a commit that calls wait on; the
writer's batches go through the driver itself, and a database that cannot be written is refused at
start (`writable`).

A state change that must be recorded with its audit events (an override voted on, released, expired)
goes through `Recorder.transact`: the writer thread runs it in its own transaction, after everything
enqueued before it and before everything enqueued after it, and chains its events in that same
transaction, so the change and its audit rows commit together or not at all. The two steps of an
approval's way to its held call (a reviewer waits on them) may go ahead of the journaled calls' rows and
outcomes queued just before them (`transact_soon(ahead_of_calls=True)`, `_passable`): those calls have
gone upstream, their rows are safe in the journal, and no unit reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import queue
import sqlite3
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote

from sqlalchemy import ColumnDefault, Index, Table, bindparam, event, make_url, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlmodel import Field, Session, SQLModel, create_engine, func, select

from proxy.observe.metrics import store_backlog
from proxy.record import audit, journal
from proxy.record.migrations import migrate
from proxy.vocabulary.canonical import canonical, canonical_text

log = logging.getLogger(__name__)


class DecisionRecord(SQLModel, table=True):
    __tablename__ = "decisions"
    # Every index is paid for on each recorded call: keep the ones audits need, "this decision" and
    # "what did this agent do, when" (the time index serves time ranges across agents).
    # And one for retention (revision 0011): the decisions still holding a Cedar request, by time, which a
    # cleared row leaves, so finding the next ones to clear never walks the cleared history.
    __table_args__ = (
        Index("ix_decisions_agent_at", "agent", "at"),
        Index("ix_decisions_at_with_request", "at", sqlite_where=text("cedar_request IS NOT NULL"),
              postgresql_where=text("cedar_request IS NOT NULL")),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=audit.ROW_NUMBER)  # one per call (revision 0012)
    decision_id: str = Field(index=True, unique=True)
    at: datetime = Field(index=True)
    agent: str
    method: str
    scheme: str
    host: str
    port: int
    path: str
    action: str
    resource: str
    decision: str  # allow | deny | escalate | error
    determining_policies: str = "[]"  # JSON list of @ids
    errors: str = "[]"  # JSON list
    policy_revision: str | None = None
    upstream_status: int | None = None
    duration_ms: float | None = None
    session: str | None = None  # the agent's X-Agent-Session, when it sent one (revision 0005)
    tool: str | None = None  # an MCP tools/call's tool (revision 0005)
    # The Cedar request decided (canonical JSON, secrets redacted), for `cedargate replay` and explaining
    # it later; cleared after `cedar_request_retention` (`clear_cedar_requests`), NULL for a call refused
    # before it was mapped and for rows before revision 0007.
    cedar_request: str | None = None


# An execution option: a transaction begun with it set writes, so on SQLite it begins IMMEDIATE.
WRITES = "cedargate_writes"


def make_engine(url: str) -> SAEngine:
    if url.startswith("sqlite"):
        private_sqlite_files(url)
        # hide_parameters: a failure message must never carry other agents' calls into a log or answer.
        engine = create_engine(url, connect_args={"check_same_thread": False}, hide_parameters=True)
        # A batch's rows as multi-row INSERTs (as SQLAlchemy already does for psycopg2), not sqlite3's
        # executemany: that releases and retakes the GIL for every row, and under load each retake
        # makes the proxy's event loop hand the GIL over (about 0.1 ms of proxy CPU per call).
        engine.dialect.use_insertmanyvalues_wo_returning = True

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the API read while the writer appends; NORMAL is durable across process crashes.
            cur = dbapi_conn.cursor()
            # Turning a new file to WAL takes its exclusive lock, and SQLite fails at once, without its
            # busy handler, if another connection holds one (a second instance starting on the same new
            # state dir): it would otherwise stop that instance's start with "database is locked".
            _while_busy(lambda: cur.execute("PRAGMA journal_mode=WAL"))
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=5000")
            # A checkpoint that resets the WAL also shrinks it to this, so a burst leaves no large file.
            cur.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            cur.close()
            # BEGIN is ours to send (`_sqlite_begin`), not the driver's: it defers the write lock to
            # the first write, where a writer that finds another process's commit fails at once
            # (SQLITE_BUSY_SNAPSHOT) instead of waiting its turn.
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # A writing transaction takes the write lock at once, so it reads the audit chain's head
            # knowing no other process can move it before the commit; busy_timeout makes it wait (on
            # the recorder's writer connection, `begin_immediate`'s shorter steps).
            if conn.get_execution_options().get(WRITES):
                begin_immediate(conn.exec_driver_sql)
            else:
                conn.exec_driver_sql("BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, hide_parameters=True)


# Seconds a writing transaction waits for another connection's write lock on SQLite (busy_timeout).
BUSY_TIMEOUT = 5.0
# The first and the longest pause between two tries of the recorder's writer to take SQLite's write lock.
# SQLite's own busy handler sleeps 1, 2, 5, 10, 15... ms between tries, while another process's writer
# holds the lock for a fraction of a millisecond: two `--workers` recording at once would stall each
# other by milliseconds per commit. Shorter steps cost a few tries' CPU at most.
BUSY_FIRST_PAUSE = 0.00005
BUSY_LONGEST_PAUSE = 0.0005


def begin_immediate(execute: Callable[[str], object]) -> None:
    """BEGIN IMMEDIATE through `execute`, waiting up to `BUSY_TIMEOUT` for another writer's lock.

    On a connection whose busy_timeout is 0 (the recorder's writer, `Recorder._writer_connection`) the
    waiting is done here, in short steps; on any other, SQLite's busy handler does it before the first
    try fails, and no second try is made."""
    _while_busy(lambda: execute("BEGIN IMMEDIATE"))


def _while_busy(attempt: Callable[[], T]) -> T:
    """`attempt()`, tried again in short steps while SQLite says "database is locked", for up to
    `BUSY_TIMEOUT`: for a connection without a busy handler, and for the statements SQLite fails at once
    rather than risk a deadlock in its handler (turning a database to WAL while another holds a lock)."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    pause = BUSY_FIRST_PAUSE
    while True:
        try:
            return attempt()
        except Exception as exc:
            if not _busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, BUSY_LONGEST_PAUSE)


def _sqlite_wal(engine: SAEngine) -> str | None:
    """The WAL file of a SQLite database in WAL mode, None if it has none (in memory, another journal mode).

    Asked of SQLite, not read from the URL: a `file:` URI URL's database is not the file's path."""
    with engine.connect() as conn:
        if str(conn.exec_driver_sql("PRAGMA journal_mode").scalar()).lower() != "wal":
            return None
        main = [row[2] for row in conn.exec_driver_sql("PRAGMA database_list") if row[1] == "main"]
    return f"{main[0]}-wal" if main and main[0] else None


def _busy(exc: BaseException) -> bool:
    """Whether `exc` (the driver's, or SQLAlchemy's around it) is SQLite's "database is locked"."""
    cause = getattr(exc, "orig", None) or exc
    return (isinstance(cause, sqlite3.OperationalError)
            and (getattr(cause, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY)


def private_sqlite_files(url: str) -> None:
    """Create the SQLite file 0600 before SQLite does, and tighten one that exists (and its -wal, -shm).

    SQLite creates a database as 0644 less the umask, and its -wal and -shm files with the database
    file's mode: a file that is 0600 from the start keeps every call of every agent private to its owner.
    """
    found = _sqlite_file(url)
    if found is None:
        return
    path, may_create = found
    if may_create:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        except OSError:
            return  # e.g. a directory that does not exist: SQLite will say so, with its own message
    for name in (path, f"{path}-wal", f"{path}-shm", f"{path}-journal"):
        try:
            if os.stat(name).st_mode & 0o777 != 0o600:
                os.chmod(name, 0o600)
        except FileNotFoundError:
            pass


def _sqlite_file(url: str) -> tuple[str, bool] | None:
    """The file SQLite opens for `url`, and whether it may create it (None: a database in memory).

    Read as SQLAlchemy's pysqlite dialect hands it to SQLite (`create_connect_args`): a URI only with
    `uri=true`, and then as SQLite reads one (an empty or `localhost` authority, the path's %HH escapes
    decoded, and `mode`: ro and rw never create; memory is no file); otherwise the dialect's absolute
    filename as it stands, `file:` prefix and all (SQLite opens `<cwd>/file:NAME` for `sqlite:///file:NAME`)."""
    args, kwargs = sqlite.pysqlite.SQLiteDialect_pysqlite().create_connect_args(make_url(url))
    database = str(args[0]) if args else ""
    if not database or database == ":memory:":
        return None
    if not kwargs.get("uri"):
        return database, True
    if not database.startswith("file:"):
        return None  # not a name SQLite reads as a file URI: no file of ours to guess at
    path, _, rest = database[len("file:"):].partition("?")
    query = parse_qs(rest.partition("#")[0])
    path = path.partition("#")[0]
    if path.startswith("//"):
        authority, _, rest = path[2:].partition("/")
        if authority not in ("", "localhost"):
            return None  # SQLite refuses it, saying why
        path = "/" + rest
    path, mode = unquote(path), query.get("mode", [None])[-1]
    if not path or path == ":memory:" or mode == "memory":
        return None
    return path, mode in (None, "rwc")


def _cancel_timer(loop: asyncio.AbstractEventLoop, handle: asyncio.TimerHandle, _done: Future[Any]) -> None:
    """A done unit's withdrawal timer (`transact_soon`) cancelled in its loop's thread; nothing if the loop
    has closed meanwhile (its timers went with it)."""
    try:
        loop.call_soon_threadsafe(handle.cancel)
    except RuntimeError:
        pass


_DECISION, _OUTCOME, _EVENT, _UNIT = "decision", "outcome", "event", "unit"
_JOURNALED_CALL = "journaled_call"  # an outcome's: whether its call's row went through the journal (`_passable`)
T = TypeVar("T")
# What a unit of work run by `Recorder.transact` returns: its result, and the audit events that
# record it (each as `record_event` takes it).
Work = Callable[[Connection], tuple[T, Sequence[Mapping[str, Any]]]]
# One queued thing: what it is, its content, and the future its writer resolves (None: nobody waits).
Item = tuple[str, dict[str, Any], "Future[Any] | None"]
RATE_HORIZON = 0.5  # seconds: how far back the writer's estimate of the row rate mostly looks
# A caller commits its row itself (`Recorder._commit_now`) only with fewer than this many rows queued
# before it: more is a burst, better written in one of the writer's batches than on the caller's loop.
INLINE_MAX_QUEUED = 32
# Seconds after which a committed call still without its outcome (a slow upstream, a long answer, a hold)
# no longer counts as in flight for `Recorder._opened`: calls that overlap it by chance are not a load
# that group commit would serve better.
OPEN_HORIZON = 1.0
EVENT_KEYS = frozenset({"kind", "decision_id", "override_id", "agent", "actor", "payload"})
OUTCOME_KEYS = ("upstream_status", "duration_ms", "errors")
UNSURE_READS = 5  # tries to learn whether a unit's lost commit happened before its caller is told "unknown"
WAL_LIMIT = 16 * 1024 * 1024  # bytes: a SQLite WAL past this is truncated by a checkpoint, not just reused
# Seconds between SQLite checkpoints while rows are committed (`Recorder._checkpoints`): about as often
# as SQLite's own checkpoint every 1,000 pages would run at a few hundred commits a second.
CHECKPOINT_INTERVAL = 0.25
SQLITE_AUTOCHECKPOINT = 1000  # pages: SQLite's default, for a writer that checkpoints in its commits again


# Seconds a call (or a tunnel relayed uninspected) waits for its decision to be committed before it is
# refused: the writer fails a waiting call at once when the store fails; this bounds a store that only stalls.
RECORD_TIMEOUT = 5.0
# Seconds a journaled row (`Recorder.commit`) waits for others before the writer commits it: its call has
# gone on, so only the record's freshness waits, and the call's outcome usually shares the transaction.
JOURNAL_LINGER = 0.005
# The GIL's switch interval while a unit a reviewer waits on (`ahead_of_calls`) is queued or running, in
# place of the process's own. The writer gives the GIL up around every call into the database (the
# drivers release it) and each time waits up to one interval to take it back from a busy event loop:
# a vote is some twenty such calls, the batch it waits behind as many. At 10,000 held calls with traffic
# flowing, 0.1 ms (beside the process's 0.5 ms) took an approval's four steps on the writer from 42 to
# 26-27 ms at p50 (`bench/held_calls.py --trace`); the loop yields sooner only while a reviewer waits.
URGENT_SWITCH_INTERVAL = 0.0001
JOURNAL_SCAN_INTERVAL = 5.0  # seconds between looks for dead processes' journal segments
# A row is journaled (its call goes at once) only while the writer keeps up: fewer than this many items
# queued. Beyond, the call waits for its commit (and is refused if it does not come): a stuck writer must
# not let calls go that it will never commit.
JOURNAL_MAX_QUEUED = 2000
# Journaled calls whose outcome is not queued yet, remembered so that their outcome too may be passed by a
# unit of work (`Recorder._passable`); past this many, the oldest are forgotten (their outcome then waits
# its turn: slower for a unit, never wrong).
JOURNALED_REMEMBERED = 10_000


class StoreUnavailable(Exception):
    """The record cannot take a change now; the message says why."""


class AmbiguousCommit(StoreUnavailable):
    """A unit's commit failed in a way that leaves unknown whether it happened (the connection was lost
    during COMMIT), and the record could not be read to find out: re-read the state it changed."""


class _Urgency:
    """The GIL's switch interval at `URGENT_SWITCH_INTERVAL` while any unit a reviewer waits on is queued
    or running, whichever recorder it is queued to: the interval is the process's, so the count is too
    (a count per recorder would let one put back the interval another had cut, and the last leave it cut)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting = 0
        self._calm_us = _interval_us()

    def enter(self) -> None:
        with self._lock:
            self._waiting += 1
            if self._waiting == 1:
                self._calm_us = _interval_us()  # the process's own, as `Runtime.start` set it
                sys.setswitchinterval(URGENT_SWITCH_INTERVAL)

    def leave(self, _unit: Future[Any] | None = None) -> None:
        with self._lock:
            self._waiting -= 1
            if not self._waiting:
                # Half a microsecond over: CPython keeps whole microseconds, truncated, and a value read
                # back and set again as it reads (100 us reads 9.999...e-05) would lose one each time.
                sys.setswitchinterval((self._calm_us + 0.5) / 1e6)


def _interval_us() -> int:
    return round(sys.getswitchinterval() * 1e6)


_URGENCY = _Urgency()


def is_store_failure(exc: BaseException) -> bool:
    """Whether `exc` means the store could not take or give something now (rather than a bug)."""
    return isinstance(exc, StoreUnavailable | TimeoutError | SQLAlchemyError | OSError)


class Recorder:
    def __init__(
        self,
        engine: SAEngine,
        *,
        batch_size: int = 500,
        max_pending: int = 100_000,
        retry_interval: float = 0.5,
        linger: float = 0.05,
        busy_rate: float = 100.0,
        wal_limit: int = WAL_LIMIT,
        journaled: bool = True,
        journal_linger: float = JOURNAL_LINGER,
    ) -> None:
        self.engine = engine
        # The writer's transactions: on SQLite they take the write lock at BEGIN (see `make_engine`).
        self._writes = engine.execution_options(**{WRITES: True})
        self.batch_size = batch_size
        self.retry_interval = retry_interval
        self.linger = linger
        self.busy_rate = busy_rate
        self.wal_limit = wal_limit
        self.journal_linger = journal_linger
        self._rate, self._rate_at = 0.0, time.monotonic()  # rows a second lately (writer thread only)
        self._hurry = threading.Event()  # set by flush and by waiters: write what is queued now, no lingering
        # Unbounded so that a call already forwarded is always recorded; admission of new calls is
        # what `healthy` bounds. One queue for decisions and events keeps their order for the chain.
        self._queue: queue.Queue[Item] = queue.Queue()
        self.max_pending = max_pending
        self._failing = False
        self.last_error: str | None = None
        self.written = 0  # decision rows
        # Calls refused because the store could not take them: agent -> [count, first at, last at].
        self._refusals: dict[str, list[Any]] = {}
        self._refusals_lock = threading.Lock()
        self._refusals_writing = False  # taken for the batch being written, not yet committed
        self._sqlite = engine.dialect.name == "sqlite"
        # SQLite: commits by the writer (batches and units), and how many of them the last checkpoint found
        # (`_checkpoint`).
        self._commits = self._synced = 0
        # SQLite: the last checkpoint failed, so the writer checkpoints in its commits again (`_writer_connection`).
        self._self_checkpoint = False
        self._conn_wal = self._conn_self_checkpoint = False  # the writer's connection's mode and its setting
        self._wrote_at = time.monotonic()
        self._conn: Connection | None = None  # the writer thread's own (see `_transaction`)
        self._wal: str | None = None  # SQLite in WAL mode: the WAL file `_checkpoints` keeps bounded
        self._closed = False  # the writer thread has ended (`close`)
        self._late_lock = threading.Lock()
        # Held by whoever takes queued items and writes them: the writer thread, or a caller committing
        # its row itself (`_commit_now`). Taking and writing under it keeps the queue's order on the chain.
        self._writing = threading.Lock()
        # A batch committed by a caller whose commit failed in a way that leaves unknown whether it
        # happened, with the head that would tell: the writer settles it first (`_write`'s `unsure`).
        self._unsure: tuple[tuple[int, str], list[Item]] | None = None
        self._open: dict[str, float] = {}  # calls committed, not yet finished: decision id -> when (`_opened`)
        # Journaled calls not yet finished (their decision ids, oldest first): see `_passable`.
        self._journaled_open: OrderedDict[str, None] = OrderedDict()
        # Units of work queued and not yet taken by the writer: while any is, it does not linger (`_linger`).
        self._units_queued = 0
        self._units_lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._stop = threading.Event()
        # Dead journal segments the last look left (`_replay_dead`), and rows it set aside since the start.
        self.journal_kept = self.journal_rejected = 0
        self._writer_error: str | None = None  # the writer thread ended on an unexpected error (`_run`)
        migrate(engine)
        writable(self._writes)
        self._journal: journal.Journal | None = None  # SQLite in WAL mode: rows promised, not yet committed
        self._journal_dir: str | None = None
        self._scanned_at = time.monotonic()  # the last look for dead processes' segments (`_journal_chores`)
        if self._sqlite:
            self._wal = _sqlite_wal(engine)
            if self._wal is not None and journaled:
                self._journal_dir = journal.directory_for(self._wal[:-len("-wal")])
                self._journal = _open_journal(self._journal_dir)
                self._scan_dead()
        self._thread = threading.Thread(target=self._run, name="cedargate-recorder", daemon=True)
        self._thread.start()
        self._checkpointer: threading.Thread | None = None
        if self._wal is not None:
            self._checkpointer = threading.Thread(target=self._checkpoints, name="cedargate-checkpoint",
                                                  daemon=True)
            self._checkpointer.start()

    @property
    def healthy(self) -> bool:
        return not self._failing and self._queue.qsize() < self.max_pending

    @property
    def pending(self) -> int:
        # unfinished_tasks also counts the batch the writer holds while retrying; refusals count from
        # when they are counted until the event that holds them is committed, not just until taken.
        return self._queue.unfinished_tasks + (1 if self._refusals or self._refusals_writing else 0)

    def record(self, row: dict[str, Any]) -> None:
        """Enqueue a decision row, for a call that goes nowhere (refused): nobody waits for its commit.
        Like everything enqueued, it is never dropped: it is retried until it is in."""
        self._put((_DECISION, storable_row(row), None))

    def commit(self, row: dict[str, Any], *, fail_fast: bool = True) -> Future[None]:
        """Enqueue a decision row for a call about to go upstream, which waits on the future: it resolves
        once the row is committed. With `fail_fast` it fails (`StoreUnavailable`) as soon as a try to
        commit it fails, so a call waiting to go is refused now; without, it resolves only when the row is
        in (for a held call, which goes much later, if at all: a passing failure must not count then).
        Either way the row is retried until it is in. The writer takes it at once, without lingering.

        On SQLite, a row whose call fails fast while the store is healthy is appended to the journal
        (`proxy.record.journal`) instead, which is as durable as SQLite's commit (a process killed after it
        loses nothing; the next start replays it), and the future is resolved at once: the writer commits
        the row a few milliseconds later, with others. A journal that cannot be written fails the future
        (`StoreUnavailable`): the call is refused, and its row goes to the writer as a refused call's does."""
        item = storable_row(row)
        if fail_fast and self._journal is not None and self._keeping_up():
            return self._journaled(item)
        alone = self._opened(item["decision_id"])
        return (self._commit_now(item, fail_fast) if alone else None) or self._waited(_DECISION, item, fail_fast)

    def _keeping_up(self) -> bool:
        """Whether a journaled row will be committed soon: the store is not failing, and the writer
        thread lives (`_run`) and is not far behind. Otherwise a call waits for its own commit."""
        return (not self._failing and not self._stop.is_set() and self._thread.is_alive()
                and self._queue.qsize() < JOURNAL_MAX_QUEUED)

    def _journaled(self, item: dict[str, Any]) -> Future[None]:
        assert self._journal is not None
        try:
            segment = self._journal.append(item)
        except OSError as exc:
            log.error("the decision journal cannot be written; refusing the call: %s", exc)
            self._put((_DECISION, item, None))
            failed: Future[None] = Future()
            failed.set_exception(StoreUnavailable(f"the decision journal cannot be written: {_short(exc)}"))
            return failed
        done = _Journaled(segment)
        with self._open_lock:
            self._journaled_open[item["decision_id"]] = None
            if len(self._journaled_open) > JOURNALED_REMEMBERED:
                self._journaled_open.popitem(last=False)
        self._put((_DECISION, item, done))
        return done

    def _opened(self, decision_id: str) -> bool:
        """Note a call committed and not yet finished (until its `record_outcome`); whether it is the
        only one. Calls in flight together share the writer's commits (group commit), which a caller
        committing its own row (`_commit_now`) on their event loop would take from them: each would
        commit alone. A call whose outcome never comes stops counting after `OPEN_HORIZON` seconds."""
        now = time.monotonic()
        with self._open_lock:
            while self._open:
                first = next(iter(self._open))
                if now - self._open[first] < OPEN_HORIZON:
                    break
                del self._open[first]
            alone = not self._open
            self._open[decision_id] = now
        return alone

    def commit_event(self, event: Mapping[str, Any]) -> Future[None]:
        """`record_event` for an event that must be on the record before what it describes happens (a
        tunnel relayed uninspected): the future as `commit`'s, failing fast."""
        return self._waited(_EVENT, _event_item(event), True)

    def _commit_now(self, item: dict[str, Any], fail_fast: bool) -> Future[None] | None:
        """SQLite: commit a waited-on row in the caller's thread, if the writer is idle and the write lock
        is free now; None (nothing written) if not, and the row goes through the writer.

        A call that waits for its row alone otherwise pays two thread hand-offs (to the writer, and
        back to its event loop), each a wake-up of a thread that, on a busy machine, waits its turn for
        a CPU: at one call at a time they were most of the wait. The caller's loop is held for the
        commit itself (about 0.2 ms: SQLite's WAL without syncs, checkpoints on their own thread) and
        never for a lock: one try, and another process's lock, the writer at work, a unit of work or
        many rows queued, a failing store or counted refusals all leave it to the writer. What is
        queued (outcomes, events: nobody waits on them) is taken into the same transaction, first."""
        if not self._sqlite or self._failing or self._closed or self._refusals or self._unsure is not None:
            return None
        if self._wal is None:  # not in WAL mode: its COMMIT would wait for readers (`_writer_connection`)
            return None
        if not self._writing.acquire(blocking=False):
            return None
        try:
            with self._queue.mutex:
                queued = list(self._queue.queue)
            if len(queued) >= INLINE_MAX_QUEUED or any(tag == _UNIT for tag, _, _ in queued):
                return None
            batch = [self._queue.get_nowait() for _ in queued]  # exactly those: only writers take, under the lock
            committed = _Commit(fail_fast)
            if self._write(batch, own=(_DECISION, item, committed), once=True) is None:
                # Not written: the rows taken go back to the front of the queue, in order, for the writer.
                with self._queue.mutex:
                    self._queue.queue.extendleft(reversed(batch))
                    self._queue.not_empty.notify()
                return None
            return committed  # settled; or, after an unsure commit, left to the writer to settle
        finally:
            self._writing.release()

    def _waited(self, tag: str, item: Any, fail_fast: bool) -> Future[None]:
        committed = _Commit(fail_fast)
        self._put((tag, item, committed))
        self._hurry.set()
        return committed

    def record_outcome(self, decision_id: str, agent: str, outcome: Mapping[str, Any]) -> None:
        """Add what became of a recorded call (`upstream_status`, `duration_ms`, `errors`) to its row, and
        chain it as an `outcome` event, so the tamper-evident log holds it too."""
        with self._open_lock:
            self._open.pop(decision_id, None)
            journaled = self._journaled_open.pop(decision_id, False) is None
        values = {key: outcome.get(key) for key in OUTCOME_KEYS}
        if isinstance(values["errors"], str):
            values["errors"] = _storable(values["errors"])
        self._put((_OUTCOME, {"decision_id": decision_id, "agent": agent, **values, _JOURNALED_CALL: journaled},
                   None))

    def count_refusal(self, agent: str) -> None:
        """A call refused because the store could not take it: counted, and chained as one
        `store_refusals` event per agent each time the writer commits, not as a row per call."""
        now = utcnow()
        with self._refusals_lock:
            counted = self._refusals.get(agent)
            if counted is None:
                self._refusals[agent] = [1, now, now]
            else:
                counted[0] += 1
                counted[2] = now

    def record_event(self, event: Mapping[str, Any]) -> None:
        """Chain an event other than a decision (an override created, approved, released...) onto the log.

        `event` has `kind` and optionally `decision_id`, `override_id`, `agent`, `actor` (strings) and
        `payload` (a dict of JSON values and datetimes); its time is now. Like `record`, it is never
        dropped; an event the log could not hold raises here, in the caller, not later in the writer.
        """
        self._put((_EVENT, _event_item(event), None))

    def _put(self, item: Item) -> None:
        self._queue.put_nowait(item)
        if self._closed:
            self._write_late()

    def _write_late(self) -> None:
        """Write what was enqueued after the writer stopped, in the caller's thread: a call still
        finishing while the program shuts down (its event loop runs the last steps of its connections
        after the core was closed) is recorded all the same, or said loudly not to be."""
        with self._late_lock, self._writing:
            batch = []
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            # A unit of work queued as the writer stopped (`transact_soon` passed its check first) is
            # never run after close: its caller learns so; the rows and events around it are written.
            rows = [queued for queued in batch if queued[0] != _UNIT]
            self._units_closed(batch)
            if rows and not self._write(rows):
                log.error("after close, %d decisions/events NOT written: %s", len(rows),
                          self.last_error or "the store failed")
            self._drop_connection()

    def unavailable_reason(self) -> str | None:
        if self._writer_error is not None:
            return (f"the decision store's writer stopped on an unexpected error ({self._writer_error}): "
                    "restart cedargate")
        if self._failing:
            return f"the decision store is failing: {self.last_error}"
        if self._queue.qsize() >= self.max_pending:
            return f"the decision store is {self._queue.qsize()} rows behind"
        return None

    def hurry(self) -> None:
        """Someone waits on what is queued: the writer takes it now rather than lingering for more."""
        self._hurry.set()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row enqueued so far is committed; False if that did not happen in time."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            self._hurry.set()  # again each time: the writer may have taken the last one for an earlier batch
            time.sleep(0.005)
        return not self.pending

    def close(self, timeout: float = 10.0) -> None:
        """Write everything queued, for as long as the writer makes progress, then stop it.

        Only `timeout` seconds without any progress (the store is failing) end the wait; what could not
        be written then is logged as lost, loudly, never dropped in silence.
        """
        left, progress_at = self.pending, time.monotonic()
        while left and not self.flush(min(0.5, timeout)):
            if self.pending < left:
                left, progress_at = self.pending, time.monotonic()
            elif time.monotonic() - progress_at >= timeout:
                break
        self._stop.set()
        self._thread.join(timeout)
        if self._checkpointer is not None:
            self._checkpointer.join(timeout)
        if not self._thread.is_alive():
            self._closed = True  # from now on a late row is written by whoever enqueues it (`_put`)
            self._write_late()
        if self._journal is not None:
            # Deleted if everything in it is committed, else left for the next start to replay. Without the
            # writing lock (a writer stuck in the store), a row it commits later only keeps its segment.
            locked = self._writing.acquire(timeout=timeout)
            try:
                self._journal.close()
            finally:
                if locked:
                    self._writing.release()
        if self.pending:
            log.error(
                "closing the decision record with %d decisions/events NOT written (the store made no progress "
                "for %g s: %s); they are lost", self._queue.unfinished_tasks + len(self._refusals), timeout,
                self.last_error or "busy",
            )

    def transact(self, work: Work[T], timeout: float = 30.0) -> T:
        """Run `work(connection)` on the writer thread in one transaction with the events it returns.

        The work runs after every row and event enqueued before this call and before any enqueued
        after it; its events are chained in the same transaction, so what it changed and the audit rows
        that say so commit together or not at all. Whatever `work` raises, or the commit raises, is
        raised here with nothing written. A commit that failed after it may have happened (the
        connection lost during COMMIT) is checked against the log: if it happened, its result is
        returned as if nothing failed; if that cannot be learnt, `AmbiguousCommit` is raised. A unit the
        writer has not started within `timeout` seconds (the store is failing, say) is withdrawn and
        `TimeoutError` raised; while the store is known to be failing, `StoreUnavailable` is raised at once.
        """
        future = self._queued_unit(work)
        try:
            return future.result(timeout)
        except FutureTimeout:
            self._withdraw(future, timeout)
            return future.result()  # TimeoutError if withdrawn; if started meanwhile, its outcome

    def transact_soon(self, work: Work[T], timeout: float | None = None, *,
                      ahead_of_calls: bool = False) -> Future[T]:
        """`transact` without waiting, for an event loop: the unit is queued as `transact` queues it and
        the future, resolved on the writer thread, holds what `transact` would return or raise. Never
        blocks; `StoreUnavailable` is raised at once while the store is known to be failing.

        Until the writer starts the unit, `future.cancel()` withdraws it (nothing runs). With `timeout`,
        called on a thread that runs an event loop, a loop timer withdraws it after `timeout` seconds as
        `transact` does: a unit not started by then never runs and its future holds `TimeoutError`, one
        started runs to its outcome; the timer is cancelled once the unit is done.

        `ahead_of_calls`: the unit may commit before the journaled calls' rows and outcomes queued last
        before it (`_passable`), rather than after their batch's commit; for a step a reviewer waits on.
        Then its result says nothing of those rows (they may not be committed yet: `flush` waits for them),
        and `work` must not read them."""
        future = self._queued_unit(work, ahead_of_calls)
        if timeout is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                handle = loop.call_later(timeout, self._withdraw, future, timeout)
                # Once the unit is done, its timer goes (resolved on the writer thread: via the loop), rather
                # than keeping a timer, the future and its result alive for `timeout` after every unit.
                future.add_done_callback(functools.partial(_cancel_timer, loop, handle))
        return future

    def _queued_unit(self, work: Work[T], ahead_of_calls: bool = False) -> _Unit[T]:
        """`work` queued for the writer, once checked as both `transact` and `transact_soon` check it."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("Recorder.transact called from the writer thread itself")
        if self._stop.is_set():
            raise RuntimeError("the recorder is closed")
        if self._failing:  # as the gate refuses calls: fail now rather than wait behind the retries
            raise StoreUnavailable(f"the decision store is failing: {self.last_error}")
        future: _Unit[T] = _Unit()
        with self._units_lock:
            self._units_queued += 1
        if ahead_of_calls:
            _URGENCY.enter()
            future.add_done_callback(_URGENCY.leave)  # done however it ends: run, failed, withdrawn or cancelled
        self._queue.put_nowait((_UNIT, {"work": work, "ahead_of_calls": ahead_of_calls}, future))
        self._hurry.set()
        return future

    def _withdraw(self, unit: _Unit[Any], waited: float) -> None:
        """End a unit the writer has not started after `waited` seconds with `TimeoutError`, saying why
        (the one message whoever waits for a unit gets, on a thread or an event loop); nothing of it runs."""
        unit.withdraw(TimeoutError(
            f"the decision store did not take the change within {waited:g} s: {self.last_error or 'busy'}"))

    def _run(self) -> None:
        """The writer thread. An unexpected error ends it, but never silently: the recorder is failing from
        then on (calls are refused, units fail at once), and `unavailable_reason` says why."""
        try:
            self._write_until_stopped()
        except BaseException as exc:
            self._writer_error = _short(exc)
            self.last_error = f"the writer stopped: {self._writer_error}"
            self._failing = True
            log.critical("the decision store's writer stopped on an unexpected error; refusing calls until "
                         "cedargate is restarted", exc_info=True)

    def _write_until_stopped(self) -> None:
        while not self._stop.is_set():
            first = self._next(0.2)
            if first is None:
                if self._refusals or self._unsure is not None:
                    with self._writing:
                        self._write([])
                if self._journal is not None:
                    with self._writing:
                        self._journal_chores()
                store_backlog(0, 0.0)
                continue
            if first[0] != _UNIT and (first[2] is None or isinstance(first[2], _Journaled)):
                self._linger(journaled=isinstance(first[2], _Journaled))  # nobody waits on it: it may wait for company
            with self._writing:
                batch: list[Item] = []
                while len(batch) < self.batch_size:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if not batch:  # a caller committed them with its own row (`_commit_now`)
                    store_backlog(self._queue.qsize(), 0.0)
                    continue
                # In queue order, except that a unit of work `ahead_of_calls` goes ahead of the journaled
                # calls' rows and outcomes queued just before it (`_passable`).
                ahead: list[Item] = []
                for taken, queued in enumerate(batch):
                    if queued[0] != _UNIT:
                        ahead.append(queued)
                        continue
                    with self._units_lock:
                        self._units_queued -= 1
                    first_kept = len(ahead) if not queued[1]["ahead_of_calls"] else next(
                        (index + 1 for index in range(len(ahead) - 1, -1, -1) if not _passable(ahead[index])), 0)
                    if (first_kept or self._unsure is not None) and not self._write(ahead[:first_kept]):
                        self._units_closed(batch[taken:], first_counted=True)
                        return
                    del ahead[:first_kept]
                    self._run_unit(queued[1], queued[2])
                    self._queue.task_done()
                if (ahead or self._unsure is not None) and not self._write(ahead):
                    return
                if self._journal is not None:
                    self._journal_chores()

    def _units_closed(self, taken: list[Item], *, first_counted: bool = False) -> None:
        """The units among `taken` (off the queue) that will never run, the recorder being closed: queued
        after the writer stopped (`_write_late`), or in a batch the writer stopped before running them
        (the store refused the rows ahead of them until close gave up). Each fails "closed" rather than
        never end (its waiter, and the process's switch interval: `_URGENCY`). `first_counted`: the
        first item, a unit, was counted out of `_units_queued` when taken."""
        for index, (tag, _, future) in enumerate(taken):
            if tag != _UNIT:
                continue
            if index or not first_counted:
                with self._units_lock:
                    self._units_queued -= 1
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the recorder is closed"))
            self._queue.task_done()

    def _next(self, timeout: float) -> Item | None:
        """The first queued item, left in the queue (whoever writes takes it, under `_writing`), once
        there is one; None if none came within `timeout` seconds."""
        with self._queue.not_empty:
            if not self._queue.queue:
                self._queue.not_empty.wait(timeout)
            return self._queue.queue[0] if self._queue.queue else None

    def _write(self, batch: list[Item], *, own: Item | None = None, once: bool = False) -> bool | None:
        """Commit decisions, outcomes and events, retrying until they are in; False if the recorder closed
        first. Never twice: after a failed commit, the log is read to learn whether it happened anyway.
        Called with `_writing` held. First, a caller's batch whose commit was unsure (`_unsure`) is settled.

        `own`: a caller's row written after `batch`, not taken from the queue. `once`: one try, taking
        the write lock only if it is free (`_commit_now`): None if nothing was written (the caller hands
        the rows back); an unsure commit is left to the writer (`_unsure`), its waiters unsettled."""
        if self._unsure is not None and not once:
            unsure, taken = self._unsure
            if not self._write_all(taken, [], unsure=unsure):
                return False
            self._unsure = None
        if not batch and own is None and not self._refusals:
            return True
        return self._write_all(batch, [] if own is None else [own], once=once)

    def _write_all(self, batch: list[Item], own: list[Item], *, once: bool = False,
                   unsure: tuple[int, str] | None = None) -> bool | None:
        items = batch + own
        rows = [_table_row(item) for tag, item, _ in items if tag == _DECISION]
        outcomes = [{"b_id": item["decision_id"], "b_status": item["upstream_status"],
                     "b_ms": item["duration_ms"], "b_errors": item["errors"]}
                    for tag, item, _ in items if tag == _OUTCOME]
        events = [_chained(tag, item) for tag, item, _ in items]
        # The refusals counted are taken into the first try that writes: not before the check of an unsure
        # commit, which did not hold them, so a commit found to have landed leaves them for the next.
        refusals_due = not once
        waiting = [future for _, _, future in items if future is not None]
        # `unsure`: the head of a try whose commit may have happened
        while True:
            try:
                if unsure is not None and self._landed(unsure):
                    break
                unsure = None
                if refusals_due:
                    refusals_due = False
                    self._refusals_writing = True  # before taking them, so `pending` never reads none meanwhile
                    refusals = self._take_refusals()
                    self._refusals_writing = bool(refusals)
                    events += refusals
                if self._sqlite:
                    with self._sqlite_transaction(wait=not once) as cursor:
                        chained = events
                        if rows:
                            inserted = _insert_sqlite(cursor, rows)
                            if len(inserted) < len(rows):
                                chained = _only_inserted(items, events, inserted)
                        if outcomes:
                            _add_outcomes_sqlite(cursor, outcomes)
                        unsure = audit.append_sqlite(cursor, chained)
                else:
                    with self._transaction() as conn:
                        chained = events
                        if rows:
                            inserted = set(conn.execute(_insert_new(conn), rows).scalars())
                            if len(inserted) < len(rows):
                                chained = _only_inserted(items, events, inserted)
                        if outcomes:
                            conn.execute(_ADD_OUTCOME, outcomes)
                        unsure = audit.append(conn, chained)
                break
            except Exception as exc:  # any driver error: keep the batch, refuse calls, retry
                if unsure is not None and self._landed_now(unsure):
                    break
                if once:
                    if unsure is None:
                        return None  # nothing committed: the writer takes the rows, and any failure, from here
                    # It may have happened: the writer finds out before it writes anything else.
                    self._unsure = (unsure, items)
                    with self._queue.mutex:
                        self._queue.unfinished_tasks += len(own)  # pending until the writer settles them
                        self._queue.not_empty.notify()
                    return True
                self._failed(exc)
                for future in waiting:  # a call waiting to go upstream is refused now, not at its timeout
                    if not isinstance(future, _Commit) or future.fail_fast:  # narrows the type: a batch's are all
                        _settle(future, StoreUnavailable(f"the decision store is failing: {self.last_error}"))
                if self._stop.wait(self.retry_interval):
                    return False
        for future in waiting:  # first: these calls wait to go upstream
            if isinstance(future, _Journaled):
                future.segment.committed += 1  # under `_writing`: `Journal.maintain` reads it there
            else:
                _settle(future)
        self._commits += 1
        self._wrote_at = time.monotonic()
        self._rate += len(items) / RATE_HORIZON  # whoever wrote them (`_linger` reads it)
        self._recovered()
        self._refusals_writing = False
        self.written += len(rows)
        if not once:  # a caller's own commit (a call alone) leaves the gauges to the writer's next round
            store_backlog(self._queue.qsize(), _lag(items))
        for _ in batch:
            self._queue.task_done()
        return True

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """One writing transaction on the writer's own connection, kept between transactions: taking
        one from the pool and giving it back (with its reset) for every commit costs as much as a
        small batch's statements."""
        conn = self._writer_connection()
        try:
            with conn.begin():
                yield conn
        except BaseException:
            self._drop_connection()
            raise

    @contextmanager
    def _sqlite_transaction(self, *, wait: bool = True) -> Iterator[sqlite3.Cursor]:
        """`_transaction` on SQLite for a batch, through the driver: SQLAlchemy's execution path for the
        batch's few statements cost the writer more than SQLite's own work (about 0.25 ms a commit).
        Without `wait`, one try to take the write lock: `_LockTaken` if another connection holds it."""
        raw = self._writer_connection().connection.dbapi_connection
        assert isinstance(raw, sqlite3.Connection)
        if not wait:
            try:
                raw.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if _busy(exc):
                    raise _LockTaken() from None  # nothing wrong with the connection: keep it
                self._drop_connection()
                raise
        try:
            if wait:
                begin_immediate(raw.execute)
            yield raw.cursor()
            raw.execute("COMMIT")
        except BaseException:
            try:
                if raw.in_transaction:
                    raw.execute("ROLLBACK")
            except Exception:  # the connection is dropped all the same
                pass
            self._drop_connection()
            raise

    def _writer_connection(self) -> Connection:
        """The writer's connection, opened when there is none. On SQLite it waits for another writer's
        lock in `begin_immediate`'s short steps (busy_timeout 0: every transaction on it begins there),
        and it never checkpoints in a commit: `_checkpoints` does, on a connection and thread of its own,
        so no call waiting for its row also waits for the WAL to be copied and synced."""
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            conn = self._writes.connect()
            if self._sqlite:
                raw = conn.connection.dbapi_connection
                assert raw is not None
                # Not waiting in SQLite's busy handler is right only in WAL mode, where COMMIT never waits
                # for readers: in a rollback journal it must wait for every reader's lock, and with no
                # timeout it would fail (refusing calls) whenever anyone reads. Such a file (journal_mode=WAL
                # did not take) keeps SQLite's waiting, and its own checkpoints.
                self._conn_wal = raw.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
                if self._conn_wal:
                    raw.execute("PRAGMA busy_timeout=0")
                else:
                    log.warning("the decision store %s is not in WAL mode (journal_mode=WAL did not take): "
                                "its commits wait for readers", self.engine.url.render_as_string(hide_password=True))
                self._conn_self_checkpoint = True  # SQLite's default
            self._conn = conn
        if self._sqlite:
            # Checkpoints are `_checkpoints`' only while it finds the WAL and its checkpoints succeed; else
            # SQLite's own, in the commits, rather than a WAL that grows without bound.
            itself = not self._conn_wal or self._wal is None or self._self_checkpoint
            if itself != self._conn_self_checkpoint:
                raw = self._conn.connection.dbapi_connection
                assert raw is not None
                raw.execute(f"PRAGMA wal_autocheckpoint={SQLITE_AUTOCHECKPOINT if itself else 0}")
                self._conn_self_checkpoint = itself
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                # Closed for good, not pooled: on SQLite its settings are the writer's own (`_writer_connection`).
                self._conn.invalidate()
                self._conn.close()
            except Exception:  # a dead connection: the pool forgets it all the same
                pass
            self._conn = None

    def _landed(self, head: tuple[int, str]) -> bool:
        """Whether a commit that failed happened all the same (raises if the log cannot be read)."""
        with self.engine.connect() as conn:
            happened = audit.landed(conn, head)
        if happened:
            log.warning("a commit reported as failed had happened (its acknowledgement was lost); not repeated")
        return happened

    def _landed_now(self, head: tuple[int, str]) -> bool:
        """`_landed`, False when the log cannot be read now (the caller keeps `head` to ask again)."""
        try:
            return self._landed(head)
        except Exception:
            return False

    def _run_unit(self, unit: dict[str, Any], future: Future[Any] | None) -> None:
        """One caller's change and its events in one transaction; its outcome goes back to the caller,
        not retried here (the caller knows whether trying again makes sense)."""
        assert future is not None
        if not future.set_running_or_notify_cancel():
            return  # the caller gave up waiting before it started
        head: tuple[int, str] | None = None
        try:
            with self._transaction() as conn:
                result, events = unit["work"](conn)
                head = self._chain_unit(conn, [_event_item(e) for e in events])
        except BaseException as exc:
            happened = None if head is None else self._unit_landed(head, exc)
            if happened:
                future.set_result(result)
            elif happened is None and head is not None:
                future.set_exception(AmbiguousCommit(
                    "the decision store failed while committing a change and cannot be read to tell whether "
                    f"the change was made: {_short(exc)}"))
            else:
                future.set_exception(exc)
            return
        self._commits += 1  # for `_checkpoints`: a unit's commit grows the WAL as a batch's does
        future.set_result(result)

    def _chain_unit(self, conn: Connection, events: list[dict[str, Any]]) -> tuple[int, str] | None:
        """A unit's events chained in its transaction. On SQLite through the driver, as a batch's are
        (`append_sqlite`; the transaction began IMMEDIATE, so the head it reads is its own): through
        SQLAlchemy the three statements cost the writer 0.4 ms of CPU, over a quarter of a vote's unit, for
        SQLite's 0.13 ms."""
        if not self._sqlite:
            return audit.append(conn, events)
        cursor = None
        try:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            return audit.append_sqlite(cursor, events)
        except sqlite3.Error as exc:
            # Raised as SQLAlchemy raises the driver's errors: the unit's caller tells a busy store
            # (OperationalError: cast the vote again) or a refused write by SQLAlchemy's classes.
            raise DBAPIError.instance(None, None, exc, sqlite3.Error, hide_parameters=True) from exc
        finally:
            with contextlib.suppress(sqlite3.Error):  # a closing error never hides the one raised
                if cursor is not None:
                    cursor.close()

    def _unit_landed(self, head: tuple[int, str], exc: BaseException) -> bool | None:
        """Whether a unit's failed commit happened; None if the log could not be read to tell."""
        for attempt in range(UNSURE_READS):
            try:
                return self._landed(head)
            except Exception:
                if attempt + 1 < UNSURE_READS:
                    self._stop.wait(self.retry_interval)
        log.error("a change's commit failed and the log cannot be read to tell whether it happened: %s",
                  _short(exc))
        return None

    def _journal_chores(self) -> None:
        """Rotate the journal and delete its committed segments; now and then, replay the segments of
        processes that died (a `--workers` worker killed, say). Called by the writer, with `_writing` held."""
        assert self._journal is not None
        try:
            self._journal.maintain()
        except OSError as exc:  # the next append finds out for itself, and refuses its call
            log.error("decision journal rotation failed: %s", exc)
        if time.monotonic() - self._scanned_at >= JOURNAL_SCAN_INTERVAL and not self._failing:
            self._scan_dead()

    def _scan_dead(self) -> None:
        """`_replay_dead`, whose failure (EMFILE at the open-file limit, an unreadable directory...) is said
        and tried again at the next look, never raised into the writer."""
        try:
            self._replay_dead()
        except Exception as exc:
            self._scanned_at = time.monotonic()
            log.error("looking for dead decision journals failed (next look in %g s): %s", JOURNAL_SCAN_INTERVAL,
                      _short(exc))

    def _replay_dead(self) -> int:
        """Commit the rows of every journal segment whose owner is gone (`replay_segments`) on the writer's
        connection; the rows replayed."""
        assert self._journal_dir is not None and self._journal is not None
        self._scanned_at = time.monotonic()
        done = replay_segments(self._journal_dir, self._sqlite_transaction, owns=self._journal.owns)
        self._commits += done.commits
        self.written += done.replayed
        self.journal_kept = done.kept
        self.journal_rejected += done.rejected
        return done.replayed

    def _failed(self, exc: Exception) -> None:
        if not self._failing:
            log.error("decision store write failed; refusing calls until it recovers: %s", exc)
        self._failing = True
        self.last_error = _short(exc)
        # New connections for the retry: a SQLite file opened while read-only stays read-only for the
        # connection that opened it, and a PostgreSQL connection may be half-dead.
        self._drop_connection()
        self.engine.dispose()

    def _recovered(self) -> None:
        if self._failing:
            log.warning("decision store recovered")
        self._failing = False
        self.last_error = None

    def _take_refusals(self) -> list[dict[str, Any]]:
        if not self._refusals:
            return []
        with self._refusals_lock:
            taken, self._refusals = self._refusals, {}
        return [{"kind": audit.EventKind.STORE_REFUSALS.value, "at": last, "agent": agent,
                 "payload": canonical_text({"count": count, "first_at": first, "last_at": last,
                                            "problem": "store-unavailable"})}
                for agent, (count, first, last) in taken.items()]

    def _checkpoints(self) -> None:
        """SQLite: keep the WAL from growing without bound, on a thread of its own (the writer's commits
        never checkpoint, `_writer_connection`), so the calls waiting for a commit never wait for one."""
        while not self._stop.wait(CHECKPOINT_INTERVAL):
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Copy the WAL into the database (PASSIVE: it never waits for readers or writers) if anything
        was committed since the last time; past `wal_limit` bytes also truncate it, waiting briefly."""
        commits = self._commits
        if self._wal is None or commits == self._synced:
            return
        try:
            large = os.stat(self._wal).st_size > self.wal_limit
        except OSError:  # no WAL file to measure (none yet, say): copy what there is, if any
            large = False
        try:
            with self.engine.connect() as conn:
                if large:
                    conn.exec_driver_sql("PRAGMA busy_timeout=200")
                    try:
                        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                    finally:
                        conn.exec_driver_sql("PRAGMA busy_timeout=5000")
                else:
                    conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self._synced = commits
            self._self_checkpoint = False  # the writer leaves checkpoints to this thread again
        except Exception as exc:  # a checkpoint is housekeeping: the next round tries again
            log.warning("decision store checkpoint failed: %s", _short(exc))
            # Meanwhile the writer checkpoints in its commits (`_writer_connection`): slower commits rather
            # than a WAL that grows until the disk is full.
            self._self_checkpoint = True

    def _linger(self, journaled: bool = False) -> None:
        """Group commit: while rows come faster than `busy_rate` a second, wait up to `linger` seconds
        before taking a batch, so the calls in flight join its transaction.

        A transaction's fixed cost (its statements, moving the head, the commit's page writes) is many
        rows' worth, and every wake-up of this thread takes the GIL from the proxy's event loop: at a few
        hundred calls a second, batches of one or two rows cost the proxy more than deciding the calls.
        Only rows nobody waits on linger: a call waiting for its record before it goes upstream cuts
        the wait short (`hurry`), and the calls that arrive while a commit runs share the next one.
        An idle proxy writes each row as soon as this thread wakes. A journaled row (`commit`) always
        waits up to `journal_linger`: its call has gone on, and its outcome usually joins it in the batch.
        """
        now = time.monotonic()
        self._rate *= math.exp((self._rate_at - now) / RATE_HORIZON)  # rows taken since are added on
        self._rate_at = now
        if self._units_queued:  # a unit waits in the queue (past the last batch, say): no lingering for it
            return
        if journaled and self._queue.qsize() + 1 < self.batch_size:
            if self._hurry.wait(max(self.journal_linger, self.linger if self._rate >= self.busy_rate else 0.0)):
                self._hurry.clear()
            return
        if self._rate >= self.busy_rate and self._queue.qsize() + 1 < self.batch_size:
            if self._hurry.wait(self.linger):
                self._hurry.clear()


def _passable(queued: Item) -> bool:
    """Whether a unit of work `ahead_of_calls` queued after this item may commit before it: a journaled call's
    decision row or its outcome. The call has gone upstream and its row is safe in the journal; no unit reads
    the decisions table, and a unit's events on the chain before these rows' say only that it committed
    first. So a reviewer's vote does not wait for the commit of the journaled rows queued before it (tens
    of them under load). An event, a refused call's row or a row a caller waits on (a held call's) keeps its
    place: the chain tells their order."""
    tag, item, future = queued
    return (tag == _DECISION and isinstance(future, _Journaled)) or (tag == _OUTCOME and item[_JOURNALED_CALL])


def _lag(batch: list[Item]) -> float:
    """Seconds since the oldest decision or event of a batch just committed was made (0 if none says)."""
    times = [item["at"] for tag, item, _ in batch if tag in (_DECISION, _EVENT)]
    aware = [at for at in times if isinstance(at, datetime) and at.tzinfo is not None]
    return (utcnow() - min(aware)).total_seconds() if aware else 0.0


class _Journaled(Future[None]):
    """A journaled row's future (`Recorder.commit`): resolved from the start, since the row is in the journal;
    it carries the segment, which counts the row once the writer has committed it."""

    def __init__(self, segment: journal.Segment) -> None:
        super().__init__()
        self.segment = segment
        self.set_result(None)


def _open_journal(directory: str) -> journal.Journal:
    try:
        return journal.Journal(directory)
    except journal.JournalRefused as exc:
        raise StoreUnavailable(f"{exc}; cedargate records every call there before forwarding it") from None
    except OSError as exc:
        raise StoreUnavailable(
            f"the decision journal {directory} cannot be written ({_short(exc)}): cedargate records every call "
            "before forwarding it. Make the database's directory writable by this user, then start again"
        ) from None


@dataclass
class JournalReplay:
    """What a look at the dead journal segments (`replay_segments`) did."""

    replayed: int = 0  # rows committed to the record now
    rejected: int = 0  # rows the store refused, moved to a quarantine file beside their segment
    commits: int = 0  # transactions committed
    kept: int = 0  # dead segments left for the next look (the store failed, or a file could not be read)
    unread: int = 0  # of those, segments whose rows could not even be read (so not in `kept_ids`)
    # The decision ids of the kept segments' rows (some may be in the record already: `journal_waiting`).
    kept_ids: set[str] = field(default_factory=set)


# A row the store refuses for what it holds (a NOT NULL column missing from a line written by another
# release, a value of a type no column takes), not because the store fails: such a row is set aside rather
# than kept with its segment, where it would keep every other row of the segment off the record for good.
_DATA_ERRORS = (sqlite3.IntegrityError, sqlite3.DataError, KeyError, TypeError, ValueError)


def _data_error(exc: BaseException) -> bool:
    return isinstance(exc, _DATA_ERRORS) or (
        isinstance(exc, sqlite3.ProgrammingError) and str(exc).startswith("Error binding parameter"))


Transaction = Callable[[], AbstractContextManager[sqlite3.Cursor]]


def replay_segments(directory: str, transaction: Transaction, *,
                    owns: Callable[[str], bool] = lambda path: False) -> JournalReplay:
    """Commit the rows of every journal segment in `directory` whose owner is gone (its lock can be taken)
    and is not `owns`'d, each segment in one `transaction()` (a cursor in a transaction begun IMMEDIATE),
    then delete it; rows already in (by decision id) are neither written nor chained again.

    A segment whose transaction fails for a row's data (`_data_error`) is written again row by row: the
    rows the store takes are committed, the others go with the reason to `<segment>.rejected` (0600,
    one line each, a journal line with a "reason") and are logged loudly. A segment that cannot be
    committed now (the store fails) or read is left for the next look; one such segment does not stop
    the others. Serves the recorder (`Recorder._replay_dead`) and the commands that read the record
    (`replay_journal`)."""
    done = JournalReplay()
    try:
        paths = journal.segment_paths(directory)
    except OSError as exc:
        log.error("the decision journal %s cannot be listed now (looked at again later): %s", directory, exc)
        return done
    for path in paths:
        if owns(path):
            continue
        rows: list[dict[str, Any]] | None = None
        try:
            with journal.dead_segment(path) as dead:
                if dead is None:
                    continue
                rows = dead.rows()
                replayed, rejected = _replay_segment(path, rows, transaction)
                done.commits += 1 if replayed or rejected else 0
                done.replayed += replayed
                if rejected:
                    _quarantine(path, rejected)
                    done.rejected += len(rejected)
                dead.remove()
                if rows:
                    log.warning("replayed decision journal %s of a process that stopped without committing it: "
                                "%d of its %d rows were not in the record, %d set aside", path, replayed, len(rows),
                                len(rejected))
        except Exception as exc:
            done.kept += 1
            if rows is None:
                done.unread += 1
            else:
                done.kept_ids.update(row["decision_id"] for row in rows if isinstance(row.get("decision_id"), str))
            log.error("decision journal %s could not be replayed now (kept for the next try): %s", path, _short(exc))
    return done


def _replay_segment(path: str, rows: list[dict[str, Any]],
                    transaction: Transaction) -> tuple[int, list[tuple[dict[str, Any], str]]]:
    """A dead segment's rows into the record: the rows inserted, and the rows refused with the reason."""
    rejected: list[tuple[dict[str, Any], str]] = []
    unique: dict[str, dict[str, Any]] = {}
    for row in rows:
        if isinstance(row.get("decision_id"), str):
            unique.setdefault(row["decision_id"], row)
        else:
            rejected.append((row, "no decision_id"))
    if not unique:
        return 0, rejected
    try:
        with transaction() as cursor:
            inserted = _insert_sqlite(cursor, [_table_row(row) for row in unique.values()])
            audit.append_sqlite(cursor, [_decision_event(row) for row in unique.values()
                                         if row["decision_id"] in inserted])
        return len(inserted), rejected
    except Exception as exc:
        if not _data_error(exc):
            raise
        log.error("decision journal %s holds a row the store refuses (%s): replaying it row by row",
                  path, _short(exc))
    count = 0
    with transaction() as cursor:
        for row in unique.values():
            cursor.execute("SAVEPOINT replay_row")
            try:
                if _insert_sqlite(cursor, [_table_row(row)]):
                    audit.append_sqlite(cursor, [_decision_event(row)])
                    count += 1
            except Exception as exc:
                if not _data_error(exc):
                    raise
                cursor.execute("ROLLBACK TO replay_row")
                rejected.append((row, _short(exc)))
            cursor.execute("RELEASE replay_row")
    return count, rejected


def _quarantine(path: str, rejected: list[tuple[dict[str, Any], str]]) -> None:
    """Append the rows the store refused to `<path>.rejected` (0600), each a journal line with its reason,
    and say so loudly: those calls went upstream and are not in the record. Raises OSError if it cannot
    (the segment is then kept, and its refused rows with it)."""
    target = f"{path}.rejected"
    lines = b"".join(canonical({"reason": reason, **json.loads(journal.encode(row))}) + b"\n"
                     for row, reason in rejected)
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(lines)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    for row, reason in rejected:
        log.error("a forwarded call's row in decision journal %s cannot be stored (%s): it is NOT in the record; "
                  "kept in %s (decision %s)", path, reason, target, row.get("decision_id"))


def journal_of(engine: SAEngine) -> str | None:
    """The journal directory of a SQLite database in WAL mode (the only kind with a journal), else None."""
    if engine.dialect.name != "sqlite":
        return None
    wal = _sqlite_wal(engine)
    return None if wal is None else journal.directory_for(wal[:-len("-wal")])


def replay_journal(engine: SAEngine) -> JournalReplay:
    """For a command about to read the record: commit the rows of dead processes' journal segments
    (`replay_segments`), as a recorder does at start, so that the calls they forwarded are on the record.
    Needs write access to the database and the journal; what could not be replayed is in `kept`/`kept_ids`
    (`journal_waiting` tells how many of those rows the record lacks)."""
    directory = journal_of(engine)
    if directory is None or not os.path.isdir(directory):
        return JournalReplay()
    database = directory[:-len(".journal")]

    @contextmanager
    def transaction() -> Iterator[sqlite3.Cursor]:
        raw = sqlite3.connect(database, timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            begin_immediate(raw.execute)
            try:
                yield raw.cursor()
                raw.execute("COMMIT")
            except BaseException:
                if raw.in_transaction:
                    raw.execute("ROLLBACK")
                raise
        finally:
            raw.close()

    return replay_segments(directory, transaction)


def journal_waiting(engine: SAEngine, ids: set[str]) -> int:
    """How many of the decision ids `ids` (a journal's, `JournalReplay.kept_ids`) are not in the record."""
    known: set[str] = set()
    listed = sorted(ids)
    with engine.connect() as conn:
        for start in range(0, len(listed), 500):
            chunk = listed[start:start + 500]
            known.update(conn.execute(select(DecisionRecord.decision_id)
                                      .where(DecisionRecord.decision_id.in_(chunk))).scalars())  # type: ignore[attr-defined]
    return len(ids - known)


class _LockTaken(Exception):
    """Another connection holds SQLite's write lock (`Recorder._commit_now` does not wait for it)."""


class _Commit(Future[None]):
    """A waiter's future for one row or event; `fail_fast`: failed by the first try that fails."""

    def __init__(self, fail_fast: bool) -> None:
        super().__init__()
        self.fail_fast = fail_fast


def _settle(future: Future[None], exc: Exception | None = None) -> None:
    """Resolve a waiter's future unless it is already done: failed by an earlier try, or cancelled by a
    waiter that gave up (which may happen between any check and the setting: hence the except)."""
    if future.done():
        return
    try:
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)
    except InvalidStateError:
        pass


class _Unit(Future[T]):
    """A unit of work's future (`Recorder.transact_soon`), which may be withdrawn with an error until the
    writer starts it. Withdrawing and starting take one lock, so a unit either never runs and ends with
    that error, or runs to its own outcome; `Future.cancel` alone could only end it cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self._starting = threading.Lock()

    def withdraw(self, exc: BaseException) -> None:
        """End the unit with `exc` unless the writer has started it or it is already done."""
        with self._starting:
            if self.running() or self.done():
                return
            try:
                self.set_exception(exc)
            except InvalidStateError:  # its caller cancelled it meanwhile: withdrawn all the same
                pass

    def set_running_or_notify_cancel(self) -> bool:
        """The writer's start: False, and nothing runs, if the unit was withdrawn or cancelled."""
        with self._starting:
            if self.done() and not self.cancelled():
                return False
            return super().set_running_or_notify_cancel()


def writable(engine: SAEngine) -> None:
    """Raise `StoreUnavailable` saying what to do if the database cannot be written (a read-only SQLite
    file, a read-only PostgreSQL role or replica): cedargate records every call before forwarding it,
    so it does not start on a store it could only read."""
    try:
        with engine.connect() as conn:
            probe = conn.begin()
            try:
                conn.execute(text("INSERT INTO audit_head (id, seq, hash) VALUES (-1, 0, 'write probe')"))
            finally:
                probe.rollback()
    except SQLAlchemyError as exc:
        raise StoreUnavailable(
            f"the decision store {engine.url.render_as_string(hide_password=True)} cannot be written "
            f"({_short(exc)}): cedargate records every call before forwarding it, so it does not start on a "
            "store it can only read. Make the database file and its directory writable by this user "
            "(or give the database role write access), then start again"
        ) from None


def _event_item(event: Mapping[str, Any]) -> dict[str, Any]:
    """An event as the writer chains it, checked now: what the log cannot hold raises in the caller."""
    unknown = set(event) - EVENT_KEYS
    if unknown:
        raise ValueError(f"unknown audit event keys {sorted(unknown)}; an event has {sorted(EVENT_KEYS)}")
    kind = getattr(event.get("kind"), "value", event.get("kind"))  # an enum's stored value
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"an audit event needs a kind, a non-empty string like 'approval', not {kind!r}")
    item: dict[str, Any] = {"kind": _storable(kind), "at": utcnow()}
    for key in ("decision_id", "override_id", "agent", "actor"):
        value = event.get(key)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"audit event {key} must be a string or None, not {type(value).__name__}")
        item[key] = None if value is None else _storable(value)
    payload = event.get("payload") or {}
    if not isinstance(payload, dict):
        raise TypeError(f"audit event payload must be a dict, not {type(payload).__name__}")
    item["payload"] = canonical_text(payload)  # now: a later change by the caller is not recorded
    return item


def storable_row(row: dict[str, Any]) -> dict[str, Any]:
    """`row` (changed in place) with every string, and every string in a dict value, made `_storable`."""
    for key, value in row.items():
        if isinstance(value, str):
            row[key] = _storable(value)
        elif isinstance(value, dict):  # `detail`: strings from the agent's message
            row[key] = {k: _storable(v) if isinstance(v, str) else v for k, v in value.items()}
    return row


def _table_row(row: dict[str, Any]) -> dict[str, Any]:
    """A decision as the table holds it: its `detail` (what an MCP message was) goes to the audit log's
    payload only. Copied only when it has one: this runs for every recorded call."""
    return row if "detail" not in row else {k: v for k, v in row.items() if k != "detail"}


def _chained(tag: str, item: dict[str, Any]) -> dict[str, Any]:
    """The audit event a queued item becomes."""
    if tag == _DECISION:
        return _decision_event(item)
    if tag == _OUTCOME:
        return {"kind": audit.EventKind.OUTCOME.value, "at": utcnow(), "decision_id": item["decision_id"],
                "agent": item["agent"], "payload": {key: item[key] for key in OUTCOME_KEYS}}
    return item


def _insert_new(conn: Connection) -> Any:
    """INSERT of decision rows that skips one already stored (by decision_id): writing twice is harmless."""
    return _INSERT_NEW["postgresql" if conn.dialect.name == "postgresql" else "sqlite"]


_decisions: Table = DecisionRecord.__table__  # type: ignore[attr-defined]  # SQLModel sets it, untyped
# RETURNING the ids inserted: only they are chained (`_insert_sqlite` says why).
_INSERT_NEW = {"postgresql": postgresql.insert(_decisions).on_conflict_do_nothing(index_elements=["decision_id"])
               .returning(_decisions.c.decision_id),
               "sqlite": sqlite.insert(_decisions).on_conflict_do_nothing(index_elements=["decision_id"])
               .returning(_decisions.c.decision_id)}
_ADD_OUTCOME = (
    update(_decisions).where(_decisions.c.decision_id == bindparam("b_id"))
    .values(upstream_status=bindparam("b_status"), duration_ms=bindparam("b_ms"), errors=bindparam("b_errors"))
)


# A decision row through the driver (`Recorder._sqlite_transaction`), bound as SQLAlchemy binds it:
# every column (a missing one takes its default), times as `UTCDateTime` stores them on SQLite.
_COLUMNS = tuple(column.name for column in _decisions.columns if column.name != "id")
_DEFAULTS = {column.name: column.default.arg for column in _decisions.columns
             if isinstance(column.default, ColumnDefault) and column.default.is_scalar}
_SQLITE_ADD_OUTCOME = "UPDATE decisions SET upstream_status = ?, duration_ms = ?, errors = ? WHERE decision_id = ?"
# Many outcomes in one UPDATE (SQLite 3.33 and later), not executemany: that releases and retakes the GIL
# for every row, and each retake makes a busy proxy's event loop hand the GIL over.
_UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33)
_RETURNING = sqlite3.sqlite_version_info >= (3, 35)  # INSERT ... RETURNING


def _insert_sqlite(cursor: sqlite3.Cursor, rows: list[dict[str, Any]]) -> set[str]:
    """Insert the decision rows not stored yet (by decision_id); the ids of those inserted, so that only
    they are chained: a row committed twice (its journal replayed by another process meanwhile) must not
    give its call a second decision event."""
    values = [audit.sqlite_datetime(value) if isinstance(value, datetime) else value
              for row in rows for value in (row.get(column, _DEFAULTS.get(column)) for column in _COLUMNS)]
    width = len(_COLUMNS)
    inserted: set[str] = set()
    if not _RETURNING:  # SQLite before 3.35: the ids already stored, read in the same transaction
        ids = [row["decision_id"] for row in rows]
        known = {found for start in range(0, len(ids), 500) for (found,) in cursor.execute(
            f"SELECT decision_id FROM decisions WHERE decision_id IN ({', '.join('?' * len(ids[start:start + 500]))})",
            ids[start:start + 500])}
        inserted = set(ids) - known
    for start in range(0, len(rows), audit.SQLITE_ROWS_PER_INSERT):
        count = min(audit.SQLITE_ROWS_PER_INSERT, len(rows) - start)
        suffix = " ON CONFLICT (decision_id) DO NOTHING" + (" RETURNING decision_id" if _RETURNING else "")
        cursor.execute(audit.sqlite_insert("decisions", _COLUMNS, count, suffix),
                       values[start * width:(start + count) * width])
        if _RETURNING:
            inserted.update(found for (found,) in cursor.fetchall())
    return inserted


def _only_inserted(items: list[Item], events: list[dict[str, Any]], inserted: set[str]) -> list[dict[str, Any]]:
    """`events` (`items`' own, then others) less the decision events of rows that were not inserted, being
    in the record already (`_insert_sqlite`)."""
    kept = []
    for index, chained in enumerate(events):
        if index < len(items) and items[index][0] == _DECISION:
            if chained["decision_id"] not in inserted:
                continue
            inserted.discard(chained["decision_id"])  # a row queued twice is chained once
        kept.append(chained)
    return kept


def _add_outcomes_sqlite(cursor: sqlite3.Cursor, outcomes: list[dict[str, Any]]) -> None:
    # The last outcome of a decision wins, as executing them in order would have it.
    latest = list({o["b_id"]: (o["b_status"], o["b_ms"], o["b_errors"], o["b_id"]) for o in outcomes}.values())
    if len(latest) == 1 or not _UPDATE_FROM:
        cursor.executemany(_SQLITE_ADD_OUTCOME, latest)
        return
    for start in range(0, len(latest), audit.SQLITE_ROWS_PER_INSERT):
        chunk = latest[start:start + audit.SQLITE_ROWS_PER_INSERT]
        cursor.execute(
            "UPDATE decisions SET upstream_status = v.column1, duration_ms = v.column2, errors = v.column3 "
            f"FROM (VALUES {', '.join(['(?, ?, ?, ?)'] * len(chunk))}) AS v WHERE decisions.decision_id = v.column4",
            [value for outcome in chunk for value in outcome])


def _decision_event(row: dict[str, Any]) -> dict[str, Any]:
    # The Cedar request stays out of the chain: the log is kept for good, and the request only as long as
    # `cedar_request_retention` says (its action and resource are in the payload all the same).
    payload = {k: v for k, v in row.items() if k != "cedar_request"}
    return {"kind": audit.EventKind.DECISION.value, "at": row.get("at"),
            "decision_id": row.get("decision_id"),
            "agent": row.get("agent"), "payload": payload}


def _storable(text: str) -> str:
    """Text every store takes as it is, so one agent's odd call can never wedge the record for everyone.

    PostgreSQL refuses NUL, which mitmproxy lets through in a path; and a byte that is not UTF-8 reaches
    here as a lone surrogate, which no driver can encode. Both become visible backslash escapes.
    """
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _short(exc: BaseException) -> str:
    cause = getattr(exc, "orig", None) or exc
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"


def count_decisions(engine: SAEngine) -> dict[str, int]:
    with Session(engine) as session:
        rows = session.exec(select(DecisionRecord.decision, func.count()).group_by(DecisionRecord.decision)).all()
    return {decision: count for decision, count in rows}


def utcnow() -> datetime:
    return datetime.now(UTC)
