"""Entities and parents Cedar sees that no file lists."""

from __future__ import annotations

from typing import Any


def implicit_parents(uid: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    """Parents an entity has whether or not entities.json lists it: an MCP tool is in its server, so
    `resource in McpServer::"github"` holds for Tool::"github/search_issues"."""
    return (("McpServer", uid[1].split("/", 1)[0]),) if uid[0] == "Tool" else ()


def bare_entity(uid: tuple[str, str]) -> dict[str, Any]:
    """The entity an agent or host unlisted in entities.json gets: its implicit parents, no tags, so
    `resource.tags.contains(...)` is false for it rather than an error that would deny everything."""
    attrs: dict[str, list[str]] = {"tags": []} if uid[0] == "Host" else {}
    parents = [{"type": t, "id": i} for t, i in implicit_parents(uid)]
    return {"uid": {"type": uid[0], "id": uid[1]}, "attrs": attrs, "parents": parents}
