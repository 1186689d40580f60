"""The tamper-evident audit log: every recorded event as one row of a SHA-256 hash chain.

Each `AuditEntry` holds the hash of the row before it (`prev_hash`), and its own `hash` covers its
content and that link, so editing, deleting or reordering rows breaks the chain at the first row
touched; `verify` walks the chain and names that row. A chain cannot show that its newest rows were
cut off, so the one-row `audit_head` table, written in the same transaction as every append, holds
the newest seq and hash. Any number of writers (threads, processes, instances on one PostgreSQL) append
to one chain: `append` reads the head and locks it inside the appending transaction (`SELECT ... FOR
UPDATE` on PostgreSQL; SQLite's writers take its write lock at BEGIN, see `proxy.record.store`), so
appends are serialized by the database and no writer chains onto a head another has moved.

The hash of a row is SHA-256 (hex) over `canonical({"seq", "at", "kind", "decision_id",
"override_id", "agent", "actor", "payload", "prev_hash"})`, where `at` is the UTC time as
`YYYY-MM-DDTHH:MM:SS.ffffff+00:00`, `payload` the stored JSON text and the first row's `prev_hash`
64 zeros; `canonical` (`proxy.vocabulary.canonical`) is `json.dumps(sort_keys=True, separators=(",",
":"), ensure_ascii=False)` encoded as UTF-8, so anyone can check the log without cedargate. What the
chain cannot show: someone who can write to the database and recomputes every hash after their edit,
and the head, leaves a consistent log; compare the head `verify` reports with a copy kept elsewhere to
catch that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from json.encoder import encode_basestring as _json_string  # what canonical's encoder escapes with
from typing import Any

from sqlalchemy import BigInteger, Engine, Index, Integer, Table, bindparam, func, inspect, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlmodel import Field, SQLModel

from proxy.vocabulary.canonical import canonical, canonical_text

GENESIS = "0" * 64


class EventKind(StrEnum):
    """What an audit row records; the values are the `kind` stored and hashed, so they never change.

    Two kinds about denying are different events: `DENIAL` is one reviewer's vote to deny (as
    `APPROVAL` is a vote to approve), `DENIED` the request's move to the denied state that the vote
    caused (as `GRANT` is its move to granted).
    """

    DECISION = "decision"  # a call decided (allow, deny, escalate, error)
    PASSTHROUGH = "passthrough"  # a tunnel relayed undecided, by configuration
    OVERRIDE_CREATED = "override_created"
    OVERRIDE_REFUSED = "override_refused"  # no request opened: the limits refused it
    APPROVAL = "approval"  # a reviewer's vote to approve
    DENIAL = "denial"  # a reviewer's vote to deny
    GRANT = "grant"  # the request granted: the quorum was met
    DENIED = "denied"  # the request denied, by a denial
    RELEASE = "release"
    RELEASE_REFUSED = "release_refused"
    EXPIRED = "expired"
    GRANT_EXPIRED = "grant_expired"
    # What became of a forwarded call, once known: its decision was chained before the call went
    # upstream, so the upstream's status, the duration and any failure are chained after it.
    OUTCOME = "outcome"
    # Calls refused because the record could not take them, counted per agent rather than one row each:
    # while the store fails, a row per refusal would only refill the space it needs to recover.
    STORE_REFUSALS = "store_refusals"
    GRANT_RESTORED = "grant_restored"  # a release that never reached the upstream: the grant is back
    INFO_REQUESTED = "info_requested"  # a reviewer asked the agent a question: the request needs info
    INFO_GIVEN = "info_given"  # the agent's retry answered it: the request is pending again
    OUTCOME_TOLD = "outcome_told"  # the agent was told the request was denied or expired (once)
    # A reviewer's browser session on the review page began or ended (sign-in, sign-out).
    REVIEWER_SIGNED_IN = "reviewer_signed_in"
    REVIEWER_SIGNED_OUT = "reviewer_signed_out"
    # An undecided request's escalation chain moved on (`proxy.oversight.chains`): a later tier reached,
    # or the current tier reminded. Their payload, like `override_created`'s, routes the notifications:
    # {"tier": n, "roles": [...], "primary": approver or null, "fallback": [...], "deadline": ISO 8601}.
    ESCALATED = "escalated"
    REMINDER = "reminder"


# A count of recorded rows: one or more per proxied call, so past 2**31 on a busy proxy. 64-bit on
# PostgreSQL (revision 0012; its INTEGER is 32-bit and the next append would fail, refusing every call);
# SQLite's INTEGER already holds 64 bits, and only a column declared exactly INTEGER PRIMARY KEY is the
# table's rowid (numbered by SQLite), so it stays INTEGER there.
ROW_NUMBER = BigInteger().with_variant(Integer(), "sqlite")


class AuditEntry(SQLModel, table=True):
    __tablename__ = "audit_log"
    # Only the events about an override request are read by override id: the calls' decisions and outcomes,
    # most of the log, stay out of that index (revision 0015), a page fewer written by every call's commit.
    __table_args__ = (
        Index("ix_audit_log_override_id", "override_id", sqlite_where=text("override_id IS NOT NULL"),
              postgresql_where=text("override_id IS NOT NULL")),
    )

    seq: int = Field(primary_key=True, sa_type=ROW_NUMBER, sa_column_kwargs={"autoincrement": False})
    at: datetime
    kind: str  # an EventKind value
    decision_id: str | None = Field(default=None, index=True)
    override_id: str | None = None  # indexed where it is set: see __table_args__
    agent: str | None = None
    actor: str | None = None  # the approver, for approvals and denials
    payload: str  # canonical JSON of the event
    prev_hash: str
    hash: str


class AuditHead(SQLModel, table=True):
    """The newest row's seq and hash: what shows that rows were deleted at the end."""

    __tablename__ = "audit_head"

    id: int = Field(default=1, primary_key=True, sa_column_kwargs={"autoincrement": False})
    seq: int = Field(sa_type=ROW_NUMBER)
    hash: str


