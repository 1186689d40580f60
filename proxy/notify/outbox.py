"""The notifications' durable outbox: what is owed to which channel, read from the audit log in its order.

The audit log is the override workflow's history, committed with every change of a request, so it is
the source: a fan-out reads the rows after `notification_cursor.seq` (seqs are handed out under the
chain's head lock, so a row committed later never has a smaller seq than one already read), turns each
event a route wants into one `notification_deliveries` row per channel, and moves the cursor, in one
transaction. A delivery's key is (audit seq, channel); its idempotency key, sent with every try, is
derived from the audit row's hash and the channel, so it is the same on every retry and after any
restart, and differs between two databases. A delivery is marked delivered only after the channel
accepted it: a crash in between sends it again with the same key (at least once).

`notification_channels` keeps each channel's health: consecutive failures, since when, the last error
(never a secret: errors name the host, not the URL), when to try again, the last delivery. Whatever
runs the sweep, `/status` reads it from the database. One process sweeps at a time, on SQLite and
PostgreSQL alike: it holds a lease on the cursor row (`lease`), renewed while it works, which a process
that stopped without giving it back loses once it lapses.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Column, DateTime, Index, Table, func, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.engine import Engine as SAEngine
from sqlmodel import Field, SQLModel

from proxy.record.audit import ROW_NUMBER, AuditEntry
from proxy.record.store import WRITES, utcnow


def _moment(optional: bool = False) -> Any:
    return Field(default=None if optional else ..., sa_column=Column(DateTime(timezone=True), nullable=optional))


class NotificationCursor(SQLModel, table=True):
    """The last audit seq turned into deliveries, and who holds the sweep's lease."""

    __tablename__ = "notification_cursor"

    id: int = Field(default=1, primary_key=True, sa_column_kwargs={"autoincrement": False})
    seq: int = Field(default=0, sa_type=ROW_NUMBER)  # an audit seq: as wide (revision 0012)
    lease_holder: str | None = None
    lease_until: datetime | None = _moment(optional=True)


class DeliveryState:
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # refused for good by the channel (a payload it cannot take): not retried


class NotificationDelivery(SQLModel, table=True):
    """One event owed to one channel."""

    __tablename__ = "notification_deliveries"
    __table_args__ = (Index("ix_notification_deliveries_channel_state_seq", "channel", "state", "seq"),)

    seq: int = Field(primary_key=True, sa_type=ROW_NUMBER, sa_column_kwargs={"autoincrement": False})
    channel: str = Field(primary_key=True)
    key: str = Field(index=True, unique=True)  # the Idempotency-Key: the same on every try
    kind: str  # a NoticeKind value
    override_id: str | None = None
    notice: str  # JSON: what the message says, fixed when the event was read
    state: str = DeliveryState.PENDING
    attempts: int = 0
    created_at: datetime = _moment()
    delivered_at: datetime | None = _moment(optional=True)
    last_error: str | None = None


class NotificationChannelState(SQLModel, table=True):
    """A channel's health, as the sweep last found it."""

    __tablename__ = "notification_channels"

    channel: str = Field(primary_key=True)
    failures: int = 0  # consecutive failed tries
    failing_since: datetime | None = _moment(optional=True)
    retry_at: datetime | None = _moment(optional=True)
    last_error: str | None = None
    last_delivery_at: datetime | None = _moment(optional=True)


_log: Table = AuditEntry.__table__  # type: ignore[attr-defined]
_cursor: Table = NotificationCursor.__table__  # type: ignore[attr-defined]
_deliveries: Table = NotificationDelivery.__table__  # type: ignore[attr-defined]
_channels: Table = NotificationChannelState.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Owed:
    seq: int
    channel: str
    key: str
    kind: str
    notice: dict[str, Any]
    attempts: int


@dataclass(frozen=True)
class ChannelStatus:
    channel: str
    pending: int
    failed: int
    delivered: int
    last_delivery_at: datetime | None
    failing_since: datetime | None
    retry_at: datetime | None
    last_error: str | None


