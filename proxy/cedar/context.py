"""The one description of what a Cedar request's context holds, for each kind of action.

An HTTP call (`Action::"get"` ... `"delete"`, or a manifest route's named action) has the call's scheme,
host, port, method, path, query, selected headers and the agent's statements, when it was decided
(`time`, and `local`: that instant's wall clock in the configured time zone), its JSON body at run time,
and on a route the classification (severity, reversible) and the route's typed fields. A message on an
MCP endpoint (`call_tool`, `mcp_rpc`) has the same HTTP attributes and what the message is: its server,
kind and JSON-RPC method, and the tool and arguments, or the resource or prompt it names; for a tool the
manifest does not classify, the server's own annotations (`hints`).

An attribute is `advisory` when someone cedargate does not trust says it (an MCP server's hints): the
engine decides a call carrying one twice, with and without it, and keeps the stricter answer, so what
such a source says can add caution and never take it away.

The mapping (`proxy.calls.mapping`, `proxy.calls.mcp.mapping`) fills these attributes, the manifest
reserves their names (`RESERVED`) and writes them into the generated schema (`schema_text`), and a test
holds `policies/schema.cedarschema` to them. Here too: the HTTP methods that have actions, and the one
encoder of Cedar `decimal` values.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any, TypeGuard

# The methods cedargate forwards, each the Cedar action of its lower-case name; any other is refused.
METHODS = ("GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE")
READ_METHODS = ("GET", "HEAD", "OPTIONS")  # in the schema's `read` group; the others are in `write`
METHOD_ACTIONS = {method: method.lower() for method in METHODS}


@dataclass(frozen=True)
class Attribute:
    """One context attribute: its name, its Cedar schema type, and whether every request has it."""

    name: str
    type: str  # as the schema spells it; "" for an attribute the schema leaves undeclared
    required: bool = True
    comment: str = ""  # shown beside it in the generated schema
    advisory: bool = False  # said by an untrusted source: may add caution, never remove it (see above)

    @property
    def declared(self) -> bool:
        return bool(self.type)


# Every call's: where it goes and how, as the agent sent it (host canonical, method upper-case).
HTTP = (
    Attribute("scheme", "String"), Attribute("host", "String"), Attribute("port", "Long"),
    Attribute("method", "String"), Attribute("path", "String"), Attribute("query", "String"),
    Attribute("headers", "Headers"),  # only the operator's `context_headers`, never credentials
    Attribute("agent", "AgentStatements", required=False),  # from X-Agent-* headers, when sent
    Attribute("time", "datetime", comment="when the call was decided (UTC, whole seconds)"),
    Attribute("local", "LocalTime", comment="that instant in the configured time_zone"),
)
# A call's JSON body, as Cedar values: present at run time, typed by no schema (a policy on it declares it).
BODY = Attribute("body", "", required=False)
# A manifest route's classification, from actions.yaml.
CLASSIFICATION = (Attribute("severity", "String"), Attribute("reversible", "Bool"))
# What an MCP message is, on any MCP endpoint.
MCP_MESSAGE = (
    Attribute("server", "String", comment="the endpoint's server name"),
    Attribute("rpc_kind", "String",
              comment="request, notification, response, stream (GET) or end-session (DELETE)"),
    Attribute("rpc_method", "String",
              comment="the JSON-RPC method, e.g. tools/call; empty when there is none"),
)
CALL_TOOL = (
    *HTTP, *MCP_MESSAGE,
    Attribute("tool", "String"),
    Attribute("arguments", "ToolArguments"),
    Attribute("severity", "String", comment='from actions.yaml; "unclassified" for a tool it does not list'),
    Attribute("reversible", "Bool"),
    Attribute("hints", "ToolHints", required=False, advisory=True,
              comment="a tool actions.yaml does not list: the server's annotations"),
)
MCP_RPC = (
    *HTTP, *MCP_MESSAGE,
    Attribute("uri", "String", required=False,
              comment="resources/read, resources/subscribe, resources/unsubscribe"),
    Attribute("prompt", "String", required=False, comment="prompts/get"),
)
# The attributes that say what an MCP message was, which its method and path do not (kept in the record).
MCP_DETAIL = (*(a.name for a in MCP_MESSAGE), "tool", "uri", "prompt")

# The context of an HTTP method's action, and of a manifest route's action before its own fields.
METHOD_CONTEXT = (*HTTP, BODY)
ROUTE_CONTEXT = (*HTTP, BODY, *CLASSIFICATION)
# Names a manifest field may not take: they would shadow what every HTTP call carries.
RESERVED = frozenset(a.name for a in ROUTE_CONTEXT)
# The attributes an untrusted source fills: a call carrying one is decided with and without it.
ADVISORY = frozenset(a.name for a in (*METHOD_CONTEXT, *ROUTE_CONTEXT, *CALL_TOOL, *MCP_RPC) if a.advisory)


# -- when: context.time and context.local ------------------------------------------------------------------

# `context.local`'s fields with their Cedar types, and how often each changes: a decision that reads only
# some of them is cached until one of those changes (the engine hands Cedar only the fields its policies read).
LOCAL_TIME = {"hour": "Long", "minute": "Long", "weekday": "String", "date": "String"}
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
TIME_RECORD = "local"  # the context record whose fields the engine prunes to those read


def time_context(at: datetime, zone: tzinfo = UTC) -> dict[str, Any]:
    """`context.time` (a Cedar datetime, UTC, whole seconds) and `context.local` for the instant `at`.

    Whole seconds: a policy needs no finer clock, and a decision reading `context.time` can then be
    cached for the rest of its second. `local.weekday` is the English name in lower case ("saturday");
    `local.date` is "YYYY-MM-DD"; both, like the hour and minute, as the wall clock of `zone` shows them.
    """
    utc = at.astimezone(UTC).replace(microsecond=0)
    global _last_second
    key, known = _last_second
    if key != (utc, zone):
        local = utc.astimezone(zone)
        known = ({"__extn": {"fn": "datetime", "arg": utc.strftime("%Y-%m-%dT%H:%M:%SZ")}},
                 {"hour": local.hour, "minute": local.minute, "weekday": WEEKDAYS[local.weekday()],
                  "date": local.strftime("%Y-%m-%d")})
        # Every call of the same second has the same fields: worked out once (a tuple swap is atomic).
        _last_second = ((utc, zone), known)
    return {"time": {"__extn": dict(known[0]["__extn"])}, "local": dict(known[1])}


_last_second: tuple[Any, tuple[dict[str, Any], dict[str, Any]]] = (None, ({}, {}))


# -- MCP tool annotations: context.hints ------------------------------------------------------------------

# The annotations of MCP's Tool (2025-03-26 on), with the value the specification gives an absent one: the
# most cautious reading (a tool that says nothing may destroy, write, repeat its effect and reach anywhere).
HINT_DEFAULTS = {"readOnlyHint": False, "destructiveHint": True, "idempotentHint": False, "openWorldHint": True}
# `listed`: whether the values came from the server's tools/list (else they are all the defaults).
HINT_FIELDS = {**{name: "Bool" for name in HINT_DEFAULTS}, "listed": "Bool"}


def tool_hints(annotations: Any = None) -> dict[str, bool]:
    """`context.hints` from a tool's `annotations` as a tools/list gave it; None: the tool was never listed.
    A hint that is absent, or not a boolean, is MCP's default for it."""
    given = annotations if isinstance(annotations, dict) else {}
    hints = {name: value if isinstance(value := given.get(name), bool) else default
             for name, default in HINT_DEFAULTS.items()}
    hints["listed"] = annotations is not None
    return hints


