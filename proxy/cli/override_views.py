"""How the `overrides` commands show a request in a terminal: what it is (agent, call, tool and its key
arguments), how old, how long it has left, who voted, which roles are still needed, and where it stands in
its escalation chain (tier, next step, primary reviewer; `show` lists every tier).

Plain functions on the API's JSON, so `list` and `watch` print alike. They read the summary fields when
the API gives them (`tool`, `key_arguments`, `seconds_left`, `votes`, `roles_needed`) and leave out what it
does not; every value an agent chose goes through `printable`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from proxy.vocabulary.printable import printable

UNDECIDED = frozenset({"pending", "needs_info"})
_SHORT = 60  # characters of an argument or a reason shown on a summary line


def action_uid(text: str) -> str:
    """`process_refund` as the Cedar action `Action::"process_refund"`; a full uid is kept as it is."""
    text = text.strip()
    if "::" in text:
        return text
    return f'Action::"{text}"'


def span(seconds: float) -> str:
    """A duration as a person reads it at a glance: 42s, 3m05s, 2h03m, 1d04h."""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def moment(value: Any) -> datetime | None:
    """An API timestamp (ISO 8601; one without an offset is UTC, as the store writes them)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _short(text: Any) -> str:
    shown = printable(str(text))
    return shown if len(shown) <= _SHORT else shown[: _SHORT - 1] + "…"


def tool_name(item: dict[str, Any]) -> str | None:
    """The MCP tool called: the summary's name, or server/name from a full request's tool call."""
    tool = item.get("tool")
    if isinstance(tool, dict):
        return "/".join(str(tool[k]) for k in ("server", "name") if tool.get(k))
    return str(tool) if tool else None


def key_arguments(item: dict[str, Any]) -> dict[str, Any]:
    arguments = item.get("key_arguments")
    if isinstance(arguments, dict):
        return arguments
    tool = item.get("tool")
    if isinstance(tool, dict) and isinstance(tool.get("arguments"), dict):
        return dict(tool["arguments"])
    return {}


def seconds_left(item: dict[str, Any], now: datetime) -> float | None:
    """Time left to decide an undecided request; None once decided."""
    if item.get("status") not in UNDECIDED:
        return None
    if isinstance(item.get("seconds_left"), int | float):
        return float(item["seconds_left"])
    expires = moment(item.get("expires_at"))
    return None if expires is None else (expires - now).total_seconds()


def votes_text(item: dict[str, Any]) -> str:
    votes = item.get("votes") or []
    shown = []
    for vote in votes:
        reason = f' "{_short(vote["reason"])}"' if vote.get("reason") else ""
        shown.append(f"{printable(str(vote.get('approver')))} {printable(str(vote.get('verdict')))}{reason}")
    return ", ".join(shown) if shown else "none yet"


def headline(item: dict[str, Any]) -> str:
    """id, status, agent, what it does (the named action when it is not the method's) and the URL."""
    method = str(item.get("method", ""))
    action = str(item.get("action", ""))
    what = printable(method)
    if action and action != f'Action::"{method.lower()}"':
        what = f"{what} {printable(action)}"
    return (f"{printable(str(item.get('id')))}  {printable(str(item.get('status'))):<12} "
            f"{printable(str(item.get('agent'))):<12} {what} {printable(str(item.get('url', '')))}")


def describe(item: dict[str, Any], now: datetime) -> list[str]:
    """The lines `overrides list` prints for one request."""
    lines = [headline(item)]
    tool = tool_name(item)
    arguments = " ".join(f"{printable(str(k))}={_short(v)}" for k, v in key_arguments(item).items())
    if tool or arguments:
        lines.append(f"    {'tool ' + printable(tool) + '  ' if tool else ''}{arguments}".rstrip())
    facts = []
    created = moment(item.get("created_at"))
    if created is not None:
        facts.append(f"age {span((now - created).total_seconds())}")
    left = seconds_left(item, now)
    if left is not None:
        facts.append(f"{span(left)} left" if left > 0 else "expiring")
    for label, key in (("severity", "severity"), ("reversible", "reversible")):
        if item.get(key) is not None:
            facts.append(f"{label} {printable(str(item[key]).lower())}")
    needed = item.get("roles_needed")
    if needed:
        facts.append("needs " + ", ".join(printable(str(r)) for r in needed))
    if "votes" in item:
        facts.append(f"votes: {votes_text(item)}")
    chain = chain_text(item, now)
    if chain:
        facts.append(chain)
    lines.append("    " + " · ".join(facts))
    reasons = item.get("reasons") or []
    if reasons:
        lines.append(f"    why: {printable('; '.join(str(r) for r in reasons))}")
    return lines


def chain_text(item: dict[str, Any], now: datetime) -> str | None:
    """Where an undecided request stands in a chain of several tiers, on one line: `tier 2/3, tier 3 in
    19m30s, primary sid`; None for a request of one tier with nobody named, or once decided."""
    chain = item.get("chain")
    if not isinstance(chain, dict) or item.get("status") not in UNDECIDED:
        return None
    parts = []
    if int(chain.get("tier_count") or 1) > 1:
        parts.append(f"tier {chain.get('tier')}/{chain.get('tier_count')}")
        upcoming = moment(chain.get("next_step_at"))
        if chain.get("next_step") and upcoming is not None:
            parts.append(f"{printable(str(chain['next_step']))} in {span((upcoming - now).total_seconds())}")
    if chain.get("primary_reviewer"):
        parts.append(f"primary {printable(str(chain['primary_reviewer']))}")
    return ", ".join(parts) or None


def chain_lines(item: dict[str, Any], now: datetime) -> list[str]:
    """The escalation chain as `overrides show` prints it: each tier with its roles and when it is
    reached, the current one marked, then the next step and the primary reviewer. Nothing for a plain
    escalation (one tier, no reminders): the JSON above says it all, and stays the whole output."""
    chain = item.get("chain")
    if not isinstance(chain, dict) or not chain.get("tiers"):
        return []
    if len(chain["tiers"]) <= 1 and not chain.get("remind_every"):
        return []
    lines = ["escalation chain:"]
    for tier in chain["tiers"]:
        at = moment(tier.get("at"))
        when = "at opening" if not tier.get("after_seconds") else f"after {span(tier['after_seconds'])}"
        if at is not None:
            when += f" ({at.strftime('%Y-%m-%d %H:%M:%S')} UTC)"
        mark = "->" if tier.get("tier") == chain.get("tier") and item.get("status") in UNDECIDED else "  "
        state = "reached" if tier.get("reached") else "not yet"
        roles = ", ".join(printable(str(r)) for r in tier.get("roles") or [])
        lines.append(f"  {mark} tier {tier.get('tier')}: {roles}  {when}, {state}")
    upcoming = moment(chain.get("next_step_at"))
    if chain.get("next_step") and upcoming is not None:
        lines.append(f"  next: {printable(str(chain['next_step']))} at {upcoming.strftime('%Y-%m-%d %H:%M:%S')} "
                     f"UTC (in {span((upcoming - now).total_seconds())})")
    if chain.get("remind_every"):
        lines.append(f"  reminders every {span(chain['remind_every'])}")
    if chain.get("primary_reviewer"):
        lines.append(f"  primary reviewer: {printable(str(chain['primary_reviewer']))}")
    return lines
