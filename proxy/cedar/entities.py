"""Entities and parents Cedar sees that no file lists."""

from __future__ import annotations


def implicit_parents(uid: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    """Parents an entity has whether or not entities.json lists it: an MCP tool is in its server, so
    `resource in McpServer::"github"` holds for Tool::"github/search_issues"."""
    return (("McpServer", uid[1].split("/", 1)[0]),) if uid[0] == "Tool" else ()