def schema_lines(attributes: tuple[Attribute, ...], indent: str = "    ") -> list[str]:
    """The declared attributes as the lines of a schema's `context: { ... }`, the HTTP scalars on one line."""
    lines, scalars = [], []
    for attribute in attributes:
        if not attribute.declared:
            continue
        spelled = f"{attribute.name}{'' if attribute.required else '?'}: {attribute.type},"
        if attribute in HTTP[:6]:
            scalars.append(spelled)
            if len(scalars) == 6:
                lines.append(indent + " ".join(scalars))
            continue
        if attribute.comment:
            spelled = f"{spelled:<21} // {attribute.comment}"
        lines.append(indent + spelled)
    return lines


# -- Cedar decimal values --------------------------------------------------------------------------------

# Cedar's decimal: at most 4 places, within a 64-bit range, here at most 15 whole digits.
DECIMAL_TEXT = re.compile(r"-?\d{1,15}(\.\d{1,4})?")
_DECIMAL_LIMIT = 922_337_203_685_477


def decimal(text: str) -> dict[str, Any]:
    """The Cedar JSON of a decimal written as `text` (already checked against DECIMAL_TEXT)."""
    # Cedar's decimal literal needs a fractional digit ("2.0", not "2").
    return {"__extn": {"fn": "decimal", "arg": text if "." in text else f"{text}.0"}}


def decimal_of_float(value: float) -> dict[str, Any] | None:
    """A float as a Cedar decimal; None when a decimal cannot hold it exactly enough (4 places)."""
    if math.isfinite(value) and abs(value) < _DECIMAL_LIMIT and round(value, 4) == value:
        return decimal(f"{value:.4f}".rstrip("0").rstrip("."))
    return None


def is_decimal(value: object) -> TypeGuard[dict[str, Any]]:
    return isinstance(value, dict) and "__extn" in value
