"""Answering for a refused MCP message the way a client can show it to its model."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from proxy.calls.mcp.jsonrpc import Message
from proxy.vocabulary.problems import Problem

log = logging.getLogger(__name__)

# JSON-RPC reserves -32000..-32099 for implementation-defined server errors.
REFUSED_CODE = -32003


# -- answering for a refused message --------------------------------------------------------------------

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
    known = Problem.of_type(str(problem.get("type", "")))
    if known is not None:
        lines.append(known.entry.step_for_model)
    lines.append(f"Decision id: {problem.get('decision_id')}.")
    return "\n".join(lines)


def refusal_answer(problem: Mapping[str, Any], message: Message) -> dict[str, Any]:
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
