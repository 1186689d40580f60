"""MCP over streamable HTTP: what a JSON-RPC message on an MCP endpoint does, and how to answer for it.

Every MCP call is a POST of JSON-RPC to one URL, so method and path say nothing about what it does. On
an endpoint the action manifest names (`mcp:` under a host), cedargate reads the message instead:

- `tools/call` is `Action::"call_tool"` on `Tool::"<server>/<tool>"` (in `McpServer::"<server>"`), with
  the tool's arguments in `context.arguments` (typed where actions.yaml declares them) and the tool's
  classification in `context.severity` / `context.reversible`;
- every other message (initialize, notifications, tools/list, a response to the server, the GET that
  opens the server's stream, the DELETE that ends a session) is `Action::"mcp_rpc"` on the McpServer,
  with `context.rpc_kind` and `context.rpc_method`.

A JSON-RPC batch is decided message by message. A refusal is answered the way an MCP client can show
it to its model: a tools/call gets a result with `isError: true` and text saying what was denied, why,
and for an escalation the override id and how to retry; another request gets a JSON-RPC error. A
`tools/list` answer is filtered so an agent does not see tools that policy hard-denies to it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.manifest import MCP_ACTIONS, TOOL_NAME, FieldError, FieldSpec, McpEndpointSpec, typed_value

log = logging.getLogger(__name__)

MAX_BATCH = 64  # messages in one JSON-RPC batch; more is refused, not truncated
MAX_METHOD = 256
# JSON-RPC reserves -32000..-32099 for implementation-defined server errors.
REFUSED_CODE = -32003
UNCLASSIFIED = "unclassified"


def implicit_parents(uid: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    """Parents an entity has whether or not entities.json lists it: an MCP tool is in its server, so
    `resource in McpServer::"github"` holds for Tool::"github/search_issues"."""
    return (("McpServer", uid[1].split("/", 1)[0]),) if uid[0] == "Tool" else ()


class McpError(ValueError):
    """The body on an MCP endpoint is not a JSON-RPC 2.0 message cedargate can decide."""


@dataclass(frozen=True)
class Message:
    """One JSON-RPC message as the agent sent it."""

    raw: Mapping[str, Any]
    kind: str  # request | notification | response
    id: Any = None
    method: str = ""

    @property
    def params(self) -> Mapping[str, Any]:
        params = self.raw.get("params")
        return params if isinstance(params, dict) else {}

    @property
    def tool(self) -> str | None:
        return self.params.get("name") if self.method == "tools/call" else None

    def encoded(self) -> bytes:
        return json.dumps(self.raw, separators=(",", ":")).encode()

    def binding(self) -> bytes:
        """What the message asks for, without what a retry of the same call changes: its id and the
        progress token in `params._meta`. The rest of `_meta` stays bound: tool code may read it."""
        bound = {k: v for k, v in self.raw.items() if k != "id"}
        params = bound.get("params")
        if isinstance(params, dict) and isinstance(params.get("_meta"), dict):
            meta = {k: v for k, v in params["_meta"].items() if k != "progressToken"}
            bound["params"] = {k: v for k, v in params.items() if k != "_meta"}
            if meta:  # `_meta: {progressToken}` binds like no `_meta` at all
                bound["params"]["_meta"] = meta
        return json.dumps(bound, sort_keys=True, separators=(",", ":")).encode()

    @property
    def name(self) -> str | None:
        """What the message's method acts on, as the Mcp-Name header repeats it: a name or a URI."""
        params = self.params
        for key in ("name", "uri"):
            if isinstance(params.get(key), str):
                return params[key]
        return None


def check_routing_headers(message: Message, headers: Mapping[str, str]) -> None:
    """Refuse a message whose Mcp-Method / Mcp-Name headers say something other than its body.

    MCP lets gateways route on these headers without reading the body; cedargate decides on the body.
    If they differ, the server or a gateway behind cedargate could act on what was not decided.
    """
    for name, value in headers.items():
        key = name.lower()
        if key == "mcp-method" and value != message.method:
            raise McpError(f"the Mcp-Method header says {value[:80]!r} but the message is {message.method!r}")
        if key == "mcp-name" and value != message.name:
            raise McpError(f"the Mcp-Name header says {value[:80]!r} but the message names {message.name!r}")


