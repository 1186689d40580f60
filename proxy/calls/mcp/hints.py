"""What MCP servers say of their own tools (`annotations` in a tools/list answer), kept for policy.

A server's `tools/list` answer may annotate each tool with `readOnlyHint`, `destructiveHint`,
`idempotentHint` and `openWorldHint`. cedargate reads them from the answers that pass through it (JSON or
event stream, whichever request they answer), never asking the server itself, and a `tools/call` of a
tool the action manifest does not classify gets them as `context.hints`. The MCP specification calls
them hints that a client must not trust from an untrusted server, so they count only one way:

- the manifest's classification always wins: a tool it lists never has `context.hints`;
- a hint the server did not give is MCP's default, the most cautious reading; a tool whose listing was
  never seen here has all the defaults (`listed: false`), so an agent cannot dodge a policy on the hints
  by not listing the tools, or by calling before a restarted proxy saw a list;
- the call is decided with and without `context.hints` and the stricter answer stands (the engine does
  it for every `advisory` attribute, see `proxy.cedar.context`): a hint can make a call escalate or be
  refused, and never let through a call that policy without the hint would not let through.

Memory is bounded: at most `MAX_TOOLS` tools a server, the least recently listed forgotten first (it is
then "never listed", the cautious case), for the servers the manifest names with `unknown_tools: policy`
(elsewhere an unclassified tool is refused, so its hints are never read). Each process keeps its own:
a worker of `--workers N` that has not seen a list decides with the defaults. How many tools each keeps
is in the metrics the processes share, which is how the supervisor's /status says what its workers keep
(`kept_by`).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from proxy.cedar.context import tool_hints
from proxy.cedar.manifest import TOOL_NAME
from proxy.observe import metrics

log = logging.getLogger(__name__)

MAX_TOOLS = 1024  # per server: a hostile server listing millions of tools cannot grow memory


class ToolHints:
    """The hints each MCP server last gave for its tools, by server name (the manifest's)."""

    def __init__(self, max_tools: int = MAX_TOOLS) -> None:
        self.max_tools = max_tools
        self._servers: dict[str, OrderedDict[str, dict[str, bool]]] = {}
        self._lock = threading.Lock()

    def observe(self, server: str, answer: Any, classified: Iterable[str] = ()) -> int:
        """Keep the annotations of every tool listed in `answer` (one JSON-RPC message or a batch) that
        is not in `classified`; returns how many tools were seen."""
        skip = frozenset(classified)
        seen: list[tuple[str, dict[str, bool]]] = []
        for item in answer if isinstance(answer, list) else [answer]:
            result = item.get("result") if isinstance(item, dict) else None
            tools = result.get("tools") if isinstance(result, dict) else None
            if not isinstance(tools, list):
                continue
            for tool in tools:
                name = tool.get("name") if isinstance(tool, dict) else None
                if isinstance(name, str) and TOOL_NAME.match(name) and name not in skip:
                    seen.append((name, tool_hints(tool.get("annotations") or {})))
        if not seen:
            return 0
        with self._lock:
            known = self._servers.setdefault(server, OrderedDict())
            for name, hints in seen[-self.max_tools:]:
                known[name] = hints
                known.move_to_end(name)
            while len(known) > self.max_tools:
                known.popitem(last=False)
            kept = len(known)
        metrics.tool_hints_kept(server, kept)
        return len(seen)

    def of(self, server: str, tool: str) -> dict[str, bool]:
        """`context.hints` for the tool: as last listed, or MCP's defaults (`listed: false`) if never."""
        with self._lock:
            known = self._servers.get(server)
            hints = known.get(tool) if known is not None else None
        return dict(hints) if hints is not None else tool_hints(None)

    def known(self) -> dict[str, int]:
        """How many tools each server's hints are kept for (for /status)."""
        with self._lock:
            return {server: len(tools) for server, tools in self._servers.items()}


def kept_by(pids: Iterable[int]) -> dict[str, int] | None:
    """How many tools' hints the processes `pids` keep, by server: the most any of them keeps (each keeps
    the lists that passed through it), read from the metrics they share (`cedargate run --workers N`);
    None when values are not shared. A process that is gone keeps nothing."""
    if metrics.shared_directory() is None:
        return None
    kept: dict[str, int] = {}
    for samples in metrics.by_process(("cedargate_mcp_tool_hints",), pids).values():
        for (_name, labels), tools in samples.items():
            server = dict(labels).get("server", "")
            kept[server] = max(kept.get(server, 0), int(tools))
    return kept
