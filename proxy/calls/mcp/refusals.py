"""Answering for a refused MCP message the way a client can show it to its model."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from proxy.calls.mcp.jsonrpc import Message

log = logging.getLogger(__name__)

# JSON-RPC reserves -32000..-32099 for implementation-defined server errors.
REFUSED_CODE = -32003


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
