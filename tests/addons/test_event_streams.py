"""MCP event streams through mitmproxy's real HTTP layers, in process: an event that is large or lists
tools is read in a worker thread while the event loop serves other calls, and the agent gets every event
of the stream, in order, filtered as before (review finding 2 of 2026-12-02).

A real `Runtime` under the lean master `cedargate run` proxies with (`proxy.cli.master.proxy_master`), on
an event loop in a thread of its own; a loopback MCP server streaming what the test says; httpx as the
agent. The tool filter is made to wait, while it filters, until another call has gone through the same
proxy: were the filtering on the event loop, that call could not be answered. Ordering, not wall time.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from addon_support import AGENT, TOKEN, TOKEN_SHA256

from proxy.calls.connections import open_file_limit
from proxy.cli.fronts import mitmproxy_options
from proxy.cli.master import listening_socket, proxy_master
from proxy.decision.gate import Gate
from proxy.runtime import Runtime
from proxy.settings.config import AgentCredential, Listen
from tests.support.event_stream import sse_data
from tests.support.manifests import loopback_mcp_policies
from tests.support.runtime import started_runtime

WAIT = 30  # seconds any one step may take before the test gives up (a bound, not a measurement)
HIDDEN = 5000  # tools the manifest does not list, in one event of some 310 KB


PROGRESS = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}}
TOOLS = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [
    *({"name": f"not_in_manifest_{i}", "description": "x" * 10} for i in range(HIDDEN)), {"name": "search_issues"}]}}
SHOWN = {**TOOLS, "result": {"tools": [{"name": "search_issues"}]}}
LOG = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "listed"}}


class StreamingMcpServer(ThreadingHTTPServer):
    """POST /mcp: `ping` answered at once in JSON; `tools/list` as an event stream of a progress
    notification, the tool list and a log message, each event its own chunk."""

    daemon_threads = True

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if request["method"] == "ping":
                    body = json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": {}}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for event in (PROGRESS, TOOLS, LOG):
                    data = b"data: " + json.dumps(event).encode() + b"\n\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/mcp"


@pytest.fixture
def mcp() -> Iterator[StreamingMcpServer]:
    server = StreamingMcpServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def policy_dir(policy_dir: Path) -> Path:
    """The bundled policies with an MCP server on loopback, the one this test runs."""
    return loopback_mcp_policies(policy_dir)


@pytest.fixture
def runtime(policy_dir: Path, tmp_path: Path) -> Iterator[Runtime]:
    with started_runtime(policy_dir, tmp_path / "state", proxy=Listen(host="127.0.0.1", port=0),
                         agents={AGENT: AgentCredential(token_sha256=TOKEN_SHA256)}) as runtime:
        yield runtime


@contextmanager
def proxy_serving(runtime: Runtime) -> Iterator[tuple[str, int]]:
    """cedargate's proxy on loopback, on an event loop in a thread of its own: its URL with the agent's
    credentials, and that thread's id."""
    sock = listening_socket(runtime.settings)
    started = threading.Event()
    running: dict[str, Any] = {}

    async def serve() -> None:
        running["loop"], running["thread"] = asyncio.get_running_loop(), threading.get_ident()
        running["master"] = proxy_master(runtime, open_file_limit(), sock, mitmproxy_options(runtime.settings))
        started.set()
        await running["master"].run()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(WAIT), "the proxy did not start"
    try:
        yield f"http://{AGENT}:{TOKEN}@127.0.0.1:{sock.getsockname()[1]}", running["thread"]
    finally:
        running["loop"].call_soon_threadsafe(running["master"].shutdown)
        thread.join(WAIT)
        sock.close()


def test_a_large_tool_list_event_is_filtered_off_the_event_loop_and_the_stream_keeps_its_order(
        runtime, mcp, monkeypatch):
    filtering, other_call_answered = threading.Event(), threading.Event()
    filtered_in: list[int] = []
    visible_tools = Gate.visible_tools

    def waiting_filter(self: Gate, call: Any, names: Any) -> set[str]:
        names = list(names)
        if len(names) > HIDDEN:
            filtered_in.append(threading.get_ident())
            filtering.set()
            # Returns only once another call went through the proxy: never, were this on its event loop.
            if not other_call_answered.wait(WAIT):
                raise AssertionError("no other call was answered while the tool list was filtered")
        return visible_tools(self, call, names)

    monkeypatch.setattr(Gate, "visible_tools", waiting_filter)
    with proxy_serving(runtime) as (proxy_url, loop_thread), httpx.Client(proxy=proxy_url, timeout=WAIT) as agent:
        answer: dict[str, Any] = {}

        def list_tools() -> None:
            with httpx.Client(proxy=proxy_url, timeout=WAIT) as http:
                reply = http.post(mcp.url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                                  headers={"Accept": "application/json, text/event-stream"})
                answer.update(status=reply.status_code, body=reply.content)

        listing = threading.Thread(target=list_tools, daemon=True)
        listing.start()
        assert filtering.wait(WAIT), "the tool list was never filtered"
        ping = agent.post(mcp.url, json={"jsonrpc": "2.0", "id": 2, "method": "ping"})
        assert ping.json() == {"jsonrpc": "2.0", "id": 2, "result": {}}
        other_call_answered.set()
        listing.join(WAIT)
    assert filtered_in and filtered_in[0] != loop_thread
    assert answer["status"] == 200
    assert sse_data(answer["body"]) == [PROGRESS, SHOWN, LOG]
