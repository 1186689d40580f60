"""What the addons' tests share: the test agent's credential, building flows, reading the record.

Imported by plain name (pytest puts tests/addons on sys.path, as there is no tests/__init__.py).
"""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit

from mitmproxy import http
from mitmproxy.test import tflow

REPO = Path(__file__).resolve().parents[2]
AGENT, TOKEN = "ops-bot", "addon-test-token-7d1e"
TOKEN_SHA256 = hashlib.sha256(TOKEN.encode()).hexdigest()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def make_flow(method: str, url: str, **kwargs) -> http.HTTPFlow:
    """A live flow for an agent's request, as mitmproxy hands it to addons; kwargs go to `tflow.tflow`."""
    headers = kwargs.pop("headers", {})
    if not any(name.lower() == "host" for name in headers):
        headers = {"Host": urlsplit(url).netloc, **headers}  # as every HTTP/1.1 client sends it
    content = kwargs.pop("content", b"")
    return tflow.tflow(req=http.Request.make(method, url, content, headers), **kwargs)


def record_rows(db_path: Path) -> list[dict]:
    """The decision record, read straight from the SQLite file as an operator's sqlite3 shell would."""
    con = sqlite3.connect(db_path)
    con.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in con.execute("SELECT * FROM decisions ORDER BY id")]
    finally:
        con.close()


def fire(tctx, addon, hook) -> None:
    """One hook on one addon as mitmproxy's addon manager calls it: awaited when async; errors propagate."""
    tctx.master.event_loop.run_until_complete(tctx.master.addons.invoke_addon(addon, hook))
