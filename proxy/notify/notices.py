"""What a notification says, as plain data (`Notice`), worked out from an audit row and its request; and
which channels a notice goes to (`route`).

The audit kinds told are the request's opening, a reminder, an escalation to the next tier, a question
asked of the agent, the grant or denial, and expiry. Who is concerned comes from the event's payload when
it says (`roles`, `primary`, `fallback`, `deadline`, `tier`, as the escalation chains record them), else
from the request itself: the roles it needs and its expiry. Everything the agent chose (its
justification, the call's arguments, the URL) is kept as it came, made printable and cut to length;
each channel escapes it for its own format.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from proxy.oversight.overrides import Override, needed_roles
from proxy.oversight.summary import summarize
from proxy.record.audit import iso_utc
from proxy.settings.notifications import NoticeKind, Route
from proxy.vocabulary.printable import printable

# The audit kinds told, and what each is called in routes. "reminder" and "escalated" are recorded by
# the escalation chains; until a chain is configured none are written, and nothing is lost by naming them.
TOLD = {
    "override_created": NoticeKind.OPENED,
    "reminder": NoticeKind.REMINDER,
    "escalated": NoticeKind.ESCALATED,
    "info_requested": NoticeKind.INFO_REQUESTED,
    "grant": NoticeKind.GRANTED,
    "denied": NoticeKind.DENIED,
    "expired": NoticeKind.EXPIRED,
}
MAX_JUSTIFICATION = 1000  # characters of the agent's justification (or a reviewer's reason) told
MAX_URL = 300


@dataclass(frozen=True)
class Notice:
    kind: str  # a NoticeKind value
    seq: int  # the audit row told of
    at: str  # when it happened, ISO 8601 UTC
    override_id: str
    status: str  # the request's status when the event was read
    agent: str
    method: str
    url: str
    action: str
    resource: str
    tool: str | None
    key_arguments: dict[str, str]
    severity: str | None
    reversible: bool | None
    justification: str | None
    deadline: str | None  # ISO 8601: when the request expires, or its current tier's time runs out
    roles: list[str]  # the roles concerned: who may decide it now
    primary: str | None = None  # the reviewer named first, when the chain names one
    fallback: list[str] = field(default_factory=list)
    tier: int | None = None
    actor: str | None = None  # who decided, or asked
    reason: str | None = None  # the decision's reason, or the question asked
    link: str = ""  # the request on the review page

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Notice:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @property
    def title(self) -> str:
        """One line saying what happened, for a subject or a header: printable, no line breaks."""
        what = f"{self.method} {self.resource}" if not self.tool else f"tool {self.tool}"
        return {
            NoticeKind.OPENED: f"Review needed: {self.agent} asks to {what}",
            NoticeKind.REMINDER: f"Reminder: {self.agent}'s request to {what} is waiting",
            NoticeKind.ESCALATED: f"Escalated (tier {self.tier}): {self.agent} asks to {what}"
            if self.tier is not None else f"Escalated: {self.agent} asks to {what}",
            NoticeKind.INFO_REQUESTED: f"Question asked: {self.agent}'s request to {what}",
            NoticeKind.GRANTED: f"Granted by {self.actor}: {self.agent}'s request to {what}",
            NoticeKind.DENIED: f"Denied by {self.actor}: {self.agent}'s request to {what}",
            NoticeKind.EXPIRED: f"Expired, rejected: {self.agent}'s request to {what}",
        }[NoticeKind(self.kind)]


def notice_of(seq: int, at: datetime | str, kind: str, payload: Mapping[str, Any], actor: str | None,
              override: Override, link: str) -> Notice:
    """The notice of audit row `seq` (of a kind in `TOLD`) about `override`."""
    summary = summarize(override, [], datetime.fromisoformat(iso_utc(at)))
    roles = _names(payload.get("roles")) or sorted(needed_roles(override))
    deadline = payload.get("deadline")
    tier = payload.get("tier")
    told = TOLD[kind]
    reason = payload.get("question") if told is NoticeKind.INFO_REQUESTED else payload.get("reason")
    return Notice(
        kind=told.value, seq=seq, at=iso_utc(at), override_id=override.id, status=override.status,
        agent=printable(override.agent), method=printable(override.method),
        url=_cut(printable(override.url), MAX_URL), action=printable(override.action),
        resource=printable(override.resource), tool=summary.tool, key_arguments=summary.key_arguments,
        severity=summary.severity, reversible=summary.reversible,
        justification=_text(override.justification),
        deadline=str(deadline) if isinstance(deadline, str) and deadline else iso_utc(override.expires_at),
        roles=roles, primary=printable(payload["primary"]) if isinstance(payload.get("primary"), str) else None,
        fallback=_names(payload.get("fallback")), tier=tier if isinstance(tier, int) else None,
        actor=printable(actor) if actor else None, reason=_text(reason if isinstance(reason, str) else None),
        link=link,
    )


def route(notice: Notice, routes: Iterable[Route]) -> list[str]:
    """The channels `notice` goes to, each once, in the order routes first name them."""
    channels: list[str] = []
    concerned = set(notice.roles)
    for r in routes:
        if NoticeKind(notice.kind) in r.kinds and (not r.roles or concerned & set(r.roles)):
            channels += [name for name in r.channels if name not in channels]
    return channels


def parse_payload(text: str) -> dict[str, Any]:
    try:
        payload = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


def _names(value: Any) -> list[str]:
    return [printable(v) for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _text(value: str | None) -> str | None:
    return None if value is None else _cut(printable(value), MAX_JUSTIFICATION)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