def parse_messages(parsed: Any) -> tuple[list[Message], bool]:
    """(messages, whether they came as a batch) from a parsed JSON body; McpError if it is not JSON-RPC."""
    if isinstance(parsed, list):
        if not parsed:
            raise McpError("an empty JSON-RPC batch")
        if len(parsed) > MAX_BATCH:
            raise McpError(f"a JSON-RPC batch of {len(parsed)} messages; cedargate decides at most {MAX_BATCH}")
        return [_message(item, f"batch item {i}") for i, item in enumerate(parsed)], True
    return [_message(parsed, "the body")], False


def _message(item: Any, where: str) -> Message:
    if not isinstance(item, dict) or item.get("jsonrpc") != "2.0":
        raise McpError(f"{where} is not a JSON-RPC 2.0 message (an object with \"jsonrpc\": \"2.0\")")
    has_id = "id" in item
    ident = item.get("id")
    if has_id and (isinstance(ident, bool) or not isinstance(ident, (str, int))):
        raise McpError(f"{where} has an id that is not a string or an integer")
    method = item.get("method")
    if method is not None and ("result" in item or "error" in item):
        # A server would take it as an answer to its own request; we would decide it as a request.
        raise McpError(f"{where} has a method and a result or error: it is both a request and a response")
    if method is not None:
        if not isinstance(method, str) or not 0 < len(method) <= MAX_METHOD or not method.isprintable():
            raise McpError(f"{where} has a method that is not a name of 1 to {MAX_METHOD} characters")
        if "params" in item and not isinstance(item["params"], dict):
            raise McpError(f"{where}: params must be an object")
        return Message(item, "request" if has_id else "notification", ident, method)
    if has_id and ("result" in item) != ("error" in item):
        return Message(item, "response", ident)
    raise McpError(f"{where} is neither a request, a notification nor a response")


@dataclass(frozen=True)
class Exchange:
    """One HTTP exchange on an MCP endpoint: the messages going upstream, and cedargate's own answers
    for the ones it refused (added to what the server answers)."""

    messages: tuple[Message, ...]
    batch: bool
    answers: tuple[dict, ...] = ()


@dataclass(frozen=True)
class McpMapping:
    """A message as Cedar sees it: the action, the resource and what joins the context."""

    action: str
    resource: tuple[str, str]
    context: dict


def map_message(endpoint: McpEndpointSpec, http_method: str, message: Message | None,
                to_cedar: Callable[[Any], Any], headers: Mapping[str, str] | None = None,
                argument_types: Mapping[str, str] | None = None) -> McpMapping:
    """Map one message on `endpoint` (None for the GET/DELETE that carry none).

    Raises McpError when it cannot be mapped and LookupError when it names a tool the endpoint
    refuses as unknown. `to_cedar` turns parsed JSON into Cedar values (the HTTP mapping's rules).
    """
    server = endpoint.server
    if message is None:
        kind = {"GET": "stream", "DELETE": "end-session"}.get(http_method.upper())
        if kind is None:
            raise McpError(f"an MCP endpoint takes POST, GET and DELETE, not {http_method.upper()}")
        return McpMapping("mcp_rpc", ("McpServer", server),
                          {"server": server, "rpc_kind": kind, "rpc_method": ""})
    check_routing_headers(message, headers or {})
    context: dict[str, Any] = {"server": server, "rpc_kind": message.kind, "rpc_method": message.method}
    # A tools/call without an id is a notification, but a JSON-RPC server may still run the tool: it is
    # decided as the tool call it asks for.
    if message.method != "tools/call":
        params = message.params
        if message.method.startswith("resources/") and isinstance(params.get("uri"), str):
            context["uri"] = params["uri"]
        if message.method == "prompts/get" and isinstance(params.get("name"), str):
            context["prompt"] = params["name"]
        return McpMapping("mcp_rpc", ("McpServer", server), context)
    tool = message.params.get("name")
    if not isinstance(tool, str) or not TOOL_NAME.match(tool):
        raise McpError("tools/call names no tool, or one that is not 1 to 128 letters, digits, _ . or -")
    arguments = message.params.get("arguments", {})
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise McpError(f"tools/call {tool}: arguments must be an object")
    spec = endpoint.tools.get(tool)
    if spec is None and endpoint.unknown_tools == "refuse":
        raise LookupError(
            f"tool {tool!r} of MCP server {server!r} is not in the action manifest, so nobody has classified "
            "what it does; add it under the endpoint's tools in actions.yaml to allow it"
        )
    cedar_arguments = to_cedar(arguments)
    declared = dict(spec.arguments) if spec is not None else {}
    for name, argument in declared.items():
        if argument.required and (name not in arguments or arguments[name] is None):
            raise McpError(f"tools/call {tool}: argument {name!r} is required by actions.yaml")
    # The schema gives an argument name one type for every tool, so a name declared for any tool is
    # typed (or refused) in every tool's call: a policy never compares a value of another type.
    types = {**(argument_types or {}), **{n: a.type for n, a in declared.items()}}
    for name, kind in types.items():
        if name in arguments and arguments[name] is not None:
            field = FieldSpec.model_validate({"from": "body", "type": kind})
            try:
                cedar_arguments[name] = typed_value(name, field, arguments[name])
            except FieldError as exc:
                raise McpError(f"tools/call {tool}: {exc}") from None
    context.update(
        tool=tool, arguments=cedar_arguments,
        severity=spec.severity if spec else UNCLASSIFIED, reversible=spec.reversible if spec else False,
    )
    return McpMapping("call_tool", ("Tool", f"{server}/{tool}"), context)


