"""Where an override request stands in its escalation chain, and whom each step names: plain data.

A chain (`proxy.cedar.escalation.Chain`) runs on the request's own clock, from when it was opened: tier 1
at once, each later tier at its delay, reminders of the current tier every `@remind`, and the expiry at
the end. Who may decide is read off that clock (`proxy.oversight.overrides.reachable_roles`), so a vote
never depends on the chain job having run; the job (`OverrideWorkflow.advance_due`) only announces each
step, once, as an audit event the notifications read (`escalated`, `reminder`).

Each step names a primary reviewer (`routing`): among the approvers who can sign in holding a role of the
tier being announced, never the agent itself, the one with the fewest undecided requests they may decide
at that moment, ties broken by name; the rest of them, in the same order, are the fallback.

May import `proxy.cedar` and `proxy.oversight.overrides`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from proxy.cedar.escalation import Chain
from proxy.oversight.overrides import Override, OverrideStatus, at_offset, aware, can_decide, chain_of, elapsed


@dataclass(frozen=True)
class Routing:
    """Who is named at one step: the primary reviewer (None when no approver who can sign in qualifies)
    and the others who qualify, in the order they would be asked."""

    primary: str | None
    fallback: tuple[str, ...]


def routing(override: Override, roles: Iterable[str], reviewers: Mapping[str, frozenset[str]],
            waiting: Iterable[Override] | Callable[[], Iterable[Override]], now: datetime) -> Routing:
    """The primary reviewer and fallback for a step announcing `roles` on `override`.

    `reviewers` maps each approver who can sign in to their roles; `waiting` are the undecided requests
    (or what reads them: read only when two or more qualify), whose count each candidate may decide at
    `now` is their load (the request itself left out).
    """
    wanted = frozenset(roles)
    qualified = [name for name, held in reviewers.items() if held & wanted and name != override.agent]
    if len(qualified) < 2:
        return Routing(qualified[0] if qualified else None, ())
    others = [o for o in (waiting() if callable(waiting) else waiting) if o.id != override.id]
    load = {name: sum(1 for o in others if can_decide(o, reviewers[name], now)) for name in qualified}
    ranked = sorted(qualified, key=lambda name: (load[name], name))
    return Routing(ranked[0], tuple(ranked[1:]))


@dataclass(frozen=True)
class Step:
    """What the chain job owes a request now: the tiers to announce (their numbers, in order), or a
    reminder; and where the request then stands."""

    escalate_to: tuple[int, ...]
    remind: bool
    tier: int
    reminders_sent: int
    next_step_at: datetime | None

    @property
    def announces(self) -> bool:
        return bool(self.escalate_to) or self.remind


def due_step(override: Override, now: datetime) -> Step:
    """The step due on `override` at `now`, from where the job left it (`tier`, `reminders_sent`).

    Tiers passed while the job was not running are each announced, in order (their people were never
    told); reminders missed are not sent one by one: one reminder says the tier is still waiting. A
    request waiting for the agent's answer (needs_info) is not reminded: nobody can act on it.
    """
    chain = chain_of(override)
    clock = elapsed(override, now)
    reached = max(chain.reached(clock), override.tier)
    escalate_to = tuple(range(override.tier + 1, reached + 1))
    due = chain.reminders_due(reached, clock)
    sent = 0 if escalate_to else override.reminders_sent
    remind = not escalate_to and due > sent and override.status == OverrideStatus.PENDING.value
    sent = max(sent, due) if not escalate_to else due
    return Step(escalate_to, remind, reached, sent,
                at_offset(override.created_at, chain.next_step(reached, sent)))


def deadline_of(override: Override, chain: Chain, tier: int) -> datetime:
    """When tier `tier` of the request ends: the next tier's start, or the expiry."""
    moment = at_offset(override.created_at, chain.deadline(tier))
    assert moment is not None
    return moment


def step_payload(override: Override, chain: Chain, tier: int, roles: Iterable[str],
                 route: Routing) -> dict[str, Any]:
    """The routing fields of `override_created`, `escalated` and `reminder` events: the notifications
    route by them (see `proxy.record.audit.EventKind`)."""
    return {"tier": tier, "roles": sorted(roles), "primary": route.primary, "fallback": list(route.fallback),
            "deadline": deadline_of(override, chain, tier).isoformat()}


def standing(override: Override, now: datetime) -> dict[str, Any]:
    """Where the request stands in its chain at `now`, as the views show it: every tier with its roles
    and when it is (or was) reached, the current tier, the next step and when, the primary reviewer."""
    chain = chain_of(override)
    undecided = override.status in (OverrideStatus.PENDING.value, OverrideStatus.NEEDS_INFO.value)
    # A decided request stands where it was when it was decided (or expired).
    ended = None if undecided else override.decided_at
    clock = elapsed(override, now if ended is None else min(now, aware(ended)))
    current = chain.reached(clock)
    tiers = [{"tier": number, "roles": list(tier.roles), "after_seconds": tier.after,
              "at": at_offset(override.created_at, tier.after), "reached": tier.after <= clock}
             for number, tier in enumerate(chain.tiers, start=1)]
    next_step: str | None = None
    next_at: datetime | None = None
    if undecided:
        if current < len(chain.tiers):
            next_step, next_at = f"tier {current + 1}", at_offset(override.created_at, chain.tiers[current].after)
        else:
            next_step, next_at = "expiry", at_offset(override.created_at, chain.expires_in)
    return {"tiers": tiers, "tier": current, "tier_count": len(chain.tiers), "remind_every": chain.remind_every,
            "next_step": next_step, "next_step_at": next_at,
            "primary_reviewer": override.primary_reviewer if undecided else None}
