"""Override requests as stored: the tables, the fingerprint a grant binds to, and the plain operations
on their rows that `proxy.oversight.workflow.OverrideWorkflow` composes into state changes.

State machine (`OverrideStatus`): pending -> granted | denied | expired | needs_info; needs_info ->
pending (the agent answered the reviewer's question) | granted | denied | expired; granted -> released |
release_refused | grant_expired. Pending and needs_info are the undecided statuses (`UNDECIDED`).
Every transition is a conditional UPDATE (`OverrideStore.move`) on (id, status[, version]), so
concurrent approve/approve and approve/deny end in exactly one consistent state on SQLite and
PostgreSQL alike: the loser's transaction changes nothing. A grant is consumed by the transition
granted -> released, which succeeds for exactly one caller. Only the workflow moves a request, each
time in the transaction that chains its audit event; this module reads and writes rows in the session
it is handed.

At most one request per call is live (undecided or granted) at a time, across every process sharing the
database: a partial unique index on the fingerprint of live requests (migrations 0002, 0006) makes a
second process's insert fail, and `open_or_attach` then attaches the call to the request the other opened.

Opening is where floods are stopped (see `proxy.oversight.limits`): a body too large to show a reviewer whole,
an agent with too many requests pending, or one opening them too fast gets `OverrideRefused` and
nothing is stored. What is stored of the call has its query secrets redacted (`proxy.calls.redaction`);
the fingerprint, which a grant binds to, is of the call as sent, less what only says how to answer or
what the agent intends (`Prefer: respond-async`/`wait=N`, `X-Agent-Justification`...: see `fingerprint`).
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum, StrEnum
from typing import Any

from sqlalchemy import (
    Column,
    ColumnElement,
    DateTime,
    Index,
    LargeBinary,
    Table,
    UniqueConstraint,
    Update,
    bindparam,
    case,
    insert,
    inspect,
    text,
    update,
)
from sqlalchemy.engine import Connection, Row
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import load_only
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key
from sqlmodel import Field, Session, SQLModel, col, func, select

from proxy.calls.mapping import Call, is_secret_header
from proxy.calls.redaction import Redaction
from proxy.cedar.escalation import Chain, Escalation, Requirement
from proxy.oversight.limits import OverrideLimits, OverrideRefused, Refusal, TokenBuckets
from proxy.record.audit import ROW_NUMBER
from proxy.record.migrations import migrate
from proxy.record.store import WRITES, utcnow
from proxy.vocabulary.canonical import Form, canonical
from proxy.vocabulary.hosts import canonical_host
from proxy.vocabulary.problems import Problem


class OverrideStatus(str, Enum):
    PENDING = "pending"
    GRANTED = "granted"
    DENIED = "denied"
    EXPIRED = "expired"
    RELEASED = "released"
    RELEASE_REFUSED = "release_refused"
    GRANT_EXPIRED = "grant_expired"
    # A reviewer asked the agent a question; the agent's next retry with a new X-Agent-Justification
    # answers it and makes the request pending again. Reviewers may still approve or deny it meanwhile.
    NEEDS_INFO = "needs_info"


# Not decided yet, waiting for a reviewer's decision (listed first, most urgent first): reviewers may
# vote, the expiry job expires it at `expires_at`.
UNDECIDED = (OverrideStatus.PENDING, OverrideStatus.NEEDS_INFO)
LIVE = (*UNDECIDED, OverrideStatus.GRANTED)
# The ends an agent is told of on its retry (once: `outcome_told_at`), when no held call was told.
TOLD_OUTCOMES = (OverrideStatus.DENIED, OverrideStatus.EXPIRED, OverrideStatus.GRANT_EXPIRED)


class Ballot(StrEnum):
    """One approver's vote, as stored in `override_votes.verdict`."""

    APPROVE = "approve"
    DENY = "deny"


class MessageKind(StrEnum):
    """One turn of a request's conversation, as stored in `override_messages.kind`."""

    QUESTION = "question"  # a reviewer's, to the agent
    ANSWER = "answer"  # the agent's, the X-Agent-Justification of its retry


def _moment(index: bool = False, optional: bool = False) -> Any:
    # timestamptz on PostgreSQL, so comparisons never depend on the server's time zone.
    return Field(default=None if optional else ..., index=index, sa_type=DateTime(timezone=True))


# The statuses of a live request, as the partial unique index's condition.
LIVE_SQL = f"status IN ({', '.join(repr(status.value) for status in LIVE)})"


