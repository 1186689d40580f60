"""Which denials may become override requests, and when a set of approvals satisfies one.

A `forbid` annotated `@escalate("role")` is escalatable to approvers holding that role;
`@escalate("security, lead-engineer")` needs one distinct approver from each listed role (the
two-person rule across roles); `@approvals("2")` needs that many distinct approvers; `@expires("15m")`
sets how long the request may stay pending. `@severity("low|medium|high|critical")` and
`@reversible("true|false")` tell a reviewer how bad and how final the call is (shown with the request).

A denial escalates only if every determining forbid is escalatable *and* the call would be allowed
were the escalatable forbids lifted: a permit matches, no other forbid does, nothing errors. A grant
lifts a forbid; it never stands in for a missing permit, or an agent could make a call no policy allows
grantable by tripping an escalatable forbid on purpose (say, by reporting low confidence). The engine
answers the second half (`Engine.evaluate(..., lifted=True)`); an escalation needs every determining
forbid's approvals at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # policy.py checks annotations with this module at load time
    from proxy.cedar.policy import PolicyInfo

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# A policy's `@severity`, least to most grave (the manifest's classification uses the same words).
SEVERITIES = ("low", "medium", "high", "critical")


class AnnotationError(ValueError):
    """An escalation annotation is malformed; the message names the policy."""


@dataclass(frozen=True)
class Requirement:
    """One policy's demand: distinct approvers covering every role in `roles`, at least `count` of them."""

    policy_id: str
    roles: tuple[str, ...]
    count: int

    def satisfied_by(self, approvers: Mapping[str, frozenset[str]]) -> bool:
        """`approvers` maps each distinct approver to the roles they hold."""
        eligible = {a: roles & set(self.roles) for a, roles in approvers.items() if roles & set(self.roles)}
        return len(eligible) >= self.count and _covers(list(self.roles), eligible, set())

    def as_dict(self) -> dict[str, object]:
        return {"policy_id": self.policy_id, "roles": list(self.roles), "approvals": self.count}


def _covers(roles: list[str], eligible: Mapping[str, AbstractSet[str]], used: set[str]) -> bool:
    # A matching of roles to distinct approvers; tiny sizes, so plain backtracking.
    if not roles:
        return True
    role, rest = roles[0], roles[1:]
    return any(
        _covers(rest, eligible, used | {approver})
        for approver, held in eligible.items()
        if approver not in used and role in held
    )


def parse_duration(text: str) -> int:
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 2h or 1d")
    return int(match.group(1)) * _UNITS[match.group(2)]


def is_escalatable(policy: PolicyInfo) -> bool:
    """Whether a grant may lift this policy: a forbid with @escalate."""
    return policy.effect == "forbid" and "escalate" in policy.annotations


def requirement_of(policy: PolicyInfo) -> Requirement | None:
    """The policy's escalation requirement, or None when it is not escalatable."""
    if not is_escalatable(policy):
        return None
    spec = policy.annotations["escalate"]
    roles = tuple(r.strip() for r in spec.split(",") if r.strip())
    if not roles:
        raise AnnotationError(f'policy "{policy.policy_id}": @escalate needs at least one role name')
    raw = policy.annotations.get("approvals", "1")
    if not re.fullmatch(r"[0-9]+", raw) or int(raw) < 1:
        raise AnnotationError(f'policy "{policy.policy_id}": @approvals("{raw}") must be a whole number >= 1')
    return Requirement(policy.policy_id, roles, max(int(raw), len(roles)))


def check_annotations(policies: Iterable[PolicyInfo]) -> None:
    """Validate escalation and review annotations at load time, so a typo refuses the set instead of a
    call (or shows reviewers a wrong severity)."""
    for policy in policies:
        if "escalate" in policy.annotations and policy.effect != "forbid":
            raise AnnotationError(f'policy "{policy.policy_id}": @escalate only makes sense on a forbid')
        requirement_of(policy)
        if "expires" in policy.annotations:
            try:
                parse_duration(policy.annotations["expires"])
            except ValueError as exc:
                raise AnnotationError(f'policy "{policy.policy_id}": @expires: {exc}') from exc
        severity = policy.annotations.get("severity")
        if severity is not None and severity not in SEVERITIES:
            raise AnnotationError(f'policy "{policy.policy_id}": @severity("{severity}") must be one of '
                                  f'{", ".join(SEVERITIES)}')
        reversible = policy.annotations.get("reversible")
        if reversible is not None and reversible not in ("true", "false"):
            raise AnnotationError(f'policy "{policy.policy_id}": @reversible("{reversible}") must be "true" '
                                  'or "false"')


@dataclass(frozen=True)
class Escalation:
    requirements: tuple[Requirement, ...]
    expires_in: int

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(r for req in self.requirements for r in req.roles)

    def satisfied_by(self, approvers: Mapping[str, frozenset[str]]) -> bool:
        return quorum_met(self.requirements, approvers)


def quorum_met(requirements: Iterable[Requirement], approvers: Mapping[str, frozenset[str]]) -> bool:
    """The quorum rule, the one place it is written: every policy's demand is met by `approvers`
    (each distinct approver mapped to the roles they hold)."""
    return all(req.satisfied_by(approvers) for req in requirements)


def escalation_of(determining: Iterable[PolicyInfo], default_expiry: int) -> Escalation | None:
    """What granting a denial needs, or None when a determining forbid is not escalatable (a hard deny).

    Only half the rule: the caller must also find the call allowed with these forbids lifted.
    """
    forbids = [p for p in determining if p.effect == "forbid"]
    requirements = [requirement_of(p) for p in forbids]
    if not forbids or any(r is None for r in requirements):
        return None
    expiries = [parse_duration(p.annotations["expires"]) for p in forbids if "expires" in p.annotations]
    # The strictest policy wins: the shortest expiry among the policies that set one.
    return Escalation(tuple(r for r in requirements if r), min(expiries) if expiries else default_expiry)
