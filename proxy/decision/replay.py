"""Replay: the recorded calls re-decided against candidate policies, and what would change.

Each decision row keeps the Cedar request it was made on (`decisions.cedar_request`, secrets redacted).
`replay` walks the rows of a time window in batches (keyset on the row id: memory holds one batch and the
tally, whatever the window's size), judges each stored request against the candidate policy set by the
gate's own rules (`proxy.decision.judgement`), and tallies the decisions that would change, grouped by
the change (recorded decision and determining policies -> candidate decision and determining policies),
with a few examples of each. Nothing is sent anywhere: a Cedar request is all a decision needs.

What cannot be replayed is counted, not guessed: rows whose request was cleared (older than
`cedar_request_retention`) or never kept (recorded before revision 0007), and calls refused before any
policy was consulted (a call that could not be mapped, an action the manifest does not know), for which
no Cedar request ever existed. A replayed request is the one decided then, mapped by the manifest of that
time: a candidate manifest that names a route's action differently does not re-map recorded calls, and a
policy that reads a redacted query secret sees `[redacted]`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Table, func, inspect, select
from sqlalchemy.engine import Engine as SAEngine

from proxy.cedar.engine import CedarRequest, Engine
from proxy.decision.judgement import judge
from proxy.record.store import DecisionRecord

BATCH_SIZE = 500
EXAMPLES = 3

_decisions: Table = DecisionRecord.__table__  # type: ignore[attr-defined]  # SQLModel sets it, untyped
_COLUMNS = ("id", "decision_id", "at", "agent", "method", "scheme", "host", "port", "path", "action",
            "decision", "determining_policies", "cedar_request")


class ReplayError(Exception):
    """The store cannot be replayed from; the message says why and what to do."""


@dataclass(frozen=True)
class Example:
    decision_id: str
    at: datetime
    agent: str
    method: str
    url: str  # query secrets redacted, as stored
    action: str


@dataclass
class Change:
    """Recorded calls whose decision would change the same way, under the same determining policies."""

    recorded: str
    candidate: str
    recorded_policies: tuple[str, ...]
    candidate_policies: tuple[str, ...]
    count: int = 0
    examples: list[Example] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"from": self.recorded, "to": self.candidate, "count": self.count,
                "recorded_policies": list(self.recorded_policies),
                "candidate_policies": list(self.candidate_policies),
                "examples": [{**e.__dict__, "at": e.at.isoformat()} for e in self.examples]}


@dataclass
class ReplayReport:
    candidate_dir: str
    candidate_revision: str
    since: datetime
    decisions: int = 0  # rows in the window
    replayed: int = 0
    unchanged: int = 0
    without_request: int = 0  # decided by policy, but the request is gone (retention) or was never kept
    not_mapped: int = 0  # refused before any policy was consulted: nothing to replay
    changes: list[Change] = field(default_factory=list)  # most calls first

    @property
    def changed(self) -> int:
        return sum(c.count for c in self.changes)

    def as_dict(self) -> dict[str, Any]:
        return {"candidate": {"directory": self.candidate_dir, "revision": self.candidate_revision},
                "since": self.since.isoformat(), "decisions": self.decisions, "replayed": self.replayed,
                "unchanged": self.unchanged, "changed": self.changed, "without_request": self.without_request,
                "not_mapped": self.not_mapped, "changes": [c.as_dict() for c in self.changes]}


def replay(store: SAEngine, candidate: Engine, since: datetime, *, batch_size: int = BATCH_SIZE,
           examples: int = EXAMPLES) -> ReplayReport:
    """Re-decide every call recorded at or after `since` against `candidate`'s policies."""
    snapshot = candidate.snapshot  # one revision for the whole replay
    report = ReplayReport(str(candidate.policy_dir), snapshot.bundle.revision, since)
    tally: dict[tuple[str, tuple[str, ...], str, tuple[str, ...]], Change] = {}
    for row in _rows(store, since, batch_size):
        report.decisions += 1
        if row.cedar_request is None:
            if row.action:
                report.without_request += 1
            else:
                report.not_mapped += 1
            continue
        request = stored_request(row.cedar_request)
        judged = judge(candidate, request, snapshot)
        report.replayed += 1
        if judged.outcome.value == row.decision:
            report.unchanged += 1
            continue
        before = tuple(recorded_policies(row.determining_policies))
        after = tuple(p.policy_id for p in judged.determining)
        key = (row.decision, before, judged.outcome.value, after)
        change = tally.get(key)
        if change is None:
            change = tally[key] = Change(row.decision, judged.outcome.value, before, after)
        change.count += 1
        if len(change.examples) < examples:
            change.examples.append(Example(row.decision_id, row.at, row.agent, row.method,
                                           _url(row, request.context), row.action))
    report.changes = sorted(tally.values(), key=lambda c: (-c.count, c.recorded, c.candidate))
    return report


def _rows(store: SAEngine, since: datetime, batch_size: int) -> Iterator[Any]:
    """The window's rows in batches of `batch_size`, keyed on the row id (no offset to rescan)."""
    with store.connect() as conn:
        columns = {c["name"] for c in inspect(conn).get_columns("decisions")}
        if "cedar_request" not in columns:
            raise ReplayError("this store's decisions keep no Cedar requests yet (its schema predates them): "
                              "run `cedargate db upgrade`, or start cedargate on it, and replay the calls "
                              "recorded after that")
        # The window's first row through the time index; from there the batches walk the primary key,
        # each starting where the last ended, so no row before the window is read and none twice.
        first = conn.execute(select(func.min(_decisions.c.id)).where(_decisions.c.at >= since)).scalar()
        if first is None:
            return
        after = first - 1
        while True:
            query = (select(*(_decisions.c[name] for name in _COLUMNS))
                     .where(_decisions.c.at >= since, _decisions.c.id > after)
                     .order_by(_decisions.c.id).limit(batch_size))
            batch = conn.execute(query).all()
            conn.rollback()  # no snapshot held open between batches (PostgreSQL), nor a read lock (SQLite)
            yield from batch
            if len(batch) < batch_size:
                return
            after = batch[-1].id


def stored_request(text: str) -> CedarRequest:
    """The Cedar request a decision row keeps (`decisions.cedar_request`), as the engine takes it."""
    stored = json.loads(text)
    return CedarRequest(_uid(stored["principal"]), _uid(stored["action"]), _uid(stored["resource"]),
                        stored["context"])


def recorded_policies(text: str) -> list[str]:
    """The @ids a decision row names as determining (`decisions.determining_policies`); [] if unreadable."""
    try:
        ids = json.loads(text)
    except ValueError:
        return []
    return [str(i) for i in ids] if isinstance(ids, list) else []


def _uid(value: Any) -> tuple[str, str]:
    return (str(value["type"]), str(value["id"]))


def _url(row: Any, context: dict[str, Any]) -> str:
    default = {"http": 80, "https": 443}.get(row.scheme)
    netloc = row.host if row.port == default else f"{row.host}:{row.port}"
    query = context.get("query")  # redacted when it was stored
    return f"{row.scheme}://{netloc}{row.path}" + (f"?{query}" if isinstance(query, str) and query else "")