class Outbox:
    def __init__(self, engine: SAEngine) -> None:
        self.engine = engine
        self._writes = engine.execution_options(**{WRITES: True})

    # --- the lease ----------------------------------------------------------------------------------

    def lease(self, holder: str, seconds: float) -> bool:
        """Take or renew the sweep's lease for `seconds`: True if `holder` has it now."""
        now = utcnow()
        with self._writes.begin() as conn:
            self._ensure_cursor(conn)
            taken = conn.execute(
                update(_cursor).where(_cursor.c.id == 1, or_(
                    _cursor.c.lease_holder.is_(None), _cursor.c.lease_holder == holder, _cursor.c.lease_until < now))
                .values(lease_holder=holder, lease_until=now + timedelta(seconds=seconds)))
            return bool(taken.rowcount)

    def release(self, holder: str) -> None:
        with self._writes.begin() as conn:
            conn.execute(update(_cursor).where(_cursor.c.id == 1, _cursor.c.lease_holder == holder)
                         .values(lease_holder=None, lease_until=None))

    @staticmethod
    def _ensure_cursor(conn: Connection) -> None:
        # The migration makes the row; a database whose row was deleted by hand starts over from its head.
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        head = select(func.coalesce(func.max(_log.c.seq), 0))
        conn.execute(dialect.insert(_cursor).from_select(["id", "seq"], select(literal(1), head.scalar_subquery()))
                     .on_conflict_do_nothing(index_elements=["id"]))

    # --- fan-out ------------------------------------------------------------------------------------

    def transaction(self) -> AbstractContextManager[Connection]:
        """A writing transaction (on SQLite it takes the write lock at once, as the record's do)."""
        return self._writes.begin()

    def cursor(self, conn: Connection) -> int:
        return int(conn.execute(select(_cursor.c.seq).where(_cursor.c.id == 1)).scalar_one())

    def advance(self, conn: Connection, old: int, new: int, owed: list[dict[str, Any]]) -> None:
        """Add the deliveries read after `old` and move the cursor to `new`, in `conn`'s transaction.

        Conditional on the cursor still being at `old`: a sweep that lost its lease meanwhile changes nothing.
        """
        moved = conn.execute(update(_cursor).where(_cursor.c.id == 1, _cursor.c.seq == old).values(seq=new))
        if not moved.rowcount:
            raise LeaseLost(f"the notification cursor moved from {old} while this sweep read the log")
        if owed:
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            conn.execute(dialect.insert(_deliveries).on_conflict_do_nothing(), owed)

    # --- delivery -----------------------------------------------------------------------------------

    def due(self, channel: str, limit: int) -> list[Owed]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_deliveries).where(_deliveries.c.channel == channel,
                                          _deliveries.c.state == DeliveryState.PENDING)
                .order_by(_deliveries.c.seq).limit(limit)).all()
        return [Owed(r.seq, r.channel, r.key, r.kind, json.loads(r.notice), r.attempts) for r in rows]

    def retry_at(self, channel: str) -> datetime | None:
        with self.engine.connect() as conn:
            return conn.execute(select(_channels.c.retry_at).where(_channels.c.channel == channel)).scalar()

    def delivered(self, owed: Owed) -> None:
        now = utcnow()
        with self._writes.begin() as conn:
            conn.execute(update(_deliveries).where(_deliveries.c.seq == owed.seq, _deliveries.c.channel == owed.channel)
                         .values(state=DeliveryState.DELIVERED, delivered_at=now, attempts=owed.attempts + 1))
            self._health(conn, owed.channel, failures=0, failing_since=None, retry_at=None, last_delivery_at=now)

    def refused(self, owed: Owed, error: str) -> None:
        """The channel refused this message for good: kept as failed, the channel's later ones go on."""
        with self._writes.begin() as conn:
            conn.execute(update(_deliveries).where(_deliveries.c.seq == owed.seq, _deliveries.c.channel == owed.channel)
                         .values(state=DeliveryState.FAILED, attempts=owed.attempts + 1, last_error=error))
            self._health(conn, owed.channel, last_error=error)

    def failed(self, owed: Owed, error: str, backoff: BackOff) -> datetime:
        """A try that failed for now: the channel waits (longer each time, up to the cap) and tries again."""
        now = utcnow()
        with self._writes.begin() as conn:
            conn.execute(update(_deliveries).where(_deliveries.c.seq == owed.seq, _deliveries.c.channel == owed.channel)
                         .values(attempts=owed.attempts + 1, last_error=error))
            health = conn.execute(select(_channels).where(_channels.c.channel == owed.channel)).first()
            failures = (health.failures if health is not None else 0) + 1
            since = health.failing_since if health is not None and health.failing_since is not None else now
            retry = now + timedelta(seconds=backoff.delay(failures))
            self._health(conn, owed.channel, failures=failures, failing_since=since, retry_at=retry, last_error=error)
        return retry

    @staticmethod
    def _health(conn: Connection, channel: str, **values: Any) -> None:
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        insert = dialect.insert(_channels).values(channel=channel, **values)
        conn.execute(insert.on_conflict_do_update(index_elements=["channel"], set_=values))

    # --- what /status shows -------------------------------------------------------------------------

    def status(self, channels: list[str]) -> list[ChannelStatus]:
        with self.engine.connect() as conn:
            counts: dict[tuple[str, str], int] = {
                (r.channel, r.state): r.n for r in conn.execute(
                    select(_deliveries.c.channel, _deliveries.c.state, func.count().label("n"))
                    .group_by(_deliveries.c.channel, _deliveries.c.state))}
            health = {r.channel: r for r in conn.execute(select(_channels))}
        shown = []
        for name in channels:
            h = health.get(name)
            shown.append(ChannelStatus(
                channel=name, pending=counts.get((name, DeliveryState.PENDING), 0),
                failed=counts.get((name, DeliveryState.FAILED), 0),
                delivered=counts.get((name, DeliveryState.DELIVERED), 0),
                last_delivery_at=h.last_delivery_at if h else None,
                failing_since=h.failing_since if h and h.failures else None,
                retry_at=h.retry_at if h and h.failures else None,
                last_error=h.last_error if h else None))
        return shown

    def deliveries(self, override_id: str) -> list[dict[str, Any]]:
        """Every delivery about one request, in the log's order (for tests and operators)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(_deliveries).where(_deliveries.c.override_id == override_id)
                                .order_by(_deliveries.c.seq, _deliveries.c.channel)).all()
        return [dict(r._mapping) for r in rows]


class LeaseLost(Exception):
    """Another process took over the sweep: this one stops, having changed nothing it should not."""


@dataclass(frozen=True)
class BackOff:
    """Exponential: `initial` seconds after the first failure, doubled each time, never more than `cap`."""

    initial: float
    cap: float

    def delay(self, failures: int) -> float:
        return min(self.cap, self.initial * 2.0 ** min(max(failures - 1, 0), 30))