def binding_of(action: str, body: bytes) -> bytes | None:
    """What an override for an MCP message binds to: the message without its JSON-RPC id; None if not MCP."""
    if action not in MCP_ACTIONS:
        return None
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        return body
    return _message(parsed, "the body").binding() if isinstance(parsed, dict) else body


def tool_call(cedar_request: Mapping[str, Any], body: bytes) -> dict | None:
    """For a reviewer: the tool an MCP call asks for and its arguments as sent; None for other calls."""
    context = cedar_request.get("context") or {}
    if cedar_request.get("action") != 'Action::"call_tool"' or "tool" not in context:
        return None
    try:
        arguments = json.loads(body)["params"].get("arguments") or {}
    except (ValueError, KeyError, TypeError, AttributeError):
        arguments = {}
    return {"server": context.get("server"), "name": context["tool"], "arguments": arguments}


# -- answering for a refused message --------------------------------------------------------------------

_NEXT_STEP = {
    "policy-denied": "This is a hard denial: do not retry this call.",
    "no-permit": "No policy allows it: do not retry this call.",
    "unknown-action": "Do not retry this call; an operator must classify the tool first.",
    "override-pending": ("A human is reviewing an override request for it. Retry the identical call "
                         "(same tool, same arguments) later; it goes through once it is granted."),
    "override-denied": "A reviewer denied the exception: do not retry this call.",
    "override-expired": "The override request expired without a decision; retrying asks again.",
    "override-release-refused": "Do not retry this call.",
    "store-unavailable": "This is temporary: retry the call in a little while.",
}


def refusal_text(problem: Mapping[str, Any], message: Message) -> str:
    """What the model reads: what was denied, why, and what it can do next."""
    what = f"tool {message.tool!r}" if message.tool else f"{message.method or 'this message'}"
    lines = [f"cedargate refused {what}: {problem['title']}."]
    if problem.get("detail"):
        lines.append(f"Why: {problem['detail']}")
    if problem.get("override_id"):
        roles = ", ".join(problem.get("required_roles") or [])
        lines.append(f"Override request: {problem['override_id']} (status {problem.get('override_status')}"
                     + (f", needs approval by: {roles}" if roles else "") + ").")
    step = _NEXT_STEP.get(str(problem.get("type", "")).rsplit(":", 1)[-1])
    if step:
        lines.append(step)
    lines.append(f"Decision id: {problem.get('decision_id')}.")
    return "\n".join(lines)


