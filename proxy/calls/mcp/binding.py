"""What an override for an MCP message binds to, and the tool call a reviewer is shown."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from proxy.calls.mcp.jsonrpc import read_message
from proxy.cedar.manifest import MCP_ACTIONS

log = logging.getLogger(__name__)

def binding_of(action: str, body: bytes) -> bytes | None:
    """What an override for an MCP message binds to: the message without its JSON-RPC id; None if not MCP."""
    if action not in MCP_ACTIONS:
        return None
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        return body
    return read_message(parsed, "the body").binding() if isinstance(parsed, dict) else body


def tool_call(cedar_request: Mapping[str, Any], body: bytes) -> dict[str, Any] | None:
    """For a reviewer: the tool an MCP call asks for and its arguments as sent; None for other calls."""
    context = cedar_request.get("context") or {}
    if cedar_request.get("action") != 'Action::"call_tool"' or "tool" not in context:
        return None
    try:
        arguments = json.loads(body)["params"].get("arguments") or {}
    except (ValueError, KeyError, TypeError, AttributeError):
        arguments = {}
    return {"server": context.get("server"), "name": context["tool"], "arguments": arguments}