class Override(SQLModel, table=True):
    __tablename__ = "overrides"
    __table_args__ = (
        # One live request per call fingerprint, whichever process opens it (see `open_or_attach`).
        Index("ux_overrides_live_fingerprint", "fingerprint", unique=True,
              sqlite_where=text(LIVE_SQL), postgresql_where=text(LIVE_SQL)),
    )

    id: str = Field(primary_key=True)
    fingerprint: str = Field(index=True)
    status: str = Field(index=True)
    version: int = 0
    agent: str = Field(index=True)
    method: str
    url: str
    host: str
    path: str
    action: str = Field(index=True)
    resource: str
    headers: str = "{}"  # JSON, secrets removed
    body: bytes = Field(default=b"", sa_column=Column(LargeBinary, nullable=False))
    body_sha256: str
    cedar_request: str = "{}"  # JSON
    policies: str = "[]"  # JSON: id, reason, annotations of each determining forbid
    requirements: str = "[]"  # JSON: roles and approvals each policy needs
    policy_revision: str
    decision_id: str
    justification: str | None = None
    created_at: datetime = _moment()
    expires_at: datetime = _moment(index=True)
    decided_at: datetime | None = _moment(optional=True)
    decided_reason: str | None = None
    grant_expires_at: datetime | None = _moment(optional=True)
    released_at: datetime | None = _moment(optional=True)
    release_decision_id: str | None = None
    # JSON: the values the approvers changed in the call ({"amount": 50}, see `proxy.oversight.changes`);
    # None when it is approved as sent. Set by the first approval; the others must agree with it.
    changes: str | None = None
    # When the agent was told how the request ended (denied, expired), by a held call or on a retry:
    # until then the identical call's retry is told that, rather than opening a new request.
    outcome_told_at: datetime | None = _moment(optional=True)
    # The escalation chain (`proxy.cedar.escalation.Chain.as_dict`: tiers, expiry, reminders; None for a
    # request opened before chains, whose one tier is its requirements' roles) and where the chain job
    # has moved it: the tier announced (1-based), when, the reminders sent in it, when the job should
    # look next (None: nothing before the expiry), and the primary reviewer named at the last step.
    chain: str | None = None
    tier: int = 1
    tier_started_at: datetime | None = _moment(optional=True)
    reminders_sent: int = 0
    next_step_at: datetime | None = _moment(index=True, optional=True)
    primary_reviewer: str | None = None


