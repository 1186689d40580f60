"""What a reviewer reads of an override request at a glance: its summary, as plain data.

A list of requests where every MCP call reads `POST http://.../mcp` makes a reviewer open each one to
tell a refund of 120 from one of 900, and a reviewer who must re-derive the decision rubber-stamps.
So each request carries, worked out here from what its row already holds: the MCP tool (`tool`); a
few of its arguments as short text (`key_arguments`: the manifest route's typed fields, or the tool's
arguments as sent; at most `MAX_ARGUMENTS`, each cut to `MAX_TEXT` characters and made printable,
since the agent chooses them); how bad and how final the call is (`severity`, `reversible`: the
determining policies' `@severity` / `@reversible` annotations, else the manifest's classification of
the route or tool); the seconds left to decide; the votes so far; and who is still needed
(`roles_needed`, `approvals_needed`, from the requirements and the approvals cast).

Only plain values in and out: no database, no HTTP. May import `proxy.calls`, `proxy.cedar`,
`proxy.vocabulary` and `proxy.oversight.overrides`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from proxy.calls.mcp.binding import tool_call
from proxy.cedar.context import RESERVED
from proxy.cedar.escalation import SEVERITIES, Requirement
from proxy.oversight.overrides import UNDECIDED, Ballot, Override, Vote, aware, elapsed, requirements_of
from proxy.vocabulary.printable import printable

MAX_ARGUMENTS = 6  # key arguments shown per request: a row is read at a glance
MAX_TEXT = 60  # characters of each key argument's value (and name) shown; the request has it whole
# Context attributes of an MCP message that describe the message, not what the tool is asked to do.
_MCP_ATTRIBUTES = frozenset({"server", "rpc_kind", "rpc_method", "tool", "arguments", "hints"})


@dataclass(frozen=True)
class Summary:
    tool: str | None
    key_arguments: dict[str, str]
    severity: str | None
    reversible: bool | None
    seconds_left: int | None
    votes: list[dict[str, Any]] = field(default_factory=list)
    roles_needed: list[str] = field(default_factory=list)
    approvals_needed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"tool": self.tool, "key_arguments": self.key_arguments, "severity": self.severity,
                "reversible": self.reversible, "seconds_left": self.seconds_left, "votes": self.votes,
                "roles_needed": self.roles_needed, "approvals_needed": self.approvals_needed}


def summarize(override: Override, votes: Sequence[Vote], now: datetime) -> Summary:
    """The summary of `override` at `now`, given the votes cast on it (oldest first)."""
    cedar_request = _loads(override.cedar_request, {})
    context = cedar_request.get("context") if isinstance(cedar_request.get("context"), dict) else {}
    policies = _loads(override.policies, [])
    tool = tool_call(cedar_request, override.body)
    undecided = override.status in {status.value for status in UNDECIDED}
    roles, approvals = (still_needed(requirements_of(override), approvals_of(votes), elapsed(override, now))
                        if undecided else ([], 0))
    return Summary(
        tool=None if tool is None else printable(str(tool["name"])),
        key_arguments=key_arguments(tool["arguments"] if tool is not None else route_fields(context)),
        severity=severity_of(policies, context),
        reversible=reversible_of(policies, context),
        seconds_left=max(0, math.ceil((aware(override.expires_at) - now).total_seconds())) if undecided else None,
        votes=[{"approver": v.approver, "roles": sorted(v.roles), "verdict": v.verdict, "reason": v.reason,
                "at": v.at} for v in votes],
        roles_needed=roles, approvals_needed=approvals,
    )


def key_arguments(values: Any, limit: int = MAX_ARGUMENTS, width: int = MAX_TEXT) -> dict[str, str]:
    """The first `limit` of `values` (a mapping of name to JSON or Cedar value) as short, printable text."""
    if not isinstance(values, Mapping):
        return {}
    shown: dict[str, str] = {}
    for name, value in values.items():
        if len(shown) == limit:
            break
        shown[_cut(printable(str(name)), width)] = _cut(printable(short_text(value)), width)
    return shown


def short_text(value: Any) -> str:
    """One value as a reviewer reads it: a Cedar decimal as its number, an entity as `Type::"id"`,
    text as itself, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        extension = value.get("__extn")
        if isinstance(extension, Mapping) and "arg" in extension:
            return str(extension["arg"])
        entity = value.get("__entity")
        if isinstance(entity, Mapping):
            return f'{entity.get("type")}::"{entity.get("id")}"'
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def severity_of(policies: Iterable[Any], context: Mapping[str, Any]) -> str | None:
    """The gravest `@severity` among the determining policies; else the manifest's classification of the
    route or tool; None when neither says (an MCP tool the manifest does not list is "unclassified")."""
    stated = [str(a["severity"]) for a in _annotations(policies) if a.get("severity") in SEVERITIES]
    if stated:
        return max(stated, key=SEVERITIES.index)
    classified = context.get("severity")
    return str(classified) if classified in SEVERITIES else None


