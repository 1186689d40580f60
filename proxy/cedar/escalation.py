"""Which denials may become override requests, and when a set of approvals satisfies one.

A `forbid` annotated `@escalate("role")` is escalatable to approvers holding that role;
`@escalate("security, lead-engineer")` needs one distinct approver from each listed role (the
two-person rule across roles); `@approvals("2")` needs that many distinct approvers; `@expires("15m")`
sets how long the request may stay pending. `@severity("low|medium|high|critical")` and
`@reversible("true|false")` tell a reviewer how bad and how final the call is (shown with the request).

An escalation chain: `@escalate` names the first tier; `@escalate_after("10m: secondary-on-call; 30m:
engineering-manager")` adds tiers, each reached that long after the request was opened (strictly
increasing, and before `@expires`, which a chain must set: the expiry is its last step, a rejection);
`@remind("5m")` reminds the current tier that often while it has not decided. A reached tier's approvers
may decide alongside the earlier tiers': each may fill any one of the policy's role slots, so the number
of distinct approvers it needs never changes (`Requirement.satisfied_by`, `quorum_met`), and a tier
not reached yet counts for nothing.

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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # policy.py checks annotations with this module at load time
    from proxy.cedar.policy import PolicyInfo

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# A policy's `@severity`, least to most grave (the manifest's classification uses the same words).
SEVERITIES = ("low", "medium", "high", "critical")


class AnnotationError(ValueError):
    """An escalation annotation is malformed; the message names the policy (`policy_id`, for the loader
    to add its file and line)."""

    def __init__(self, message: str, policy_id: str | None = None) -> None:
        super().__init__(message)
        self.policy_id = policy_id


@dataclass(frozen=True)
class Tier:
    """One step of an escalation chain: `roles` may decide from `after` seconds after the request opened."""

    after: int
    roles: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        return {"after": self.after, "roles": list(self.roles)}


@dataclass(frozen=True)
class Requirement:
    """One policy's demand: distinct approvers covering every role in `roles`, at least `count` of them."""

    policy_id: str
    roles: tuple[str, ...]
    count: int
    # The policy's later tiers (`@escalate_after`), soonest first; the first tier is `roles`.
    tiers: tuple[Tier, ...] = ()

    def stand_ins(self, elapsed: float) -> frozenset[str]:
        """The roles of the later tiers reached `elapsed` seconds after the request was opened."""
        return frozenset(role for tier in self.tiers if tier.after <= elapsed for role in tier.roles)

    def eligible(self, approvers: Mapping[str, frozenset[str]], elapsed: float = 0.0) -> dict[str, frozenset[str]]:
        """Each approver who counts for this policy, with the role slots they may fill: the policy's roles
        they hold, or every slot when they hold a role of a tier reached by `elapsed`."""
        wanted, reached = frozenset(self.roles), self.stand_ins(elapsed)
        found = {}
        for approver, held in approvers.items():
            slots = wanted if held & reached else held & wanted
            if slots:
                found[approver] = slots
        return found

    def satisfied_by(self, approvers: Mapping[str, frozenset[str]], elapsed: float = 0.0) -> bool:
        """`approvers` maps each distinct approver to the roles they hold; `elapsed`, seconds since the
        request was opened, says which later tiers have been reached."""
        eligible = self.eligible(approvers, elapsed)
        return len(eligible) >= self.count and _covers(list(self.roles), eligible, set())

    def as_dict(self) -> dict[str, object]:
        shown: dict[str, object] = {"policy_id": self.policy_id, "roles": list(self.roles), "approvals": self.count}
        if self.tiers:
            shown["escalate_after"] = [tier.as_dict() for tier in self.tiers]
        return shown

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any]) -> Requirement:
        """The requirement as `as_dict` stored it (a request's row)."""
        tiers = tuple(Tier(int(t["after"]), tuple(t["roles"])) for t in stored.get("escalate_after") or ())
        return cls(stored["policy_id"], tuple(stored["roles"]), int(stored["approvals"]), tiers)


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