# The Core tables, for typed statements (SQLModel's class attributes are typed as plain values).
_log: Table = AuditEntry.__table__  # type: ignore[attr-defined]
_head: Table = AuditHead.__table__  # type: ignore[attr-defined]


# Built once: every recorded batch runs them, and a statement built afresh costs its cache key each time.
_LAST = select(func.max(_log.c.seq))
_HEAD = select(_head.c.seq, _head.c.hash, _LAST.scalar_subquery().label("last")).where(_head.c.id == 1)
_HEAD_LOCKED = _HEAD.with_for_update(of=_head)
_INSERT = _log.insert()
_MOVE_HEAD = _head.update().where(_head.c.id == 1).values(seq=bindparam("new_seq"), hash=bindparam("new_hash"))


class AuditLogError(Exception):
    """The audit log cannot be extended or read as it stands; the message says what is wrong."""


def iso_utc(at: datetime | str) -> str:
    """The time as hashed: UTC with microseconds. A time without an offset is UTC (as SQLite returns it)."""
    moment = datetime.fromisoformat(at) if isinstance(at, str) else at
    if moment.tzinfo is UTC:  # the recorder's own times: no conversion to make
        return moment.isoformat(timespec="microseconds")
    return _as_utc(moment).isoformat(timespec="microseconds")


def _as_utc(at: datetime) -> datetime:
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC)


def entry_hash(
    seq: int, at: datetime | str, kind: str, decision_id: str | None, override_id: str | None,
    agent: str | None, actor: str | None, payload: str, prev_hash: str,
) -> str:
    if (type(seq) is int and type(kind) is str and type(payload) is str and type(prev_hash) is str
            and all(value is None or type(value) is str for value in (decision_id, override_id, agent, actor))):
        # The row as every append makes it: its canonical JSON spelt out in sorted key order, with the
        # encoder's own string escaping: the same bytes as `canonical(content)` (pinned by a test), for
        # a third of its cost, paid twice per recorded call.
        text = (f'{{"actor":{_json_text(actor)},"agent":{_json_text(agent)},"at":"{iso_utc(at)}",'
                f'"decision_id":{_json_text(decision_id)},"kind":{_json_string(kind)},'
                f'"override_id":{_json_text(override_id)},"payload":{_json_string(payload)},'
                f'"prev_hash":{_json_string(prev_hash)},"seq":{int.__repr__(seq)}}}')
        return hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()
    content = {
        "seq": seq, "at": iso_utc(at), "kind": kind, "decision_id": decision_id, "override_id": override_id,
        "agent": agent, "actor": actor, "payload": payload, "prev_hash": prev_hash,
    }
    return hashlib.sha256(canonical(content)).hexdigest()


