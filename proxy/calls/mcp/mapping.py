"""An MCP message as Cedar sees it: `call_tool` on a Tool, or `mcp_rpc` on the server."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from proxy.calls.mcp.jsonrpc import McpError, Message, check_routing_headers
from proxy.cedar.context import tool_hints
from proxy.cedar.manifest import AMBIGUOUS, TOOL_NAME, FieldError, FieldSpec, McpEndpointSpec, typed_value
from proxy.vocabulary.folds import fold_key

log = logging.getLogger(__name__)

UNCLASSIFIED = "unclassified"

# (server, tool) -> `context.hints` for a tool the manifest does not classify (`proxy.calls.mcp.hints`).
HintLookup = Callable[[str, str], dict[str, bool]]


@cache
def _body_field(kind: str) -> FieldSpec:
    """A tool argument typed as a body field of `kind` (validated once per type, not once per call)."""
    return FieldSpec.model_validate({"from": "body", "type": kind})


# The `params` keys the mapping reads, by method: a server that matches keys ignoring case (Go's
# encoding/json) reads "Arguments" or "URI" as these, which the policy would not have seen.
_TOOL_PARAMS = {"name": "name", "arguments": "arguments", "_meta": "_meta"}
_RESOURCE_PARAMS = {"uri": "uri"}
_PROMPT_PARAMS = {"name": "name"}


def _check_spelling(where: str, keys: Iterable[str], folds: Mapping[str, str], what: str) -> None:
    """Refuse a key that is not spelled as the name it folds to (`folds`: fold -> name)."""
    for key in keys:
        exact = folds.get(fold_key(key))
        if exact == AMBIGUOUS:
            raise McpError(f"{where}: {what} {key!r} is one name to servers that match keys ignoring case with "
                           "other spellings the policies read, so it could be decided as another name than "
                           "the server binds; make the policies read it one way")
        if exact is not None and exact != key:
            raise McpError(f"{where}: {what} {key!r} is {exact!r} to servers that match keys ignoring case, "
                           f"but would not be decided as {exact!r}; spell it {exact!r}")


def _never_listed(server: str, tool: str) -> dict[str, bool]:
    return tool_hints(None)


@dataclass(frozen=True)
class McpMapping:
    """A message as Cedar sees it: the action, the resource and what joins the context."""

    action: str
    resource: tuple[str, str]
    context: dict[str, Any]


def map_message(endpoint: McpEndpointSpec, http_method: str, message: Message | None,
                to_cedar: Callable[[Any], Any], headers: Mapping[str, str] | None = None,
                argument_types: Mapping[str, str] | None = None, hints: HintLookup | None = None,
                argument_folds: Mapping[str, str] | None = None,
                nested_folds: Mapping[tuple[str, ...], Mapping[str, str]] | None = None) -> McpMapping:
    """Map one message on `endpoint` (None for the GET/DELETE that carry none).

    Raises McpError when it cannot be mapped and LookupError when it names a tool the endpoint
    refuses as unknown. `to_cedar` turns parsed JSON into Cedar values (the HTTP mapping's rules).
    `argument_folds` is `Manifest.argument_folds`: an argument spelled in another case of a declared
    name, or of one the policies read, is refused; `nested_folds` (`Manifest.nested_argument_folds`)
    does the same for the keys the policies read inside an argument's record, at any depth.
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
        if message.method.startswith("resources/"):
            _check_spelling(message.method, params, _RESOURCE_PARAMS, "params key")
            if isinstance(params.get("uri"), str):
                context["uri"] = params["uri"]
        if message.method == "prompts/get":
            _check_spelling(message.method, params, _PROMPT_PARAMS, "params key")
            if isinstance(params.get("name"), str):
                context["prompt"] = params["name"]
        return McpMapping("mcp_rpc", ("McpServer", server), context)
    params = message.params
    _check_spelling("tools/call", params, _TOOL_PARAMS, "params key")
    tool = params.get("name")
    if not isinstance(tool, str) or not TOOL_NAME.match(tool):
        raise McpError("tools/call names no tool, or one that is not 1 to 128 letters, digits, _ . or -")
    arguments = params.get("arguments", {})
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
    # Every tool's declared names, not only this tool's: as with the types below, a policy may read a
    # name for any tool (the schema has one ToolArguments), and the server may bind it in any tool.
    _check_spelling(f"tools/call {tool}", arguments, argument_folds or {}, "argument")
    for path, folds in (nested_folds or {}).items():
        # Each record on the way is reached by its one right spelling: any other was refused a level up.
        record: Any = arguments
        for key in path:
            record = record.get(key) if isinstance(record, dict) else None
        if isinstance(record, dict):
            _check_spelling(f"tools/call {tool}", record, folds, f"key of argument {'.'.join(path)!r}")
    cedar_arguments = to_cedar(arguments)
    declared = spec.arguments if spec is not None else {}
    for name, argument in declared.items():
        if argument.required and (name not in arguments or arguments[name] is None):
            raise McpError(f"tools/call {tool}: argument {name!r} is required by actions.yaml")
    # The schema gives an argument name one type for every tool, so a name declared for any tool is
    # typed (or refused) in every tool's call: a policy never compares a value of another type. The
    # call's own arguments are walked, not every name the manifest declares: a call has a few.
    types = argument_types or {}
    for name, value in arguments.items():
        if value is None:
            continue
        own = declared.get(name)
        kind = own.type if own is not None else types.get(name)
        if kind is None:
            continue
        try:
            cedar_arguments[name] = typed_value(name, _body_field(kind), value)
        except FieldError as exc:
            raise McpError(f"tools/call {tool}: {exc}") from None
    context.update(
        tool=tool, arguments=cedar_arguments,
        severity=spec.severity if spec else UNCLASSIFIED, reversible=spec.reversible if spec else False,
    )
    if spec is None:
        # Only where the manifest is silent: its classification always wins over the server's word.
        context["hints"] = (hints or _never_listed)(server, tool)
    return McpMapping("call_tool", ("Tool", f"{server}/{tool}"), context)