def span_text(seconds: int) -> str:
    """A whole number of seconds as the annotations write it: 90s, 10m, 2h, 1d (the largest exact unit)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


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
        raise _error(policy, "@escalate needs at least one role name")
    raw = policy.annotations.get("approvals", "1")
    if not re.fullmatch(r"[0-9]+", raw) or int(raw) < 1:
        raise _error(policy, f'@approvals("{raw}") must be a whole number >= 1')
    return Requirement(policy.policy_id, roles, max(int(raw), len(roles)), tiers_of(policy, roles))


def tiers_of(policy: PolicyInfo, first: tuple[str, ...]) -> tuple[Tier, ...]:
    """The later tiers of `@escalate_after("10m: secondary-on-call; 30m: engineering-manager, cto")`:
    each `DELAY: role[, role...]`, separated by `;`, the delay counted from when the request was opened."""
    spec = policy.annotations.get("escalate_after")
    if spec is None:
        return ()
    quoted = f'@escalate_after("{spec}")'
    tiers: list[Tier] = []
    seen = {role: 1 for role in first}
    for number, part in enumerate((p for p in spec.split(";") if p.strip()), start=2):
        delay, colon, listed = part.partition(":")
        if not colon:
            raise _error(policy, f'{quoted}: tier {number} "{part.strip()}" must be written DELAY: ROLE[, ROLE], '
                                 'e.g. "10m: secondary-on-call"')
        try:
            after = parse_duration(delay)
        except ValueError as exc:
            raise _error(policy, f"{quoted}: tier {number}: {exc}") from None
        roles = tuple(r.strip() for r in listed.split(",") if r.strip())
        if not roles:
            raise _error(policy, f"{quoted}: tier {number} (after {span_text(after)}) names no role")
        if after <= (tiers[-1].after if tiers else 0):
            earlier = f"tier {number - 1}'s {span_text(tiers[-1].after)}" if tiers else "the opening"
            raise _error(policy, f"{quoted}: tier {number}'s delay {span_text(after)} must come after {earlier}; "
                                 "delays count from when the request was opened and must increase")
        for role in roles:
            if role in seen:
                raise _error(policy, f'{quoted}: role "{role}" is already in tier {seen[role]}; a role is reached once')
            seen[role] = number
        tiers.append(Tier(after, roles))
    if not tiers:
        raise _error(policy, f"{quoted} names no tier; write e.g. \"10m: secondary-on-call\"")
    return tuple(tiers)


def remind_of(policy: PolicyInfo) -> int | None:
    """`@remind("5m")`: how often the current tier is reminded while undecided; None when not set."""
    raw = policy.annotations.get("remind")
    if raw is None:
        return None
    try:
        every = parse_duration(raw)
    except ValueError as exc:
        raise _error(policy, f"@remind: {exc}") from None
    if every < 1:
        raise _error(policy, f'@remind("{raw}") must be at least 1s')
    return every


def _error(policy: PolicyInfo, message: str) -> AnnotationError:
    return AnnotationError(f'policy "{policy.policy_id}": {message}', policy.policy_id)


def check_annotations(policies: Iterable[PolicyInfo]) -> None:
    """Validate escalation and review annotations at load time, so a typo refuses the set instead of a
    call (or shows reviewers a wrong severity)."""
    for policy in policies:
        if "escalate" in policy.annotations and policy.effect != "forbid":
            raise _error(policy, "@escalate only makes sense on a forbid")
        for chained in ("escalate_after", "remind"):
            if chained in policy.annotations and "escalate" not in policy.annotations:
                raise _error(policy, f'@{chained} needs @escalate("role"), the chain\'s first tier')
        requirement = requirement_of(policy)
        expires = None
        if "expires" in policy.annotations:
            try:
                expires = parse_duration(policy.annotations["expires"])
            except ValueError as exc:
                raise _error(policy, f"@expires: {exc}") from exc
        remind = remind_of(policy)
        if requirement is not None and requirement.tiers:
            last = requirement.tiers[-1]
            if expires is None:
                raise _error(policy, '@escalate_after needs @expires("...") after its last tier: the expiry '
                                     "is the chain's last step, when the request is rejected")
            if last.after >= expires:
                raise _error(policy, f"@escalate_after: tier {len(requirement.tiers) + 1} at {span_text(last.after)} "
                                     f'is not before @expires("{policy.annotations["expires"]}"); it would never '
                                     "be reached")
        if remind is not None and expires is not None and remind >= expires:
            raise _error(policy, f'@remind("{policy.annotations["remind"]}") is not shorter than @expires('
                                 f'"{policy.annotations["expires"]}"); no reminder would be sent')
        severity = policy.annotations.get("severity")
        if severity is not None and severity not in SEVERITIES:
            raise _error(policy, f'@severity("{severity}") must be one of {", ".join(SEVERITIES)}')
        reversible = policy.annotations.get("reversible")
        if reversible is not None and reversible not in ("true", "false"):
            raise _error(policy, f'@reversible("{reversible}") must be "true" or "false"')


@dataclass(frozen=True)
class Escalation:
    requirements: tuple[Requirement, ...]
    expires_in: int
    remind_every: int | None = None  # seconds between reminders of the current tier (`@remind`)

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(r for req in self.requirements for r in req.roles)

    def satisfied_by(self, approvers: Mapping[str, frozenset[str]], elapsed: float = 0.0) -> bool:
        return quorum_met(self.requirements, approvers, elapsed)

    @property
    def chain(self) -> Chain:
        return Chain.of(self.requirements, self.expires_in, self.remind_every)


def quorum_met(requirements: Iterable[Requirement], approvers: Mapping[str, frozenset[str]],
               elapsed: float = 0.0) -> bool:
    """The quorum rule, the one place it is written: every policy's demand is met by `approvers`
    (each distinct approver mapped to the roles they hold), `elapsed` seconds after the request was
    opened. A policy's demand: distinct approvers covering each of its roles, at least its count of
    them; an approver holding a role of one of its tiers reached by then may fill any one of its roles."""
    return all(req.satisfied_by(approvers, elapsed) for req in requirements)


@dataclass(frozen=True)
class Chain:
    """A request's escalation chain, every policy's tiers merged on one clock: tier 1 (after 0) holds
    the roles of every policy's `@escalate`; each later tier the roles that several policies' chains
    reach at one delay. The expiry (`expires_in`) ends it; `remind_every` reminds the current tier."""

    tiers: tuple[Tier, ...]
    expires_in: int
    remind_every: int | None = None

    @classmethod
    def of(cls, requirements: Iterable[Requirement], expires_in: int, remind_every: int | None = None) -> Chain:
        requirements = tuple(requirements)
        first = tuple(dict.fromkeys(role for r in requirements for role in r.roles))
        later: dict[int, dict[str, None]] = {}
        for requirement in requirements:
            for tier in requirement.tiers:
                if tier.after < expires_in:  # a tier past a stricter policy's expiry is never reached
                    later.setdefault(tier.after, {}).update(dict.fromkeys(tier.roles))
        tiers = (Tier(0, first), *(Tier(after, tuple(roles)) for after, roles in sorted(later.items())))
        return cls(tiers, expires_in, remind_every)

    def reached(self, elapsed: float) -> int:
        """The current tier's number (1-based) `elapsed` seconds after the request was opened."""
        return sum(1 for tier in self.tiers if tier.after <= elapsed)

    def roles_reached(self, elapsed: float) -> frozenset[str]:
        return frozenset(role for tier in self.tiers[: self.reached(elapsed)] for role in tier.roles)

    def deadline(self, number: int) -> int:
        """When tier `number` ends (seconds after the opening): the next tier, or the expiry."""
        return self.tiers[number].after if number < len(self.tiers) else self.expires_in

    def reminders_due(self, number: int, elapsed: float) -> int:
        """How many reminders tier `number` should have had by `elapsed`: one each `remind_every` after
        it began, while it is the current tier."""
        if not self.remind_every:
            return 0
        start, end = self.tiers[number - 1].after, self.deadline(number)
        last = min(elapsed, end - 1e-9) - start  # a reminder falling on the tier's end is the next step instead
        return max(0, int(last // self.remind_every))

    def next_step(self, number: int, reminders: int) -> int | None:
        """When the next step after tier `number` with `reminders` sent falls (seconds after the opening):
        its next reminder or the next tier; None when only the expiry is left."""
        end = self.deadline(number)
        candidates = [end] if number < len(self.tiers) else []
        if self.remind_every:
            reminder = self.tiers[number - 1].after + (reminders + 1) * self.remind_every
            if reminder < end:
                candidates.append(reminder)
        return min(candidates) if candidates else None

    def as_dict(self) -> dict[str, object]:
        return {"tiers": [tier.as_dict() for tier in self.tiers], "expires_in": self.expires_in,
                "remind_every": self.remind_every}

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any]) -> Chain:
        return cls(tuple(Tier(int(t["after"]), tuple(t["roles"])) for t in stored["tiers"]),
                   int(stored["expires_in"]), stored.get("remind_every"))


def escalation_of(determining: Iterable[PolicyInfo], default_expiry: int) -> Escalation | None:
    """What granting a denial needs, or None when a determining forbid is not escalatable (a hard deny).

    Only half the rule: the caller must also find the call allowed with these forbids lifted.
    """
    forbids = [p for p in determining if p.effect == "forbid"]
    requirements = [requirement_of(p) for p in forbids]
    if not forbids or any(r is None for r in requirements):
        return None
    expiries = [parse_duration(p.annotations["expires"]) for p in forbids if "expires" in p.annotations]
    reminders = [every for p in forbids if (every := remind_of(p)) is not None]
    # The strictest policy wins: the shortest expiry among the policies that set one, the most frequent
    # reminder.
    return Escalation(tuple(r for r in requirements if r), min(expiries) if expiries else default_expiry,
                      min(reminders) if reminders else None)
