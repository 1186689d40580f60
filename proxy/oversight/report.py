"""`cedargate report`: how the human checks went over a window, read from the store, and the checks that
look like rubber stamps.

Per escalating policy: how many calls it sent to a human (its escalation rate: of every call decided in
the window, the share it escalated), and what became of its requests: approved (granted, whether or not
the grant was used), approved with changes, denied, expired, still open; the approval rate (approved of
decided), the change rate (changed of approved), and the review latency (opening to decision) at p50 and
p95. Per reviewer: their votes, approval rate, change rate, latency (opening to their vote), and the
requests that expired while their roles could have decided them.

A check humans approve as sent nearly always is latency, not safety. A policy is a rubber-stamp candidate
when at least `min_requests` of its requests were decided and at least `threshold` of them were approved
without changes; the report gives each one the narrowed forbid that would stop asking for the approved
(principal, action, resource) combinations (`proxy.cedar.narrowing`), validated against the live schema,
for an operator to review, with how many denied requests it would have let through too. A reviewer who
cast at least `min_requests` votes and approved at least `threshold` of them is flagged. Requests and
votes count when they happened in the window: requests by their opening, votes by their casting.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Engine as SAEngine
from sqlmodel import Session, col, func, select

from proxy.cedar.narrowing import Combination, NarrowingError, entity, exempts, narrowed_forbid
from proxy.cedar.policy import PolicyBundle
from proxy.oversight.overrides import Override, OverrideStatus, OverrideVote, aware, needed_roles
from proxy.record.store import DecisionRecord

DEFAULT_THRESHOLD = 0.99
DEFAULT_MIN_REQUESTS = 500
# A grant happened, whether or not the call then went (released), was refused at release, or never came.
APPROVED = frozenset({OverrideStatus.GRANTED.value, OverrideStatus.RELEASED.value,
                      OverrideStatus.RELEASE_REFUSED.value, OverrideStatus.GRANT_EXPIRED.value})
DENIED = OverrideStatus.DENIED.value
EXPIRED = OverrideStatus.EXPIRED.value


@dataclass
class PolicyFigures:
    policy: str
    escalations: int = 0  # calls it escalated in the window
    escalation_rate: float | None = None  # of every call decided in the window
    requests: int = 0
    approved: int = 0
    approved_with_changes: int = 0
    denied: int = 0
    expired: int = 0
    open: int = 0
    approval_rate: float | None = None  # approved / (approved + denied)
    change_rate: float | None = None  # approved with changes / approved
    unchanged_approval_rate: float | None = None  # approved as sent / (approved + denied)
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None


@dataclass
class ReviewerFigures:
    reviewer: str
    votes: int = 0
    approvals: int = 0
    approvals_with_changes: int = 0
    denials: int = 0
    approval_rate: float | None = None
    change_rate: float | None = None
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    expiries: int = 0  # requests that expired while this reviewer's roles could have decided them
    roles: list[str] = field(default_factory=list)
    flagged: bool = False


@dataclass
class Candidate:
    policy: str
    decided: int
    approved_unchanged: int
    rate: float
    file: str | None = None
    suggestion: str | None = None  # the narrowed forbid, validated against the schema
    exact: bool = False  # it exempts exactly the approved combinations
    unconstrained: list[str] = field(default_factory=list)  # dimensions it leaves open (too many values)
    denied_exempted: int = 0  # denied requests it would have let through without asking
    why_no_suggestion: str | None = None


@dataclass
class Report:
    since: datetime
    until: datetime
    threshold: float
    min_requests: int
    decisions: int
    escalations: int
    escalation_rate: float | None
    requests: int
    policies: list[PolicyFigures]
    reviewers: list[ReviewerFigures]
    candidates: list[Candidate]
    policy_revision: str | None = None

    @property
    def flagged_reviewers(self) -> list[str]:
        return [r.reviewer for r in self.reviewers if r.flagged]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["since"], data["until"] = self.since.isoformat(), self.until.isoformat()
        data["flagged_reviewers"] = self.flagged_reviewers
        return data


def parse_threshold(text: str) -> float:
    """`99%`, `99.5%` or `0.99` as a share in (0, 1]; raises ValueError saying what to write."""
    raw = text.strip()
    try:
        share = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ValueError(f"threshold {text!r} is not a share: write 99% or 0.99") from None
    if not 0 < share <= 1:
        raise ValueError(f"threshold {text!r} is outside (0, 1]: write a percentage up to 100% or a share up to 1")
    return share


def build_report(engine: SAEngine, since: datetime, until: datetime, *, threshold: float = DEFAULT_THRESHOLD,
                 min_requests: int = DEFAULT_MIN_REQUESTS, bundle: PolicyBundle | None = None,
                 approver_roles: Mapping[str, frozenset[str]] | None = None) -> Report:
    """The report over [since, until] from the store behind `engine`. `bundle` (the live policies) is what
    suggestions are made from (none without it); `approver_roles` adds the configured approvers, so one who
    never voted is listed with the expiries their roles let pass."""
    if not 0 < threshold <= 1:
        raise ValueError(f"the threshold is a share between 0 and 1 (or a percentage), not {threshold}")
    if min_requests < 1:
        raise ValueError(f"the minimum number of requests is at least 1, not {min_requests}")
    with Session(engine) as session:
        decided_calls = session.exec(
            select(DecisionRecord.determining_policies, DecisionRecord.decision, func.count())
            .where(col(DecisionRecord.at) >= since, col(DecisionRecord.at) <= until)
            .group_by(DecisionRecord.determining_policies, DecisionRecord.decision)).all()
        requests = session.exec(select(Override).where(col(Override.created_at) >= since,
                                                       col(Override.created_at) <= until)).all()
        votes = session.exec(
            select(OverrideVote, Override).join(Override, col(Override.id) == col(OverrideVote.override_id))
            .where(col(OverrideVote.at) >= since, col(OverrideVote.at) <= until)).all()
    total = sum(count for _, _, count in decided_calls)
    escalated: dict[str, int] = defaultdict(int)
    for determining, outcome, count in decided_calls:
        if outcome == "escalate":
            for policy in json.loads(determining or "[]"):
                escalated[policy] += count
    policies = _policies(requests, escalated, total)
    reviewers = _reviewers(votes, requests, approver_roles or {}, threshold, min_requests)
    candidates = [_candidate(figures, requests, bundle, since, threshold, min_requests) for figures in policies
                  if figures.approved + figures.denied >= min_requests
                  and (figures.unchanged_approval_rate or 0) >= threshold]
    escalations = sum(count for _, outcome, count in decided_calls if outcome == "escalate")
    return Report(since, until, threshold, min_requests, total, escalations, _rate(escalations, total),
                  len(requests), policies, reviewers, candidates,
                  policy_revision=bundle.revision if bundle is not None else None)


def _policies(requests: Sequence[Override], escalated: Mapping[str, int], total: int) -> list[PolicyFigures]:
    figures: dict[str, PolicyFigures] = {}
    waits: dict[str, list[float]] = defaultdict(list)
    for policy, count in escalated.items():
        figures[policy] = PolicyFigures(policy, escalations=count)
    for request in requests:
        for policy in _policy_ids(request):
            one = figures.setdefault(policy, PolicyFigures(policy))
            one.requests += 1
            if request.status in APPROVED:
                one.approved += 1
                one.approved_with_changes += request.changes is not None
            elif request.status == DENIED:
                one.denied += 1
            elif request.status == EXPIRED:
                one.expired += 1
            else:
                one.open += 1
            if request.decided_at is not None and request.status in APPROVED | {DENIED}:
                waits[policy].append(_seconds(request.created_at, request.decided_at))
    for policy, one in figures.items():
        decided = one.approved + one.denied
        one.escalation_rate = _rate(one.escalations, total)
        one.approval_rate = _rate(one.approved, decided)
        one.change_rate = _rate(one.approved_with_changes, one.approved)
        one.unchanged_approval_rate = _rate(one.approved - one.approved_with_changes, decided)
        one.latency_p50_s, one.latency_p95_s = percentile(waits[policy], 0.50), percentile(waits[policy], 0.95)
    return sorted(figures.values(), key=lambda f: (-f.requests, -f.escalations, f.policy))


def _reviewers(votes: Sequence[tuple[OverrideVote, Override]], requests: Sequence[Override],
               approver_roles: Mapping[str, frozenset[str]], threshold: float,
               min_requests: int) -> list[ReviewerFigures]:
    figures: dict[str, ReviewerFigures] = {}
    roles: dict[str, set[str]] = defaultdict(set)
    waits: dict[str, list[float]] = defaultdict(list)
    for name, held in approver_roles.items():
        figures[name] = ReviewerFigures(name)
        roles[name] |= held
    for vote, request in votes:
        one = figures.setdefault(vote.approver, ReviewerFigures(vote.approver))
        roles[vote.approver] |= set(json.loads(vote.roles or "[]"))
        one.votes += 1
        if vote.verdict == "approve":
            one.approvals += 1
            one.approvals_with_changes += request.changes is not None
        else:
            one.denials += 1
        waits[vote.approver].append(_seconds(request.created_at, vote.at))
    expired = [r for r in requests if r.status == EXPIRED]
    for name, one in figures.items():
        one.roles = sorted(roles[name])
        one.approval_rate = _rate(one.approvals, one.votes)
        one.change_rate = _rate(one.approvals_with_changes, one.approvals)
        one.latency_p50_s, one.latency_p95_s = percentile(waits[name], 0.50), percentile(waits[name], 0.95)
        one.expiries = sum(1 for r in expired if needed_roles(r) & roles[name])
        one.flagged = one.votes >= min_requests and (one.approval_rate or 0) >= threshold
    return sorted(figures.values(), key=lambda f: (-f.votes, f.reviewer))


def _candidate(figures: PolicyFigures, requests: Sequence[Override], bundle: PolicyBundle | None,
               since: datetime, threshold: float, min_requests: int) -> Candidate:
    decided = figures.approved + figures.denied
    unchanged = figures.approved - figures.approved_with_changes
    candidate = Candidate(figures.policy, decided, unchanged, unchanged / decided)
    if bundle is None:
        candidate.why_no_suggestion = "no policy directory was given to read the policy from"
        return candidate
    mine = [r for r in requests if figures.policy in _policy_ids(r)]
    try:
        approved = [_combination(r) for r in mine if r.status in APPROVED and r.changes is None]
        denied = [_combination(r) for r in mine if r.status == DENIED]
        note = (f"cedargate report: {unchanged} of {decided} decided requests of \"{figures.policy}\" approved "
                f"without changes\nsince {since:%Y-%m-%d %H:%M} UTC (threshold {threshold:.0%}, at least "
                f"{min_requests}).\nReview before replacing the policy; it no longer asks about these calls.")
        narrowed = narrowed_forbid(bundle, figures.policy, approved, note=note)
    except NarrowingError as exc:
        candidate.why_no_suggestion = str(exc)
        return candidate
    candidate.file, candidate.suggestion = narrowed.file, narrowed.text
    candidate.exact, candidate.unconstrained = narrowed.exact, list(narrowed.unconstrained)
    candidate.denied_exempted = sum(exempts(narrowed, denied))
    return candidate


def _combination(request: Override) -> Combination:
    cedar = json.loads(request.cedar_request or "{}")
    return entity(str(cedar.get("principal") or "")), entity(request.action), entity(request.resource)


def _policy_ids(request: Override) -> list[str]:
    return [p["id"] for p in json.loads(request.policies or "[]") if isinstance(p, dict) and "id" in p]


def _seconds(start: datetime, end: datetime) -> float:
    return max(0.0, (aware(end) - aware(start)).total_seconds())


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def percentile(values: Iterable[float], share: float) -> float | None:
    """The nearest-rank percentile (a value that occurred), None of nothing."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]
