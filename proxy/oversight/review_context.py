"""What a reviewer needs around one override request to decide it without re-deriving it, as plain data.

The agent's own statements (justification, confidence, session); its recent calls in the same session,
with what became of each (the record's rows: decision, determining policies, upstream status); how the
same policy decided on the same tool (or action) before, request by request with who decided and why;
and whether the policy revision that escalated the request is still the live one, policy by policy.

Reads only: the record's decisions table and the override store. May import `proxy.cedar`,
`proxy.record`, `proxy.vocabulary` and the rest of `proxy.oversight`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import Engine as SAEngine
from sqlmodel import Session, col, select

from proxy.calls.mcp.binding import tool_call
from proxy.cedar.policy import PolicyBundle
from proxy.oversight.overrides import Override, OverrideStore, policy_ids
from proxy.oversight.summary import arguments_of, key_arguments, short_text
from proxy.record.store import DecisionRecord

RECENT_CALLS = 20  # of the agent's session, newest first
SIMILAR = 10  # decided requests shown of those like this one
SIMILAR_SCAN = 200  # decided requests of the same policy and action looked through for the same tool


def review_context(override: Override, *, store: OverrideStore, bundle: PolicyBundle,
                   roles: frozenset[str] | None) -> dict[str, Any]:
    """Everything around `override` a reviewer is shown; `roles` None sees every similar request, else
    only those someone holding `roles` could decide (as the listing)."""
    statements = agent_statements(override)
    return {
        "id": override.id,
        "agent": {"id": override.agent, **statements},
        "recent_calls": recent_calls(store.engine, override, statements["session"]),
        **similar_requests(store, override, roles),
        "policy": policy_state(override, bundle),
    }


def agent_statements(override: Override) -> dict[str, Any]:
    """What the agent said about its call (X-Agent-* headers): justification, confidence (as text, a
    Cedar decimal), session; None where it said nothing."""
    told = _context(override).get("agent")
    told = told if isinstance(told, Mapping) else {}
    confidence = told.get("confidence")
    session = told.get("session")
    return {
        "justification": override.justification,
        "confidence": None if confidence is None else short_text(confidence),
        "session": session if isinstance(session, str) else None,
    }


def recent_calls(engine: SAEngine, override: Override, session: str | None,
                 limit: int = RECENT_CALLS) -> dict[str, Any]:
    """The agent's last `limit` recorded calls in `session` (without one: its last calls at all), newest
    first, each with its outcome; `scope` says which."""
    query = select(DecisionRecord).where(DecisionRecord.agent == override.agent)
    if session is not None:
        query = query.where(DecisionRecord.session == session)
    with Session(engine) as db:
        rows = db.exec(query.order_by(col(DecisionRecord.at).desc(), col(DecisionRecord.id).desc())
                       .limit(limit)).all()
    return {
        "scope": "session" if session is not None else "agent",
        "session": session,
        "calls": [{
            "decision_id": r.decision_id, "at": r.at, "method": r.method, "host": r.host, "path": r.path,
            "action": r.action, "tool": r.tool, "decision": r.decision,
            "policies": _json(r.determining_policies, []), "upstream_status": r.upstream_status,
            "this_request": r.decision_id == override.decision_id,
        } for r in rows],
    }


def similar_requests(store: OverrideStore, override: Override, roles: frozenset[str] | None,
                     limit: int = SIMILAR) -> dict[str, Any]:
    """Decided requests escalated by the same policy for the same tool (an MCP call) or the same action
    (any other call), newest decision first, with a tally of how they ended."""
    policy = policy_ids(override)[0] if policy_ids(override) else None
    tool = _tool(override)
    found = [] if policy is None else [
        other for other in store.list(action=override.action, policy=policy, decided=True, roles=roles,
                                      limit=SIMILAR_SCAN)
        if other.id != override.id and _tool(other) == tool
    ]
    votes = store.votes_on(o.id for o in found[:limit])
    return {
        "similar": {
            "policy": policy, "tool": tool, "action": override.action,
            "outcomes": dict(Counter(o.status for o in found)),
            "requests": [{
                "id": o.id, "status": o.status, "agent": o.agent, "created_at": o.created_at,
                "decided_at": o.decided_at, "decided_reason": o.decided_reason,
                "changes": json.loads(o.changes) if o.changes else None,
                "key_arguments": key_arguments(arguments_of(o)),
                "votes": [{"approver": v.approver, "verdict": v.verdict, "reason": v.reason, "at": v.at}
                          for v in votes[o.id]],
            } for o in found[:limit]],
        },
    }


def policy_state(override: Override, bundle: PolicyBundle) -> dict[str, Any]:
    """The revision that escalated the request, the live one, and each escalating policy's state now:
    gone from the live revision, or there (with its annotations now, which a reload may have changed)."""
    live = bundle.policies
    return {
        "revision": override.policy_revision,
        "live_revision": bundle.revision,
        "is_live": override.policy_revision == bundle.revision,
        "policies": [{
            "id": p["id"], "reason": p.get("reason"), "annotations": p.get("annotations") or {},
            "in_live_revision": p["id"] in live,
            "live_annotations": dict(live[p["id"]].annotations) if p["id"] in live else None,
        } for p in _json(override.policies, [])],
    }


def _context(override: Override) -> Mapping[str, Any]:
    context = _json(override.cedar_request, {}).get("context")
    return context if isinstance(context, Mapping) else {}


def _tool(override: Override) -> str | None:
    call = tool_call(_json(override.cedar_request, {}), override.body)
    return None if call is None else str(call["name"])


def _json(text: str, default: Any) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return default

