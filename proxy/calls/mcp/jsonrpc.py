"""JSON-RPC 2.0 on an MCP endpoint: the messages one HTTP exchange carries, read strictly."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.vocabulary.canonical import Form, canonical
from proxy.vocabulary.folds import fold_key

log = logging.getLogger(__name__)

MAX_BATCH = 64  # messages in one JSON-RPC batch; more is refused, not truncated
MAX_METHOD = 256
# A message's own keys. Servers that match keys ignoring case (Go's encoding/json) read "Params" or "ID"
# as these, where cedargate would see no params (or a notification).
_MESSAGE_KEYS = frozenset({"jsonrpc", "id", "method", "params", "result", "error"})


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
        return canonical(bound, Form.ASCII)  # hashed into override fingerprints: see Form

    @property
    def name(self) -> str | None:
        """What the message's method acts on, as the Mcp-Name header repeats it: a name or a URI."""
        params = self.params
        for key in ("name", "uri"):
            if isinstance(value := params.get(key), str):
                return value
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
        return [read_message(item, f"batch item {i}") for i, item in enumerate(parsed)], True
    return [read_message(parsed, "the body")], False


def read_message(item: Any, where: str) -> Message:
    if not isinstance(item, dict) or item.get("jsonrpc") != "2.0":
        raise McpError(f"{where} is not a JSON-RPC 2.0 message (an object with \"jsonrpc\": \"2.0\")")
    for key in item:
        if key not in _MESSAGE_KEYS and fold_key(key) in _MESSAGE_KEYS:
            raise McpError(f"{where} has {key!r}, which servers that match keys ignoring case read as "
                           f"{fold_key(key)!r}; spell it {fold_key(key)!r}")
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
    answers: tuple[dict[str, Any], ...] = ()