def reversible_of(policies: Iterable[Any], context: Mapping[str, Any]) -> bool | None:
    """False when any determining policy says `@reversible("false")`, True when those that say agree it
    is; else the manifest's classification (none for a tool it does not classify)."""
    stated = [a["reversible"] == "true" for a in _annotations(policies) if a.get("reversible") in ("true", "false")]
    if stated:
        return all(stated)
    if context.get("severity") in SEVERITIES and isinstance(context.get("reversible"), bool):
        return bool(context["reversible"])
    return None


def approvals_of(votes: Iterable[Vote]) -> dict[str, frozenset[str]]:
    """Each approver who voted to approve, with the roles they held then (as the quorum rule reads them)."""
    return {v.approver: v.roles for v in votes if v.verdict == Ballot.APPROVE.value}


def still_needed(requirements: Iterable[Requirement], approvals: Mapping[str, frozenset[str]],
                 elapsed: float = 0.0) -> tuple[list[str], int]:
    """The roles whose holder's approval would still count, and the fewest approvals still needed,
    `elapsed` seconds after the request was opened (its chain's tiers reached by then count too).

    Per requirement not yet met: the roles whose new approver would cover one more of its roles with
    distinct people (or, when every role is covered but too few approvers are, any of its roles), the
    roles of its reached later tiers (whose approver may fill any slot), and the approvals it lacks.
    Across requirements the count is the largest of theirs: one approver holding roles of two policies
    can count for both, so more may be needed, never fewer.
    """
    roles: set[str] = set()
    count = 0
    for requirement in requirements:
        if requirement.satisfied_by(approvals, elapsed):
            continue
        wanted = set(requirement.roles)
        eligible = requirement.eligible(approvals, elapsed)
        covered = len(_matched_roles(requirement.roles, eligible))
        # A fresh approver (the empty name is no approver's) holding only `role`.
        helpful = [role for role in requirement.roles
                   if len(_matched_roles(requirement.roles, {**eligible, "": frozenset({role})})) > covered]
        roles.update(helpful or requirement.roles)
        roles.update(requirement.stand_ins(elapsed))
        count = max(count, len(wanted) - covered, requirement.count - len(eligible))
    return sorted(roles), count


def _matched_roles(roles: Sequence[str], eligible: Mapping[str, frozenset[str]]) -> set[str]:
    """The roles covered by a largest matching of roles to distinct approvers (augmenting paths)."""
    holder: dict[str, str] = {}  # approver -> the role they cover

    def place(role: str, seen: set[str]) -> bool:
        for approver, held in eligible.items():
            if role in held and approver not in seen:
                seen.add(approver)
                if approver not in holder or place(holder[approver], seen):
                    holder[approver] = role
                    return True
        return False

    for role in dict.fromkeys(roles):
        place(role, set())
    return set(holder.values())


def arguments_of(override: Override) -> Any:
    """What the request asks done, by name: an MCP tool's arguments as sent, else the route's fields."""
    cedar_request = _loads(override.cedar_request, {})
    tool = tool_call(cedar_request, override.body)
    if tool is not None:
        return tool["arguments"]
    context = cedar_request.get("context")
    return route_fields(context if isinstance(context, Mapping) else {})


def route_fields(context: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest route's typed fields (or an MCP message's resource or prompt): the context attributes
    every call has set aside."""
    return {k: v for k, v in context.items() if k not in RESERVED and k not in _MCP_ATTRIBUTES}


def _annotations(policies: Iterable[Any]) -> list[Mapping[str, Any]]:
    return [p["annotations"] for p in policies
            if isinstance(p, Mapping) and isinstance(p.get("annotations"), Mapping)]


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _loads(text: str, default: Any) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return default
