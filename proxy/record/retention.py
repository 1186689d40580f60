"""How long a decision keeps the Cedar request it was made on: `RequestRetention` clears the requests of
decisions older than `cedar_request_retention`, in bounded batches, run as a background job
(`proxy.oversight.jobs`).

Each batch is one transaction on the recorder's writer (`Recorder.transact`), between the decision rows
it commits, so the clearing never competes with the record for SQLite's write lock and a batch holds the
writer only briefly. The decision rows themselves, and the audit log (which never held the request), stay.
The job remembers how far it has cleared, so each run starts where the last one ended rather than
walking the rows cleared before; a new process walks them once.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, select, update
from sqlalchemy.engine import Connection

from proxy.record.store import DecisionRecord, Recorder, utcnow

BATCH_SIZE = 500  # rows a transaction clears: short enough not to hold back the calls waiting on the writer
# Per run (a minute apart): 100,000 requests, well above what a busy proxy records in a minute, so the
# clearing keeps up; a larger backlog (a retention shortened) is cleared over several runs. The writer
# commits the calls' rows between the batches, so a long run delays no call by more than one batch.
MAX_BATCHES = 200

_decisions: Table = DecisionRecord.__table__  # type: ignore[attr-defined]  # SQLModel sets it, untyped


class RequestRetention:
    def __init__(self, recorder: Recorder, keep_seconds: float, *, batch_size: int = BATCH_SIZE,
                 max_batches: int = MAX_BATCHES, clock: Callable[[], datetime] = utcnow) -> None:
        self.recorder = recorder
        self.keep = timedelta(seconds=keep_seconds)
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.clock = clock
        self._from: datetime | None = None  # every request older than this is cleared already
        self.cleared = 0  # requests cleared by this process, for /status and tests

    def run(self) -> int:
        """Clear up to `max_batches` batches of requests past their retention; the number cleared."""
        cutoff = self.clock() - self.keep
        cleared = 0
        for _ in range(self.max_batches):
            count, last = self.recorder.transact(lambda conn: (self._clear(conn, cutoff), []))
            cleared += count
            if last is not None:
                self._from = last  # only once committed: a failed batch is tried again next time
            if count < self.batch_size:
                break
        self.cleared += cleared
        return cleared

    def _clear(self, conn: Connection, cutoff: datetime) -> tuple[int, datetime | None]:
        query = (select(_decisions.c.id, _decisions.c.at)
                 .where(_decisions.c.at < cutoff, _decisions.c.cedar_request.is_not(None))
                 .order_by(_decisions.c.at).limit(self.batch_size))
        if self._from is not None:
            query = query.where(_decisions.c.at >= self._from)
        rows: list[Any] = list(conn.execute(query).all())
        if not rows:
            return 0, None
        conn.execute(update(_decisions).where(_decisions.c.id.in_([r.id for r in rows])).values(cedar_request=None))
        return len(rows), rows[-1].at
