"""Waking held calls when their override request changed in another process (another instance, a worker).

A state change made in this process wakes its holds directly (`Holds.notify`). One made elsewhere on the
same database reaches them here:

- PostgreSQL: every state change sends `pg_notify` with the override's id inside its transaction
  (`announce`), so it is delivered on commit and never for a change rolled back. `Wakeups` keeps one
  dedicated connection LISTENing, on a thread of its own, and hands each id to `Holds.notify`; it
  reconnects with backoff, and after a reconnect wakes every hold (notifications sent while it was
  down are lost; a hold woken needlessly reads its request and waits on).
- Every store, as the fallback for a lost notification (and on SQLite, the only way): a watcher reads
  the audit log as a change feed. Every state change of a request chains an event naming it, in the
  transaction that makes the change, and appends are serialized by the chain's head, so a row's seq
  orders it after every commit before it: the watcher reads the ids named by the rows appended since
  its last look (a range of the log's primary key) and wakes the holds waiting on them. Its cost is the
  rows appended meanwhile, not the number of calls held (reading every held request's status, as a
  first version did, cost a query with 10,000 parameters 20 times a second at 10,000 held calls). A
  hold reads its request after it subscribed, and the watcher wakes the holds subscribed when it reads,
  so no change falls between the two. On SQLite the watcher looks only when `PRAGMA data_version` says
  another connection committed (a read of a counter in shared memory, no I/O), checked every
  `SQLITE_INTERVAL`; on PostgreSQL every `FALLBACK_INTERVAL`. While no call is held in the process it only
  moves its place on, at most every `IDLE_INTERVAL`.

The channel is named after the schema, so cedargates in two schemas of one database do not wake each
other's holds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.pool import PoolProxiedConnection

from proxy.oversight.holds import Holds
from proxy.record.audit import EventKind

log = logging.getLogger(__name__)

# How often a SQLite process looks at data_version while calls are held: up to this long between a
# decision made by another process on the same file and the release here (measured at 0.1 s: p50 88 ms,
# p99 230 ms, too near the 250 ms goal), at the cost of one PRAGMA per interval (no I/O), and one
# query when it changed.
SQLITE_INTERVAL = 0.05
# While no call is held in this process, how often the watcher moves its place in the log on (one read of
# the last seq): never more, since a watcher that found changes read the log twice whoever was held (every
# commit changes data_version, this process's own recorder's too: under load, 20 looks a second in each
# process for nobody). The first look with a call held reads the rows appended since, at most this long's.
IDLE_INTERVAL = 1.0
# How often a PostgreSQL process re-reads its waited-on requests whatever the listener says: the longest
# a hold waits past its decision when a notification is lost (the listener was reconnecting, say). One
# small indexed query per process per interval, however many calls are held.
FALLBACK_INTERVAL = 5.0
# Backoff between the listener's attempts to reconnect: first, then doubled up to the last.
RECONNECT_BACKOFF = (0.5, 30.0)
# The channel's name: from the schema, hashed to fit PostgreSQL's 63-byte identifiers.
_CHANNEL = "'cedargate_overrides_' || left(md5(coalesce(current_schema(), '')), 16)"
_ANNOUNCE = text(f"SELECT pg_notify({_CHANNEL}, :override_id)")
_LAST = text("SELECT coalesce(max(seq), 0) FROM audit_log")
# Events that never change a request's status, so no held call's answer: a request opened (its hold
# knows, having opened or joined it), a vote that did not decide (one that did is followed by `grant` or
# `denied`), an end told, a chain's step. Waking on them cost every hold a needless read of its request
# (and the collector the objects of a new wait): on SQLite the watcher sees this process's own
# commits too, so each of 10,000 calls held was woken once more by its own `override_created`.
# Any other kind, a new one included, wakes: a needless wake-up costs a read, a missed one a release.
_QUIET = (EventKind.OVERRIDE_CREATED, EventKind.APPROVAL, EventKind.DENIAL, EventKind.OUTCOME_TOLD,
          EventKind.ESCALATED, EventKind.REMINDER)
_CHANGED = text("SELECT DISTINCT override_id FROM audit_log WHERE seq > :after AND seq <= :upto"
                " AND override_id IS NOT NULL AND kind NOT IN ("
                + ", ".join(f"'{kind.value}'" for kind in _QUIET) + ")")


def announce(conn: Connection, override_id: str) -> None:
    """Tell every process's holds, once `conn`'s transaction commits, that this request changed."""
    if conn.dialect.name == "postgresql":
        conn.execute(_ANNOUNCE, {"override_id": override_id})


class Wakeups:
    """The listener and the watcher of one process; `start` and `stop` are idempotent."""

    def __init__(self, engine: SAEngine, holds: Holds) -> None:
        self.engine = engine
        self.holds = holds
        self.postgresql = engine.dialect.name == "postgresql"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.listening = threading.Event()  # set while the listener's LISTEN is in place

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        targets = [self._watch] + ([self._listen] if self.postgresql else [])
        self._threads = [threading.Thread(target=t, name=f"cedargate-{t.__name__[1:]}", daemon=True)
                         for t in targets]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self._threads = []

    # --- the fallback: which waited-on requests are decided ------------------------------------------

    def _watch(self) -> None:
        interval = FALLBACK_INTERVAL if self.postgresql else SQLITE_INTERVAL
        changes = None if self.postgresql else _DataVersion(self.engine)
        after = self._last_seq()  # the log's last seq seen: taken at the start, before any call is held
        looked = time.monotonic()
        try:
            while not self._stop.wait(interval):
                try:
                    if changes is not None and not changes.changed():
                        continue
                    idle = not self.holds.waiting()
                    if idle and after is not None and time.monotonic() - looked < IDLE_INTERVAL:
                        continue  # a call held from now on reads its request after this: it saw what came before
                    looked = time.monotonic()
                    with self.engine.connect() as conn:
                        upto = int(conn.execute(_LAST).scalar_one())
                        # Who waits, read after the head: a call held after this read its request after it.
                        waiting = self.holds.waiting()
                        if not waiting:
                            changed: Iterable[str] = ()
                        elif after is None or upto < after:  # the store was down at the start, or restored
                            changed = waiting  # what may have changed before
                        else:
                            changed = conn.execute(_CHANGED, {"after": after, "upto": upto}).scalars().all()
                    after = upto
                    self._wake(set(changed) & waiting)
                except Exception as exc:  # the store is down: the holds keep waiting, and this keeps looking
                    log.debug("could not read the audit log for held calls' requests: %s", exc)
        finally:
            if changes is not None:
                changes.close()

    def _last_seq(self) -> int | None:
        try:
            with self.engine.connect() as conn:
                return int(conn.execute(_LAST).scalar_one())
        except Exception as exc:  # the store is down: the first look that succeeds wakes every hold
            log.debug("could not read the audit log's last seq: %s", exc)
            return None

    def _wake(self, override_ids: Iterable[str]) -> None:
        for override_id in override_ids:
            self.holds.notify(override_id)

    # --- PostgreSQL: LISTEN ------------------------------------------------------------------------

    def _listen(self) -> None:
        delay, reconnecting = RECONNECT_BACKOFF[0], False
        while not self._stop.is_set():
            try:
                self._listen_once(reconnecting)
                delay = RECONNECT_BACKOFF[0]
            except Exception as exc:
                reconnecting = True
                self.listening.clear()
                log.warning("override notifications lost (%s); reconnecting in %g s", exc, delay)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, RECONNECT_BACKOFF[1])

    def _listen_once(self, reconnecting: bool) -> None:
        raw = self.engine.raw_connection()
        dbapi: Any = raw.driver_connection  # psycopg's Connection: the PostgreSQL driver cedargate uses
        raw.detach()  # this connection is the listener's for good, not the pool's
        try:
            dbapi.rollback()
            dbapi.autocommit = True
            channel = dbapi.execute(f"SELECT {_CHANNEL}").fetchone()[0]
            dbapi.execute(f'LISTEN "{channel}"')
            self.listening.set()
            if reconnecting:  # decisions committed while nobody listened were not heard: their holds look again
                self._wake(self.holds.waiting())
            while not self._stop.is_set():
                # Returns after `timeout` with nothing, so a stop is seen within a second.
                for notification in dbapi.notifies(timeout=1.0):
                    self.holds.notify(notification.payload)
        finally:
            self.listening.clear()
            dbapi.close()


class _DataVersion:
    """Whether any other connection committed to a SQLite database since the last look.

    `PRAGMA data_version` changes when another connection (of this process or another) commits; it is
    per connection, so it is always read on this one, kept for the purpose.
    """

    def __init__(self, engine: SAEngine) -> None:
        self._engine = engine
        self._raw: PoolProxiedConnection | None = None
        self._seen: int | None = None

    def changed(self) -> bool:
        if self._raw is None:
            self._raw = self._engine.raw_connection()
            self._raw.detach()
            self._seen = None
        try:
            cursor = self._raw.cursor()
            version = cursor.execute("PRAGMA data_version").fetchone()[0]
            cursor.close()
        except Exception:
            self.close()
            raise
        changed: bool = version != self._seen
        self._seen = version
        return changed

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None
