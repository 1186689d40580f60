"""Tool lists filtered so an agent does not see tools that policy hard-denies to it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)


def filter_tool_list(answer: Any, visible: Callable[[Iterable[str]], set[str]]) -> Any | None:
    """The answer with hidden tools removed from every tool list in it, or None if nothing changed.

    Every result carrying a `tools` list is filtered, whichever request it answers: a server may replay
    an earlier tools/list answer on its GET stream (resumption), or echo an id in another type.
    """
    items = answer if isinstance(answer, list) else [answer]
    changed = False
    for item in items:
        result: Any = item.get("result") if isinstance(item, dict) else None
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