class OverrideVote(SQLModel, table=True):
    __tablename__ = "override_votes"
    __table_args__ = (UniqueConstraint("override_id", "approver"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=ROW_NUMBER)  # never deleted (revision 0014)
    override_id: str = Field(index=True, foreign_key="overrides.id")
    approver: str
    roles: str = "[]"
    verdict: str  # a Ballot value
    reason: str
    at: datetime = _moment()


class OverrideMessage(SQLModel, table=True):
    """A question a reviewer asked the agent about a request, or the agent's answer."""

    __tablename__ = "override_messages"

    id: int | None = Field(default=None, primary_key=True, sa_type=ROW_NUMBER)  # never deleted (revision 0014)
    override_id: str = Field(index=True, foreign_key="overrides.id")
    at: datetime = _moment()
    by: str  # the approver who asked, or the agent who answered
    kind: str  # a MessageKind value
    text: str


class OverrideError(Exception):
    """A reviewer's request that cannot be carried out; `status` is the HTTP status to answer with,
    `problem` the catalogue's type for it (None: plain HTTP, `about:blank`), `more` further members."""

    def __init__(self, status: int, detail: str, problem: Problem | None = None, **more: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.problem = problem
        self.more = more


# Headers that describe the hop, not the call: everything else is bound into the fingerprint, since
# policies read headers and upstreams act on them (Authorization, X-HTTP-Method-Override, tenants...).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "content-length"})
# An MCP client's session, not part of what a tool call does: a retry in a new session is the same call.
MCP_SESSION_HEADERS = frozenset({"mcp-session-id", "last-event-id"})


# What the agent says of its intent (`proxy.calls.mapping.agent_statements`): cedargate's own headers. Any
# other X-Agent-* header is one the upstream may act on (`X-Agent-Tenant`), so it stays in the identity.
AGENT_STATEMENTS = frozenset({"x-agent-justification", "x-agent-confidence", "x-agent-session"})
# The preferences cedargate itself honours: how long to hold the call (`requested_wait`). Others tell the
# server what to do (PostgREST's `tx=rollback`, `resolution=merge-duplicates`, `max-affected=1`; RFC
# 7240's `handling=strict`), so they stay in the identity.
_ANSWERING_PREFERENCE = re.compile(r"respond-async|wait\s*=\s*\d+")


def _identity_header(name: str, value: str) -> str | None:
    """The header's value as bound into the fingerprint; None when it is not part of a request's identity.

    How cedargate should answer (`Prefer: respond-async`, `wait=N`) and what the agent says of its
    intent do not change what the server does: a retry that changes only these is the same request, not
    a new one a human must decide again. A grant is still safe to release for it: at release the call as
    sent now is decided again (its X-Agent-* statements included).
    """
    if name in AGENT_STATEMENTS:
        return None
    if name != "prefer" or '"' in value:  # a quoted value may hold commas: kept whole
        return value
    kept = [p.strip() for p in value.split(",")
            if p.strip() and not _ANSWERING_PREFERENCE.fullmatch(p.strip().lower())]
    return ", ".join(kept) or None


def fingerprint(call: Call, binding: bytes | None = None) -> str:
    """Same agent, method, normalized URL, body and the headers that change what the server does =>
    same fingerprint. Hop-by-hop headers, the agent's statements (`X-Agent-Justification`, `-Confidence`,
    `-Session`) and the preferences on how to answer (`Prefer: respond-async`, `wait=N`) are not part of it.

    `binding` stands in for the body when the body holds more than what the call does: an MCP message's
    JSON-RPC id and session differ on every retry of the same tool call (see `proxy.calls.mcp`).
    """
    return _fingerprint(call, binding, _identity_header)


def fingerprints(call: Call, binding: bytes | None = None) -> tuple[str, ...]:
    """The call's fingerprint, then the one releases before 2026-12 stored for it (which bound `Prefer`
    and `X-Agent-*` too) where that differs: requests opened before an upgrade are still found."""
    current, previous = fingerprint(call, binding), _fingerprint(call, binding, lambda name, value: value)
    return (current,) if previous == current else (current, previous)


def _fingerprint(call: Call, binding: bytes | None, bound: Callable[[str, str], str | None]) -> str:
    skip = HOP_BY_HOP | MCP_SESSION_HEADERS if binding is not None else HOP_BY_HOP
    headers = []
    for name, value in call.headers.items():
        key = name.lower()
        if key not in skip and (kept := bound(key, value)) is not None:
            headers.append((key, kept))
    headers.sort()
    parts = {
        "agent": call.agent,
        "method": call.method.upper(),
        "url": f"{call.scheme}://{canonical_host(call.host)}:{call.port}{call.path}?{call.query}",
        "body": hashlib.sha256(call.body if binding is None else binding).hexdigest(),
        "headers": headers,
    }
    return hashlib.sha256(canonical(parts, Form.FINGERPRINT)).hexdigest()


def headers_for_review(headers: Mapping[str, str]) -> dict[str, str]:
    # A reviewer sees that a credential was sent, never its value.
    return {k: ("[redacted]" if is_secret_header(k) else v) for k, v in headers.items()
            if k.lower() != "proxy-authorization"}


@dataclass(frozen=True)
class Vote:
    approver: str
    roles: frozenset[str]
    verdict: str
    reason: str
    at: datetime


_OVERRIDES: Table = Override.__table__  # type: ignore[attr-defined]  # SQLModel sets it, untyped
_VOTES: Table = OverrideVote.__table__  # type: ignore[attr-defined]
_READ = _OVERRIDES.select().where(_OVERRIDES.c.id == bindparam("override_id"))
_BALLOTS = (select(_VOTES.c.approver, _VOTES.c.verdict, _VOTES.c.roles)
            .where(_VOTES.c.override_id == bindparam("override_id")))
_CAST = insert(_VOTES)
_OVERRIDE_CLASS = inspect(Override).class_manager


def _as_loaded(row: Row[Any]) -> Override:
    """The request as the ORM loads it (a new instance of its class holding the row's values), with no
    session: SQLModel's constructor, which sets each field through its descriptors, cost more CPU than
    reading the row."""
    override: Override = _OVERRIDE_CLASS.new_instance()
    override.__dict__.update(row._mapping)
    return override


def _moving(override_id: str, from_status: OverrideStatus, to_status: OverrideStatus | None, version: int | None,
            unexpired_grant: bool, values: Mapping[str, Any], *,
            returning: bool = False) -> tuple[Update, dict[str, Any]]:
    """The conditional UPDATE of `OverrideStore.move` and its parameters. The statement depends only on
    the transition's shape, so each shape is built once (`_moving_shape`): a vote and a release run it
    on the writer thread every decision waits for, and building it afresh (its values coerced, its cache
    key generated) cost more CPU there than SQLite's execution of it."""
    params = {"override_id": override_id, "from_status": from_status.value, **values}
    if to_status is not None:
        params["status"] = to_status.value
    if version is not None:
        params["from_version"] = version
    if unexpired_grant:
        params["now"] = utcnow()
    shape = _moving_shape(tuple(sorted(values)), to_status is not None, version is not None, unexpired_grant,
                          returning)
    return shape, params


@functools.cache
def _moving_shape(values: tuple[str, ...], to_status: bool, version: bool, unexpired_grant: bool,
                  returning: bool) -> Update:
    # One per combination the callers use (a handful). Bound parameters in the WHERE clause are not
    # named after a column the UPDATE sets: SQLAlchemy keeps those names for the SET clause.
    condition: list[ColumnElement[bool]] = [col(Override.id) == bindparam("override_id"),
                                            col(Override.status) == bindparam("from_status")]
    if version:
        condition.append(col(Override.version) == bindparam("from_version"))
    if unexpired_grant:
        condition.append(col(Override.grant_expires_at) > bindparam("now"))
    setting: dict[str, Any] = {name: bindparam(name) for name in ((*values, "status") if to_status else values)}
    moving = update(Override).where(*condition).values(version=col(Override.version) + 1, **setting)
    return moving.returning(*_OVERRIDES.c) if returning else moving


class OverrideStore:
    """Plain operations on override rows: reads in a short transaction of their own; writes in the
    session they are handed (the workflow's transaction), except `open_or_attach` without one."""

    LIST_PAGE = 100  # rows read at a time when a listing is filtered by the reviewer's roles

    def __init__(self, engine: SAEngine, grant_ttl: int = 600, *, limits: OverrideLimits = OverrideLimits(),
                 redaction: Redaction = Redaction(), clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.grant_ttl = grant_ttl
        self.limits = limits
        self.redaction = redaction
        self._buckets = TokenBuckets(limits.rate_per_minute, clock) if limits.rate_per_minute else None
        # Within one process the lock keeps identical concurrent calls on one request without a
        # failed insert, and makes each agent's limits exact: the count of its pending requests, the
        # check against the cap, the insert and taking a token happen as one step, so concurrent calls
        # can never open more than `max_pending_per_agent` pending requests or outrun the rate. Across
        # processes on one database the unique index keeps one live request per call; the limits
        # are then each process's own (two instances may each allow that many).
        self._open_lock = threading.RLock()
        migrate(engine)

    def open_or_attach(
        self, call: Call, *, decision_id: str, escalation: Escalation, policies: list[dict[str, Any]],
        cedar_request: dict[str, Any], revision: str, justification: str | None, binding: bytes | None = None,
        session: Session | None = None, lapsed: builtins.list[tuple[Override, OverrideStatus]] | None = None,
        told: builtins.list[Override] | None = None, query_fields: Sequence[tuple[str, str]] | None = None,
    ) -> tuple[Override, bool]:
        """The live (undecided or granted) override for this exact call; else the call's last request if
        it ended denied or expired and the agent was not told yet (marked told now, and added to `told`
        for the caller to record); else a new pending one.

        Raises `OverrideRefused` when a new one may not be opened; an identical retry of a live
        request always finds it, whatever the limits. With `session`, the new row is only flushed
        there: it commits with the caller's transaction. A request for this call still marked live but
        past its time (the expiry job has not run yet) is expired here, first, since only one may be
        live; it is added to `lapsed`, with its new status, for the caller to record.
        """
        if session is None:
            # A writing transaction (on SQLite: BEGIN IMMEDIATE), as the recorder's: one that read
            # first could not take the write lock after another process's commit.
            writes = self.engine.execution_options(**{WRITES: True})
            with self._open_lock, Session(writes, expire_on_commit=False) as own:
                opened = self.open_or_attach(
                    call, decision_id=decision_id, escalation=escalation, policies=policies,
                    cedar_request=cedar_request, revision=revision, justification=justification,
                    binding=binding, session=own, lapsed=lapsed, told=told, query_fields=query_fields)
                own.commit()
                return opened
        prints = fingerprints(call, binding)
        now = utcnow()
        # The lock is held until the commit: by the caller above, or by the recorder's writer thread,
        # which runs one transaction at a time.
        with self._open_lock:
            live = self._live(session, prints)
            if live and _still_live(live, now):
                return live, False
            if live is not None:
                status = OverrideStatus(live.status)
                target = OverrideStatus.EXPIRED if status in UNDECIDED else OverrideStatus.GRANT_EXPIRED
                if self.move(session, live.id, status, target, decided_at=now) and lapsed is not None:
                    lapsed.append((live, target))
            ended = self._untold(session, prints, now)
            if ended is not None:
                if told is not None:
                    told.append(ended)
                return ended, False
            self._admit(session, call, now)
            chain = escalation.chain
            shown_request = dict(cedar_request)
            if isinstance(cedar_request.get("context"), dict):
                shown_request["context"] = self.redaction.context(cedar_request["context"], call.query,
                                                                  query_fields)
            override = Override(
                id=str(uuid.uuid4()), fingerprint=prints[0], status=OverrideStatus.PENDING.value,
                agent=call.agent, method=call.method.upper(), url=self.redaction.url(call.url),
                host=canonical_host(call.host),
                path=call.path, action=cedar_request["action"], resource=cedar_request["resource"],
                headers=json.dumps(headers_for_review(call.headers)),
                body=call.body, body_sha256=hashlib.sha256(call.body).hexdigest(),
                cedar_request=json.dumps(shown_request), policies=json.dumps(policies),
                requirements=json.dumps([r.as_dict() for r in escalation.requirements]),
                policy_revision=revision, decision_id=decision_id, justification=justification,
                created_at=now, expires_at=now + timedelta(seconds=escalation.expires_in),
                chain=json.dumps(chain.as_dict()), tier=1, tier_started_at=now, reminders_sent=0,
                next_step_at=at_offset(now, chain.next_step(1, 0)),
            )
            try:
                with session.begin_nested():
                    session.add(override)
            except IntegrityError:
                # Another process opened a live request for this call meanwhile: the call joins it.
                other = self._live(session, prints)
                if other is None:
                    raise
                return other, False
            if self._buckets is not None:
                self._buckets.take(call.agent)
            return override, True

    @staticmethod
    def _live(session: Session, prints: tuple[str, ...]) -> Override | None:
        return session.exec(
            select(Override).where(col(Override.fingerprint).in_(prints),
                                  col(Override.status).in_([status.value for status in LIVE]))
            .order_by(col(Override.created_at).desc())
        ).first()

    def _untold(self, session: Session, prints: tuple[str, ...], now: datetime) -> Override | None:
        """The call's last request, marked told now, if it ended denied or expired and nobody told the agent.

        An agent that did not wait (Prefer: respond-async), or whose hold ended first, learns this way
        why on its retry; told once, the next retry asks the reviewers again.
        """
        last = session.exec(select(Override).where(col(Override.fingerprint).in_(prints))
                            .order_by(col(Override.created_at).desc())).first()
        if last is None or last.outcome_told_at is not None or OverrideStatus(last.status) not in TOLD_OUTCOMES:
            return None
        if not self.tell(session, last.id, now):
            return None  # a concurrent retry told it: this one asks again
        session.refresh(last)
        return last

    @staticmethod
    def tell(session: Session, override_id: str, now: datetime) -> bool:
        """Mark the request's end as told to the agent: True for exactly one caller."""
        return session.exec(update(Override).where(
            col(Override.id) == override_id, col(Override.outcome_told_at).is_(None),
            col(Override.status).in_([status.value for status in TOLD_OUTCOMES]),
        ).values(outcome_told_at=now)).rowcount == 1

    def messages(self, override_id: str) -> builtins.list[OverrideMessage]:
        """The request's conversation, oldest first."""
        with Session(self.engine, expire_on_commit=False) as session:
            return self.conversation(session, override_id)

    @staticmethod
    def conversation(session: Session, override_id: str) -> builtins.list[OverrideMessage]:
        return builtins.list(session.exec(
            select(OverrideMessage).where(OverrideMessage.override_id == override_id)
            .order_by(col(OverrideMessage.at), col(OverrideMessage.id))).all())

    @staticmethod
    def add_message(session: Session, override_id: str, by: str, kind: MessageKind, text_: str,
                    at: datetime) -> None:
        session.add(OverrideMessage(override_id=override_id, at=at, by=by, kind=kind.value, text=text_))
        session.flush()

    def granted_for(self, call: Call, binding: bytes | None = None) -> Override | None:
        """The unexpired, unconsumed grant for this exact call, if a human gave one."""
        with Session(self.engine, expire_on_commit=False) as session:
            return session.exec(
                select(Override).where(
                    col(Override.fingerprint).in_(fingerprints(call, binding)),
                    Override.status == OverrideStatus.GRANTED.value,
                    col(Override.grant_expires_at) > utcnow(),
                ).order_by(col(Override.created_at).desc())
            ).first()

    def _admit(self, session: Session, call: Call, now: datetime) -> None:
        """Raise `OverrideRefused` if the agent may not open a request for `call` now."""
        limits = self.limits
        if limits.max_body_bytes is not None and len(call.body) > limits.max_body_bytes:
            raise OverrideRefused(
                Refusal.BODY_TOO_LARGE,
                f"the call's body is {len(call.body)} bytes; an escalated call is kept whole for its "
                f"reviewers up to {limits.max_body_bytes} bytes (max_override_body_bytes), since a reviewer "
                "grants exactly what they see. Send the call with a smaller body.",
            )
        if limits.max_pending_per_agent is not None:
            count, soonest = session.exec(select(func.count(), func.min(Override.expires_at)).where(
                Override.agent == call.agent, col(Override.status).in_([s.value for s in UNDECIDED]),
                Override.expires_at > now,
            )).one()
            if count >= limits.max_pending_per_agent:
                # A review may come any moment; the soonest expiry frees a place at the latest.
                wait = 60 if soonest is None else math.ceil((aware(soonest) - now).total_seconds())
                raise OverrideRefused(
                    Refusal.TOO_MANY_PENDING,
                    f"{call.agent} already has {count} override requests waiting for review, the most one "
                    "agent may have (max_pending_overrides_per_agent); no request was opened for this call. "
                    "Retry it once reviewers have decided some; the identical call of a pending request "
                    "still finds it.",
                    max(1, min(60, wait)),
                )
        if self._buckets is not None:
            wait = self._buckets.wait(call.agent)
            if wait:
                raise OverrideRefused(
                    Refusal.RATE_LIMITED,
                    f"{call.agent} is opening override requests faster than the {limits.rate_per_minute} a "
                    f"minute one agent may (override_rate); no request was opened for this call. Retry "
                    f"after {wait} s.",
                    wait,
                )

    def get(self, override_id: str) -> Override | None:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.get(Override, override_id)

    def votes(self, override_id: str) -> list[Vote]:
        with Session(self.engine) as session:
            rows = session.exec(
                select(OverrideVote).where(OverrideVote.override_id == override_id).order_by(col(OverrideVote.at))
            ).all()
        return [Vote(r.approver, frozenset(json.loads(r.roles)), r.verdict, r.reason, r.at) for r in rows]

    def votes_on(self, override_ids: Iterable[str]) -> dict[str, builtins.list[Vote]]:
        """The votes on each of several requests (oldest first), in one query: a listing shows them all."""
        ids = builtins.list(dict.fromkeys(override_ids))
        found: dict[str, builtins.list[Vote]] = {override_id: [] for override_id in ids}
        if not ids:
            return found
        with Session(self.engine) as session:
            rows = session.exec(select(OverrideVote).where(col(OverrideVote.override_id).in_(ids))
                                .order_by(col(OverrideVote.at), col(OverrideVote.id))).all()
        for r in rows:
            found[r.override_id].append(Vote(r.approver, frozenset(json.loads(r.roles)), r.verdict, r.reason, r.at))
        return found

    def list(self, status: str | None = None, agent: str | None = None, action: str | None = None,
             limit: int = 100, roles: frozenset[str] | None = None, *, policy: str | None = None,
             decided: bool | None = None, since: datetime | None = None) -> list[Override]:
        """Undecided requests first, the soonest to expire first; then decided ones, the latest decided
        first. With `roles`, only the requests someone holding them can decide (`can_decide`); with
        `policy`, only those a policy of that @id escalated; `decided` True or False, only those (not)
        waiting for a decision; `since`, only those opened then or later."""
        undecided = col(Override.status).in_([s.value for s in UNDECIDED])
        query = select(Override).order_by(
            case((undecided, 0), else_=1),
            case((undecided, col(Override.expires_at)), else_=None),
            func.coalesce(col(Override.decided_at), col(Override.created_at)).desc(), col(Override.id))
        if status:
            query = query.where(Override.status == status)
        if agent:
            query = query.where(Override.agent == agent)
        if action:
            query = query.where(Override.action == action)
        if decided is not None:
            query = query.where(~undecided if decided else undecided)
        if since is not None:
            query = query.where(col(Override.created_at) >= since)
        if policy:
            # The policies are JSON in the row: narrowed here by their text, then checked exactly below.
            query = query.where(col(Override.policies).contains(json.dumps(policy), autoescape=True))
        keep: Callable[[Override], bool] = lambda o: (  # noqa: E731
            (roles is None or can_decide(o, roles)) and (not policy or policy in policy_ids(o)))
        found: list[Override] = []
        with Session(self.engine, expire_on_commit=False) as session:
            if roles is None and not policy:
                return list(session.exec(query.limit(limit)).all())
            # What is JSON in the row is filtered here, a page at a time, until enough.
            page, offset = max(limit, self.LIST_PAGE), 0
            while len(found) < limit:
                rows = session.exec(query.offset(offset).limit(page)).all()
                found.extend(o for o in rows if keep(o))
                if len(rows) < page:
                    break
                offset += page
        return found[:limit]

    def add_vote(self, session: Session, override_id: str, approver: str, roles: frozenset[str],
                 ballot: Ballot, reason: str, at: datetime) -> OverrideVote | None:
        """Store one approver's vote, or return the vote they cast before (and store nothing)."""
        prior = session.exec(select(OverrideVote).where(
            OverrideVote.override_id == override_id, OverrideVote.approver == approver)).first()
        if prior is None:
            session.add(OverrideVote(override_id=override_id, approver=approver, roles=json.dumps(sorted(roles)),
                                     verdict=ballot.value, reason=reason, at=at))
            session.flush()
        return prior

    @staticmethod
    def move(session: Session | Connection, override_id: str, from_status: OverrideStatus,
             to_status: OverrideStatus | None, *, version: int | None = None, unexpired_grant: bool = False,
             **values: Any) -> bool:
        """Conditionally UPDATE one override still in `from_status` (and at `version`, if given): True
        for exactly one caller. `to_status` None changes only its version (a vote that decided nothing).

        `unexpired_grant` also requires the grant to be within its time, so releasing never depends
        on the expiry job having run. On a `Connection` (a transaction with no ORM objects, such as a
        release's) the UPDATE is plain SQL, with no session to keep in step.
        """
        moving, params = _moving(override_id, from_status, to_status, version, unexpired_grant, values)
        if isinstance(session, Connection):
            return bool(session.execute(moving, params).rowcount == 1)
        # The session's own synchronization reads the values written into a statement, not those bound
        # at execution: the request it holds is brought in step here, as the UPDATE left the row.
        held = session.identity_map.get(identity_key(Override, override_id))
        # Its version as held, read before the UPDATE: an expired one read after would load the new row's.
        before = None if held is None else inspect(held).dict.get("version")
        changed: int = session.execute(  # type: ignore[attr-defined]
            moving, params, execution_options={"synchronize_session": False}).rowcount
        if changed == 1 and held is not None:
            moved = {**values, **({} if to_status is None else {"status": to_status.value})}
            if before is None:  # nothing held to add one to: read afresh when next used
                session.expire(held, [*moved, "version"])
            else:
                for name, value in {**moved, "version": before + 1}.items():
                    set_committed_value(held, name, value)
        return changed == 1

    # --- a vote's statements, on the writer's connection ---------------------------------------------
    # A vote's transaction is the longest step on an approval's way to its held call, and it runs on the
    # writer thread every decision waits for: through the ORM (a session, its identity map and flush, the
    # UPDATE kept in step with the session, a refresh) it cost the writer about three times the CPU of its
    # statements in SQLAlchemy Core. These are the same reads and writes, fewer of them, in Core.

    @staticmethod
    def read(conn: Connection, override_id: str) -> Override | None:
        row = conn.execute(_READ, {"override_id": override_id}).one_or_none()
        return None if row is None else _as_loaded(row)

    @staticmethod
    def ballots(conn: Connection, override_id: str) -> dict[str, tuple[str, frozenset[str]]]:
        """Each approver who voted on the request: their verdict, and the roles they held when they voted."""
        return {approver: (verdict, frozenset(json.loads(roles)))
                for approver, verdict, roles in conn.execute(_BALLOTS, {"override_id": override_id})}

    @staticmethod
    def cast(conn: Connection, override_id: str, approver: str, roles: frozenset[str], ballot: Ballot,
             reason: str, at: datetime) -> None:
        """Store one approver's vote (the unique (request, approver) refuses a second one)."""
        conn.execute(_CAST, {"override_id": override_id, "approver": approver, "roles": json.dumps(sorted(roles)),
                             "verdict": ballot.value, "reason": reason, "at": at})

    @staticmethod
    def moved(conn: Connection, override_id: str, from_status: OverrideStatus, to_status: OverrideStatus | None,
              *, version: int, **values: Any) -> Override | None:
        """`move`, returning the request as the UPDATE left it (None: it was not moved)."""
        moving, params = _moving(override_id, from_status, to_status, version, False, values, returning=True)
        row = conn.execute(moving, params).one_or_none()
        return None if row is None else _as_loaded(row)

    def count_by_status(self) -> dict[str, int]:
        """How many requests the store holds in each status (every status named, zeros included)."""
        with Session(self.engine) as session:
            rows = session.exec(select(Override.status, func.count()).group_by(Override.status)).all()
        counts = {status.value: 0 for status in OverrideStatus}
        counts.update({status: count for status, count in rows})
        return counts

    @staticmethod
    def advance(session: Session, override_id: str, from_tier: int, from_reminders: int, now: datetime,
                **values: Any) -> bool:
        """Move an undecided, unexpired request along its chain, if it still stands at (`from_tier`,
        `from_reminders` sent): True for exactly one caller. Its `version` is left alone: a step of the
        chain changes nothing a vote relies on, so it never makes a concurrent vote start over."""
        return session.exec(update(Override).where(
            col(Override.id) == override_id, col(Override.tier) == from_tier,
            col(Override.reminders_sent) == from_reminders,
            col(Override.status).in_([s.value for s in UNDECIDED]), col(Override.expires_at) > now,
        ).values(**values).execution_options(synchronize_session=False)).rowcount == 1

    def chain_standing(self, now: datetime) -> tuple[int, int]:
        """(undecided requests whose chain has moved past its first tier, steps due and not yet announced)."""
        live = col(Override.status).in_([s.value for s in UNDECIDED]) & (col(Override.expires_at) > now)
        with Session(self.engine) as session:
            climbed = session.exec(select(func.count()).where(live, col(Override.tier) > 1)).one()
            due = session.exec(select(func.count()).where(live, col(Override.next_step_at) <= now)).one()
        return int(climbed), int(due)

    def chain_due(self, now: datetime) -> builtins.list[str]:
        """Undecided, unexpired requests whose chain has a step due (a tier reached, a reminder)."""
        with Session(self.engine) as session:
            return builtins.list(session.exec(select(Override.id).where(
                col(Override.status).in_([s.value for s in UNDECIDED]), col(Override.next_step_at) <= now,
                col(Override.expires_at) > now).order_by(col(Override.next_step_at))).all())

    @staticmethod
    def waiting(session: Session, now: datetime) -> builtins.list[Override]:
        """Every undecided, unexpired request: what the reviewers have on their plates. Only what says
        who may decide it is read (not its call's body and headers): a step of a chain reads them all."""
        who_decides = [getattr(Override, name) for name in
                       ("id", "agent", "status", "requirements", "chain", "created_at", "expires_at")]
        return builtins.list(session.exec(select(Override).options(load_only(*who_decides)).where(
            col(Override.status).in_([s.value for s in UNDECIDED]), col(Override.expires_at) > now)).all())

    def due(self, now: datetime) -> builtins.list[tuple[str, OverrideStatus]]:
        """Undecided requests and unused grants past their time: (id, status now)."""
        with Session(self.engine) as session:
            rows = session.exec(select(Override.id, Override.status).where(
                (col(Override.status).in_([s.value for s in UNDECIDED]) & (col(Override.expires_at) <= now))
                | ((col(Override.status) == OverrideStatus.GRANTED.value) & (col(Override.grant_expires_at) <= now))
            )).all()
        return [(override_id, OverrideStatus(status)) for override_id, status in rows]


def needed_roles(override: Override) -> frozenset[str]:
    """The roles of the request's first tier: every role that can approve some part of it from the start."""
    return frozenset(role for r in json.loads(override.requirements) for role in r["roles"])


def chain_of(override: Override) -> Chain:
    """The request's escalation chain; for one opened before chains, its one tier."""
    if override.chain:
        return Chain.from_dict(json.loads(override.chain))
    expires_in = int((aware(override.expires_at) - aware(override.created_at)).total_seconds())
    return Chain.of(requirements_of(override), expires_in)


def elapsed(override: Override, now: datetime) -> float:
    """Seconds since the request was opened: where its chain stands by the clock."""
    return (now - aware(override.created_at)).total_seconds()


def reachable_roles(override: Override, now: datetime | None = None) -> frozenset[str]:
    """Every role that may decide the request at `now`: its first tier's and those of every tier its
    chain has reached by then (on the clock, whether or not the chain job has announced it yet)."""
    return needed_roles(override) | chain_of(override).roles_reached(elapsed(override, now or utcnow()))


def at_offset(opened: datetime, seconds: float | None) -> datetime | None:
    return None if seconds is None else aware(opened) + timedelta(seconds=seconds)


def policy_ids(override: Override) -> list[str]:
    """The @ids of the policies that escalated the request."""
    return [p["id"] for p in json.loads(override.policies)]


def can_decide(override: Override, roles: frozenset[str], now: datetime | None = None) -> bool:
    """Whether someone holding `roles` may decide the request at `now` (its chain's tiers reached by then)."""
    return bool(roles & reachable_roles(override, now))


def requirements_of(override: Override) -> list[Requirement]:
    return [Requirement.from_dict(r) for r in json.loads(override.requirements)]


def _still_live(override: Override, now: datetime) -> bool:
    if OverrideStatus(override.status) in UNDECIDED:
        return aware(override.expires_at) > now
    return override.grant_expires_at is not None and aware(override.grant_expires_at) > now


def aware(moment: datetime) -> datetime:
    # SQLite hands datetimes back without their zone; they were written in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=utcnow().tzinfo)