def _json_text(value: str | None) -> str:
    return "null" if value is None else _json_string(value)


def read_head(conn: Connection, *, lock: bool = False) -> tuple[int, str]:
    """The (seq, hash) to chain the next row to; (0, 64 zeros) for an empty log.

    The head comes from `audit_head`, not from the last row, so rows cut off the end stay a visible
    gap. A log whose rows and head disagree in a way no append leaves is refused, not extended.
    `lock`: hold the head row until the transaction ends, making it first if the log is empty, so
    that no other writer can append meanwhile (what `append` does).
    """
    head = conn.execute(_HEAD_LOCKED if lock else _HEAD).first()
    made = False
    if head is None and lock:
        # The first append to an empty log: whoever inserts the genesis head first wins; the others
        # wait for that transaction and then lock the row it made. (Checked only after: a writer that
        # found no head while another's first append was still uncommitted must not take that
        # append's rows, committed meanwhile, for rows without a head.)
        made = conn.execute(_genesis_head(conn).returning(_head.c.id)).first() is not None
        head = conn.execute(_HEAD_LOCKED).first()
    last = head.last if head is not None else conn.execute(_LAST).scalar()
    return _checked_head(None if head is None else (head.seq, head.hash), last, made)


def _checked_head(head: tuple[int, str] | None, last: int | None, made: bool) -> tuple[int, str]:
    """`read_head`'s answer from what it read: the head row (None if there is none), the last row's seq
    in the log, and whether this transaction made the head (its first append)."""
    if (head is None or made) and last is not None:
        raise AuditLogError(
            f"audit_log has rows up to seq {last} but audit_head is empty: the log was edited outside "
            "cedargate; run `cedargate audit verify`, and restore audit_head before recording again"
        )
    if head is None:
        return 0, GENESIS
    if last is not None and last > head[0]:
        raise AuditLogError(
            f"audit_log has rows up to seq {last} beyond audit_head (seq {head[0]}): rows were added "
            "outside cedargate's append; run `cedargate audit verify`"
        )
    return head


def _genesis_head(conn: Connection) -> Any:
    values = {"id": 1, "seq": 0, "hash": GENESIS}
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(_head).values(values).on_conflict_do_nothing(index_elements=["id"])


def append(conn: Connection, events: Sequence[Mapping[str, Any]]) -> tuple[int, str] | None:
    """Insert `events` as chained rows after the head, and move `audit_head` to the last of them; returns
    the new head's (seq, hash), or None when there was nothing to append.

    An event has `kind` and optionally `at` (default now), `decision_id`, `override_id`, `agent`,
    `actor` and `payload` (a dict, or its canonical JSON text). Run it in the transaction that writes
    what the events describe, so the log and the record commit together or not at all; the head is
    read and locked here, in that transaction, so concurrent writers take turns.

    The new head names this transaction: its hash covers the head it chained onto, so only this
    transaction can have put that hash at that seq. After a commit whose outcome the client never
    heard, `landed` tells from it whether the commit happened.
    """
    if not events:
        return None
    rows = _chain(*read_head(conn, lock=True), events)
    conn.execute(_INSERT, rows)
    head = rows[-1]["seq"], rows[-1]["hash"]
    conn.execute(_MOVE_HEAD, {"new_seq": head[0], "new_hash": head[1]})
    return head


