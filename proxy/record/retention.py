"""How long a decision keeps the Cedar request it was made on: `RequestRetention` clears the requests of
decisions older than `cedar_request_retention`, in bounded batches, run as a background job
(`proxy.oversight.jobs`).

A batch's rows are found on a read connection of its own, outside the recorder's writer, through the
partial index on `at` of the decisions that still hold a request (`ix_decisions_at_with_request`,
revision 0011): a cleared row leaves that index, so finding the next batch costs the same however long
the cleared history grows, after a restart too. Only the UPDATE of the rows found goes through the
writer (`Recorder.transact`), one short transaction between the decision rows it commits, so the
clearing never competes with the record for SQLite's write lock and holds the writer only briefly. The
decision rows themselves, and the audit log (which never held the request), stay.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, select, update
from sqlalchemy.engine import Connection

from proxy.record.store import DecisionRecord, Recorder, Work, utcnow

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
        self.cleared = 0  # requests cleared by this process, for /status and tests

    def run(self) -> int:
        """Clear up to `max_batches` batches of requests past their retention; the number cleared."""
        cutoff = self.clock() - self.keep
        cleared = 0
        for _ in range(self.max_batches):
            ids = self._due(cutoff)
            if not ids:
                break
            cleared += self.recorder.transact(_clearing(ids))
            if len(ids) < self.batch_size:
                break
        self.cleared += cleared
        return cleared

    def _due(self, cutoff: datetime) -> list[int]:
        """The next batch's row ids, read outside the writer (on SQLite's WAL a read never waits for it)."""
        query = (select(_decisions.c.id)
                 .where(_decisions.c.at < cutoff, _decisions.c.cedar_request.is_not(None))
                 .order_by(_decisions.c.at).limit(self.batch_size))
        with self.recorder.engine.connect() as conn:
            return [row.id for row in conn.execute(query)]


def _clearing(ids: list[int]) -> Work[int]:
    """The writer's part: one UPDATE of the rows found, by primary key."""
    def clear(conn: Connection) -> tuple[int, list[dict[str, Any]]]:
        # Still holding a request: a row another process cleared meanwhile is not counted twice.
        result = conn.execute(update(_decisions)
                              .where(_decisions.c.id.in_(ids), _decisions.c.cedar_request.is_not(None))
                              .values(cedar_request=None))
        return int(result.rowcount), []
    return clear
