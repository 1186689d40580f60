"""Helpers the core's unit tests share: building calls, editing watched files, reading the record.

Imported by plain name (pytest puts tests/proxy on sys.path, as there is no tests/__init__.py).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit

from proxy.calls.mapping import Call
from tests.support.waiting import wait_until  # noqa: F401  # re-exported: the core tests wait with it

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"
BUNDLED_IDS = frozenset(
    {"ops-read", "ops-delete-volumes", "ops-stop-instance", "protect-production-instances", "staging-after-hours",
     "no-volume-deletion", "finance-refunds", "large-refunds", "low-confidence-writes", "github-mcp-sessions",
     "github-tools",
     "no-repository-deletion", "no-repository-transfer", "no-merges-to-payments"}
)

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PG_CONNINFO = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def make_call(
    method: str,
    url: str,
    *,
    agent: str = "ops-bot",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> Call:
    """A `Call` as the enforcer builds it from a flow, from a plain URL."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}[parts.scheme]
    return Call(
        agent=agent,
        method=method,
        scheme=parts.scheme,
        host=parts.hostname or "",
        port=port,
        path=parts.path or "/",
        query=parts.query,
        headers=headers or {},
        body=body,
    )


def write_policy_file(path: Path, text: str) -> None:
    """Write a file the engine watches, making sure its (size, mtime) signature changes.

    The engine polls (name, size, mtime). Kernel timestamps are coarse (a few ms), so two writes of
    the same size inside one test could otherwise look identical; an editor saving seconds apart
    always differs. Pushing mtime forward reproduces the latter.
    """
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text, encoding="utf-8")
    new = max(path.stat().st_mtime_ns, old + 1_000_000_000)
    os.utime(path, ns=(new, new))


def sqlite_rows(db_path: Path, where: str = "1=1", params: tuple = ()) -> list[sqlite3.Row]:
    """Read the decision record straight from the file, as an operator's sqlite3 shell would."""
    con = sqlite3.connect(db_path)
    con.row_factory = sqlite3.Row
    try:
        return con.execute(f"SELECT * FROM decisions WHERE {where} ORDER BY id", params).fetchall()
    finally:
        con.close()


def pg_unreachable_reason() -> str | None:
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - psycopg is a declared dependency
        return f"psycopg is not installed: {exc}"
    try:
        psycopg.connect(PG_CONNINFO, connect_timeout=3).close()
    except Exception as exc:
        return f"PostgreSQL at 127.0.0.1:5432 (database test, user postgres) is unreachable: {exc}"
    return None


def rpc(method: str | None = None, *, id: object = 1, **params: object) -> dict:
    """A JSON-RPC request (or, with id=None, a notification)."""
    message: dict = {"jsonrpc": "2.0", "method": method}
    if id is not None:
        message["id"] = id
    if params:
        message["params"] = params
    return message


def tool_call(name: str, arguments: dict | None = None, *, id: object = 7, **extra: object) -> dict:
    """An MCP tools/call request; without `arguments` it carries none."""
    params = {"name": name, **extra}
    if arguments is not None:
        params["arguments"] = arguments
    return {"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params}