def _chain(seq: int, prev_hash: str, events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows that chain `events` after the head (`seq`, `prev_hash`), each with its hash."""
    rows = []
    for event in events:
        seq += 1
        at = event.get("at")
        at = _as_utc(at) if isinstance(at, datetime) else datetime.now(UTC)
        payload = event.get("payload")
        payload = payload if isinstance(payload, str) else canonical_text(payload or {})
        row = {
            "seq": seq, "at": at, "kind": event["kind"], "decision_id": event.get("decision_id"),
            "override_id": event.get("override_id"), "agent": event.get("agent"), "actor": event.get("actor"),
            "payload": payload, "prev_hash": prev_hash,
        }
        row["hash"] = prev_hash = entry_hash(**row)
        rows.append(row)
    return rows


# `append` on SQLite through the driver itself (`append_sqlite`): the recorder's writer chains every
# batch, and SQLAlchemy's execution path costs it more than SQLite's own statements do.
_SQLITE_HEAD = "SELECT seq, hash, (SELECT max(seq) FROM audit_log) FROM audit_head WHERE id = 1"
_SQLITE_GENESIS = f"INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '{GENESIS}') ON CONFLICT (id) DO NOTHING"
_LOG_COLUMNS = ("seq", "at", "kind", "decision_id", "override_id", "agent", "actor", "payload", "prev_hash", "hash")
_SQLITE_MOVE_HEAD = "UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1"


def append_sqlite(cursor: Any, events: Sequence[Mapping[str, Any]]) -> tuple[int, str] | None:
    """`append` through a sqlite3 cursor whose connection is in a transaction begun IMMEDIATE (it holds
    the write lock, so the head it reads stays its own until the commit). Rows and head are stored as
    SQLAlchemy stores them (`sqlite_datetime`), so either path reads and verifies the other's."""
    if not events:
        return None
    found = cursor.execute(_SQLITE_HEAD).fetchone()
    made = False
    if found is None:  # the first append to an empty log (the write lock is ours: nobody else can race)
        made = cursor.execute(_SQLITE_GENESIS).rowcount == 1
        found = cursor.execute(_SQLITE_HEAD).fetchone()
    last = found[2] if found is not None else cursor.execute("SELECT max(seq) FROM audit_log").fetchone()[0]
    rows = _chain(*_checked_head(None if found is None else (found[0], found[1]), last, made), events)
    values = [value for row in rows
              for value in (row["seq"], sqlite_datetime(row["at"]), *(row[k] for k in _LOG_COLUMNS[2:]))]
    for start in range(0, len(rows), SQLITE_ROWS_PER_INSERT):
        chunk = rows[start:start + SQLITE_ROWS_PER_INSERT]
        cursor.execute(sqlite_insert("audit_log", _LOG_COLUMNS, len(chunk)),
                       values[start * len(_LOG_COLUMNS):(start + len(chunk)) * len(_LOG_COLUMNS)])
    head = rows[-1]["seq"], rows[-1]["hash"]
    cursor.execute(_SQLITE_MOVE_HEAD, head)
    return head


# Rows per multi-row INSERT on SQLite: its limit on bound parameters is 32,766 (999 before 3.32), and
# a decision row has 19 columns.
SQLITE_ROWS_PER_INSERT = 50


def sqlite_insert(table: str, columns: Sequence[str], rows: int, suffix: str = "") -> str:
    """A multi-row INSERT of `rows` rows (one statement: the driver's executemany would release and
    retake the GIL for every row)."""
    one = "(" + ", ".join("?" * len(columns)) + ")"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * rows)}{suffix}"


def sqlite_datetime(at: datetime) -> str:
    """A datetime as SQLAlchemy's SQLite dialect stores one (`UTCDateTime`): UTC, no offset, microseconds.
    A time without an offset is refused, as SQLAlchemy refuses it."""
    if at.tzinfo is UTC:
        return at.replace(tzinfo=None).isoformat(" ", "microseconds")
    if at.utcoffset() is None:
        raise ValueError(f"a stored time needs its offset (UTC): {at!r}")
    return at.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def landed(conn: Connection, head: tuple[int, str]) -> bool:
    """Whether the transaction whose `append` returned `head` committed (its last row is in the log)."""
    seq, hash_ = head
    return conn.execute(select(_log.c.hash).where(_log.c.seq == seq)).scalar() == hash_


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    rows_checked: int  # rows found intact (before the first bad one)
    first_bad_seq: int | None = None
    reason: str | None = None
    head: tuple[int, str] = (0, GENESIS)  # the last intact row: keep a copy elsewhere to compare