def refusal_answer(problem: Mapping[str, Any], message: Message) -> dict:
    """The JSON-RPC answer to a refused request: an isError tool result, or a JSON-RPC error."""
    text = refusal_text(problem, message)
    if message.method == "tools/call":
        # resultType: required from protocol revision 2026-07-28 on, ignored by clients of earlier ones.
        result = {"content": [{"type": "text", "text": text}], "isError": True, "resultType": "complete",
                  "_meta": {"cedargate/problem": dict(problem)}}
        return {"jsonrpc": "2.0", "id": message.id, "result": result}
    return {"jsonrpc": "2.0", "id": message.id,
            "error": {"code": REFUSED_CODE, "message": text, "data": dict(problem)}}


# -- tools/list filtering -------------------------------------------------------------------------------

def filter_tool_list(answer: Any, visible: Callable[[Iterable[str]], set[str]]) -> Any | None:
    """The answer with hidden tools removed from every tool list in it, or None if nothing changed.

    Every result carrying a `tools` list is filtered, whichever request it answers: a server may replay
    an earlier tools/list answer on its GET stream (resumption), or echo an id in another type.
    """
    items = answer if isinstance(answer, list) else [answer]
    changed = False
    for item in items:
        result = item.get("result") if isinstance(item, dict) else None
        tools = result.get("tools") if isinstance(result, dict) else None
        if not isinstance(tools, list):
            continue
        names = [t["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]
        shown = visible(names)
        kept = [t for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str) and t["name"] in shown]
        if len(kept) != len(tools):
            result["tools"] = kept
            changed = True
    return answer if changed else None


def read_json(body: bytes) -> Any:
    """An MCP answer's JSON, read strictly (UTF-8): what cannot be read here is not passed on."""
    return json.loads(body.decode("utf-8"))


UPSTREAM_ANSWER = "urn:cedargate:problem:upstream-answer"
DEFAULT_MAX_EVENT = 1024 * 1024


def unreadable_problem(detail: str = "") -> dict:
    """The problem for a server's answer cedargate could not check, and so did not pass on."""
    problem = {"type": UPSTREAM_ANSWER, "status": 502,
               "title": "cedargate could not check the MCP server's answer, so it is not passed on"}
    if detail:
        problem["detail"] = detail
    return problem


def _event_bytes(answer: Mapping[str, Any]) -> bytes:
    return b"event: message\ndata: " + json.dumps(answer).encode() + b"\n\n"


def _id_key(ident: Any) -> str:
    return json.dumps(ident)  # 1 and "1" are different ids


class SseRewriter:
    """Rewrites a text/event-stream chunk by chunk: each complete event's data may be replaced.

    Used as mitmproxy's `response.stream` callable, so events reach the agent as they come (a long tool
    call's progress notifications are not buffered); only whole events are rewritten, and bytes of an
    event still incomplete wait for the next chunk. `extra` events are sent when the stream ends.

    One event may hold at most `max_event_bytes`: each is checked whole, so a server could otherwise
    make cedargate hold any amount. Past the cap the stream is refused: the agent gets, as the last
    event, a JSON-RPC error for each of `requests` (the ids it is still waiting on) saying why,
    nothing more of the server's stream is passed on, and `on_refused` is called (to end the exchange).
    Each chunk is searched once, so a long event costs its length, not its length squared.
    """

    def __init__(self, rewrite: Callable[[Any], Any | None], extra: Iterable[dict] = (), *,
                 max_event_bytes: int = DEFAULT_MAX_EVENT, requests: Iterable[Any] = (),
                 on_refused: Callable[[], None] | None = None) -> None:
        self._rewrite = rewrite
        self._extra = list(extra)
        self._max_event = max_event_bytes
        self._waiting = {_id_key(ident): ident for ident in requests}
        self._on_refused = on_refused
        self._pending = bytearray()  # the start of an event not complete yet
        self._searched = 0  # where in _pending the search for its end resumes
        self.refused = False

    def __call__(self, chunk: bytes) -> list[bytes]:
        """mitmproxy's stream contract: the bytes to send for `chunk` (b"" at the end of the stream).

        A list, empty when the chunk completes no event: mitmproxy sends each item as one piece of the
        body, and an empty piece to an HTTP/1.1 client is the chunk that ends the body.
        """
        out = self.feed(chunk)
        return [out] if out else []

    def feed(self, chunk: bytes) -> bytes:
        """What the agent gets for this chunk of the server's stream; b"" ends the stream."""
        if self.refused:
            return b""  # what follows a refused event is never checked, so never passed on
        if not chunk:
            return self._end()
        pending = self._pending
        pending += chunk
        out = bytearray()
        start = 0  # where the current event begins
        while True:
            end, size = _event_end(pending, self._searched)
            if end < 0:
                break
            if end - start > self._max_event:
                return bytes(out) + self._refuse()
            out += self._event(bytes(pending[start:end + size]))
            start = self._searched = end + size
        del pending[:start]
        # The last bytes may be the start of the blank line ("\r\n\r"), which is not the event's.
        if len(pending) > self._max_event + 3:
            return bytes(out) + self._refuse()
        # A blank line may straddle this chunk and the next: resume a few bytes back, never inside a CRLF.
        resume = max(0, len(pending) - 3)
        if resume and pending[resume - 1:resume + 1] == b"\r\n":
            resume -= 1
        self._searched = resume
        return bytes(out)

    def _end(self) -> bytes:
        tail, self._pending = bytes(self._pending), bytearray()
        end, size = _event_end(tail, 0, final=True)
        if 0 <= end <= self._max_event:  # a last event whose blank line came with the last chunk
            out = self._event(tail[:end + size])
        elif end > self._max_event:
            return self._refuse()
        else:
            out = b""
        # What is left is an event the stream ends inside, which a client never dispatches (HTML's
        # SSE rules). It is dropped, not passed on: unfiltered, or glued to cedargate's own answers.
        out += b"".join(_event_bytes(answer) for answer in self._extra)
        self._extra = []
        return out

    def _refuse(self) -> bytes:
        """The last events of a refused stream: an error for each request still waiting, then ours."""
        self.refused = True
        self._pending = bytearray()
        detail = (f"the server sent an event of more than {self._max_event} bytes (max_mcp_event_bytes); "
                  "cedargate checks each event whole, so it and the rest of the stream were not passed on. "
                  "Ask the server for less (a smaller page or result), or ask the operator to raise the cap")
        log.warning("refused an MCP event stream: %s", detail)
        problem = unreadable_problem(detail)
        # JSON-RPC 2.0: an error whose request cannot be named has a null id.
        waiting = list(self._waiting.values()) or [None]
        errors = [{"jsonrpc": "2.0", "id": ident, "error": {"code": REFUSED_CODE, "message": problem["title"]
                   + ": " + detail, "data": problem}} for ident in waiting]
        out = b"".join(_event_bytes(answer) for answer in [*errors, *self._extra])
        self._extra = []
        if self._on_refused is not None:
            self._on_refused()
        return out

    def _answered(self, parsed: Any) -> None:
        for item in parsed if isinstance(parsed, list) else [parsed]:
            if isinstance(item, dict) and "method" not in item and ("result" in item or "error" in item):
                self._waiting.pop(_id_key(item.get("id")), None)

    def _event(self, event: bytes) -> bytes:
        lines = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        data = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
        if not data:
            return event
        try:
            parsed = read_json(b"\n".join(data))
        except (ValueError, RecursionError):
            # Every message on an MCP stream is JSON; one that cannot be checked is not passed on.
            log.warning("dropped an MCP event that is not UTF-8 JSON")
            return b""
        try:
            rewritten = self._rewrite(parsed)
        except Exception:  # never pass on what could not be checked; the stream itself goes on
            log.exception("cannot check an MCP event; it is dropped")
            return b""
        self._answered(parsed)
        if rewritten is None:
            return event
        kept = [line for line in lines if line and not line.startswith(b"data:")]
        return b"\n".join(kept + [b"data: " + json.dumps(rewritten).encode()]) + b"\n\n"


# A line ending (CRLF, LF or a CR not starting a CRLF) followed by another: the blank line ending an event.
_BLANK_LINE = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")


def _event_end(buffer: bytes | bytearray, start: int = 0, final: bool = False) -> tuple[int, int]:
    """Where the first event's last line ends, searching from `start`, and the length of the line
    endings after it; -1 if the buffer holds no complete event yet. A CR at the very end may be the
    first half of a CRLF, so it waits for the next chunk unless the stream has ended."""
    found = _BLANK_LINE.search(buffer, start)
    if found is None or (not final and found.end() == len(buffer) and buffer.endswith(b"\r")):
        return -1, 0
    return found.start(), found.end() - found.start()