def verify(engine: Engine, chunk_size: int = 1000) -> VerifyResult:
    """Walk the chain in seq order, `chunk_size` rows at a time, and report the first bad row.

    Safe while cedargate is appending: the head is read after the walk, and rows appended meanwhile
    are checked up to it. Raises `AuditLogError` if the database has no audit log at all.
    """
    tables = set(inspect(engine).get_table_names())
    if not {"audit_log", "audit_head"} <= tables:
        raise AuditLogError(
            "this database has no audit log (tables audit_log and audit_head): it is not a cedargate "
            "decision store, or the tables were dropped"
        )
    walk = _Walk()
    with engine.connect() as conn:
        if bad := walk.check(_rows(conn, after=0, upto=None, chunk_size=chunk_size)):
            return bad
        head = conn.execute(select(_head.c.seq, _head.c.hash).where(_head.c.id == 1)).first()
        if head is None:
            if walk.seq == 0:
                return walk.result()
            return walk.bad(
                walk.seq + 1,
                f"the audit_head row is missing, so rows deleted after seq {walk.seq} cannot be ruled out",
            )
        if head.seq < walk.seq:
            return walk.bad(
                head.seq + 1, f"rows from seq {head.seq + 1} to {walk.seq} were added outside cedargate "
                f"(audit_head says the log ends at seq {head.seq})"
            )
        if head.seq > walk.seq:  # appended while we walked, or cut off the end: walk on up to the head
            if bad := walk.check(_rows(conn, after=walk.seq, upto=head.seq, chunk_size=chunk_size)):
                return bad
            if walk.seq < head.seq:
                return walk.bad(
                    walk.seq + 1, f"rows deleted at the end: the log ends at seq {walk.seq} but audit_head "
                    f"says it ends at seq {head.seq}"
                )
        if walk.hash != head.hash:
            return walk.bad(
                walk.seq, "the last row was replaced: its hash differs from the one in audit_head"
            )
        return walk.result()


class _Walk:
    def __init__(self) -> None:
        self.seq, self.hash, self.count = 0, GENESIS, 0

    def check(self, rows: Iterator[Any]) -> VerifyResult | None:
        for row in rows:
            if row.seq > self.seq + 1:
                missing = f"seq {self.seq + 1}" + (f" to {row.seq - 1}" if row.seq - 1 > self.seq + 1 else "")
                return self.bad(row.seq, f"row(s) deleted before seq {row.seq} ({missing} missing)")
            if row.seq <= self.seq:
                return self.bad(row.seq, f"a row with seq {row.seq} before the first row, seq 1, was added")
            if row.prev_hash != self.hash:
                return self.bad(
                    row.seq, "reordered or replaced: its prev_hash is not the hash of row seq "
                    f"{self.seq}, so that row was replaced or rows were moved"
                )
            try:
                expected = entry_hash(
                    row.seq, row.at, row.kind, row.decision_id, row.override_id, row.agent, row.actor,
                    row.payload, row.prev_hash,
                )
            except (TypeError, ValueError) as exc:
                return self.bad(row.seq, f"edited: its content cannot be read ({exc})")
            if row.hash != expected:
                return self.bad(row.seq, "edited: its hash does not match its content")
            self.seq, self.hash, self.count = row.seq, row.hash, self.count + 1
        return None

    def bad(self, seq: int, reason: str) -> VerifyResult:
        return VerifyResult(False, self.count, seq, reason, (self.seq, self.hash))

    def result(self) -> VerifyResult:
        return VerifyResult(True, self.count, head=(self.seq, self.hash))


_PAGE = text(
    "SELECT seq, at, kind, decision_id, override_id, agent, actor, payload, prev_hash, hash FROM audit_log"
    " WHERE seq > :after AND seq <= :upto ORDER BY seq LIMIT :limit"
)


def _rows(conn: Connection, *, after: int, upto: int | None, chunk_size: int) -> Iterator[Any]:
    # Keyset pages rather than one cursor: bounded memory on every driver, and no long-held read.
    # Raw SQL: the values are hashed as stored, without the column types' conversions.
    upto = 2**63 - 1 if upto is None else upto
    while True:
        page = conn.execute(_PAGE, {"after": after, "upto": upto, "limit": chunk_size}).all()
        yield from page
        if len(page) < chunk_size:
            return
        after = page[-1].seq


def entries_about(engine: Engine, override_id: str, limit: int = 500) -> list[AuditEntry]:
    """The audit rows about one override request, in chain order: its own events (opened, votes,
    grant, release, expiry) and those of the calls tied to it (each one's decision and outcome)."""
    with engine.connect() as conn:
        own = conn.execute(select(_log).where(_log.c.override_id == override_id)
                           .order_by(_log.c.seq).limit(limit)).all()
        decisions = {row.decision_id for row in own if row.decision_id}
        calls = conn.execute(select(_log).where(_log.c.decision_id.in_(decisions), _log.c.override_id.is_(None))
                             .order_by(_log.c.seq).limit(limit)).all() if decisions else []
    rows = sorted([*own, *calls], key=lambda row: row.seq)[:limit]
    return [AuditEntry(**row._mapping) for row in rows]
