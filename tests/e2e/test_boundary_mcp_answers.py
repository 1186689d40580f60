"""An MCP server's answers through the real proxy: what the agent gets, and that one server's answer
does not hold up everyone else's calls.

The real `cedargate run`, a loopback MCP-like server this test scripts byte by byte (event streams cut
where the test says, an unterminated event, a gzip bomb), and httpx as the agent over HTTP/1.1. Where
the server pauses, the test makes another call through the same proxy and sees it answered before the
server goes on: ordering, never wall time. A pause also makes sure the proxy has read what came before
(the other call's round trip goes through the same event loop) before the next piece is sent.
"""

from __future__ import annotations

import gzip
import json
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from e2e_support import REPO, start_cedargate, write_config

from tests.support.event_stream import sse_data
from tests.support.manifests import loopback_mcp_policies
from tests.support.waiting import wait_until

BUNDLED_POLICIES = REPO / "policies"

WAIT = 30  # seconds any one step may take before the test gives up (a bound, not a measurement)
UPSTREAM_ANSWER = "urn:cedargate:problem:upstream-answer"


def _sse_event(message: dict, end: bytes = b"\n\n") -> bytes:
    return b"data: " + json.dumps(message).encode() + end


def _result(ident, text: str) -> dict:
    return {"jsonrpc": "2.0", "id": ident, "result": {"content": [{"type": "text", "text": text}]}}


PROGRESS = {"jsonrpc": "2.0", "method": "notifications/progress",
            "params": {"progressToken": 1, "progress": 1}}
def _log(text: str) -> dict:
    return {"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": text}}


SPLIT_EVENTS = [
    _sse_event(PROGRESS),
    b"id: 2\n" + _sse_event(_log("two")),
    _sse_event(_log("three"), b"\r\n\r\n"),
    _sse_event(_log("four"), b"\r\n\r\n"),
    _sse_event(_result(1, "found 3 issues")),
]
# Where each event is cut: mid-line, between the two newlines, between the CR and LF of the blank line's
# CRLF, between the CR and LF of the last line's CRLF.
SPLIT_AT = [20, len(SPLIT_EVENTS[1]) - 1, len(SPLIT_EVENTS[2]) - 1, len(SPLIT_EVENTS[3]) - 3]
FLOOD_PAUSE = 512 * 1024  # sent before the server pauses: under the 1 MiB cap on one event
FLOOD_MAX = 8 * 1024 * 1024  # sent in all unless cedargate stops reading
BOMB_MIB = 64  # decoded size of the gzip bomb, MiB: past the 16 MiB cap on a whole answer


class ScriptedMcpServer(ThreadingHTTPServer):
    """POST /mcp: `ping` answers at once; `tools/call` search_issues answers as its query says: "split"
    (an event stream cut inside events), "flood" (an event that never ends), "bomb" (gzip JSON that
    decodes to 64 MiB). It pauses where the test must act, until released."""

    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.reached: queue.Queue[str] = queue.Queue()
        self._go: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.flood_sent = 0
        self.flood_cut = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                message = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.seen.append(message)
                if message["method"] == "ping":
                    self._whole("application/json", json.dumps({"jsonrpc": "2.0", "id": message["id"],
                                                                "result": {}}).encode())
                    return
                getattr(self, "_" + message["params"]["arguments"]["query"])(message["id"])

            def _whole(self, media: str, payload: bytes, coding: str | None = None) -> None:
                self.send_response(200)
                self.send_header("Content-Type", media)
                if coding:
                    self.send_header("Content-Encoding", coding)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _stream_start(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

            def _split(self, ident) -> None:
                self._stream_start()
                stream = b"".join(SPLIT_EVENTS)
                cuts, at = [], 0
                for event, cut in zip(SPLIT_EVENTS, SPLIT_AT, strict=False):
                    cuts.append(at + cut)
                    at += len(event)
                bounds = [0, *cuts, len(stream)]
                for n, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
                    self._chunk(stream[start:end])
                    if end != len(stream):
                        server.pause(f"split-{n}")
                self.wfile.write(b"0\r\n\r\n")

            def _flood(self, ident) -> None:
                self._stream_start()
                self._chunk(b'data: {"jsonrpc": "2.0", "id": %d, "result": {"content": [{"type": "text", '
                            b'"text": "' % ident)
                piece = b"A" * (64 * 1024)
                try:
                    while server.flood_sent < FLOOD_MAX:
                        if server.flood_sent == FLOOD_PAUSE:
                            server.pause("flood")
                        self._chunk(piece)
                        server.flood_sent += len(piece)
                    self._chunk(b'"}]}}\n\n')
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:  # cedargate closed the connection: it stopped reading the stream
                    server.flood_cut = True
                    self.close_connection = True

            def _bomb(self, ident) -> None:
                # A valid JSON-RPC answer, 64 MiB once decoded, in 64 gzip members (read one after another).
                text = gzip.compress(b"A" * (1024 * 1024))
                body = (gzip.compress(b'{"jsonrpc": "2.0", "id": %d, "result": {"content": [{"type": "text", '
                                      b'"text": "' % ident)
                        + text * BOMB_MIB + gzip.compress(b'"}]}}'))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2])
                server.pause("bomb")
                self.wfile.write(body[len(body) // 2:])

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    def _event(self, name: str) -> threading.Event:
        with self._lock:
            return self._go.setdefault(name, threading.Event())

    def pause(self, name: str) -> None:
        self.reached.put(name)
        if not self._event(name).wait(WAIT):
            raise TimeoutError(f"the test never released {name}")

    def wait_for(self, name: str, agent: threading.Thread | None = None) -> bool:
        """Wait until the server pauses at `name`; False if the agent's call ended first."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                if self.reached.get(timeout=0.1) == name:  # (a pause left by an earlier test is skipped)
                    return True
            except queue.Empty:
                if agent is not None and not agent.is_alive():
                    return False
        raise AssertionError(f"the server never got to {name}")

    def release(self, name: str) -> None:
        self._event(name).set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/mcp"


@pytest.fixture(scope="module")
def mcp() -> Iterator[ScriptedMcpServer]:
    server = ScriptedMcpServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    for name in ("flood", "bomb", *(f"split-{n}" for n in range(len(SPLIT_AT)))):
        server.release(name)
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def gate(tmp_path_factory, upstream):
    """One cedargate for the module (each test's calls are told apart by their order)."""
    tmp_path = tmp_path_factory.mktemp("gate")
    policy_dir = tmp_path / "policies"
    shutil.copytree(BUNDLED_POLICIES, policy_dir, ignore=shutil.ignore_patterns("tests"))
    loopback_mcp_policies(policy_dir)
    gate = start_cedargate(write_config(tmp_path / "c.yaml", policy_dir, tmp_path / "state", upstream))
    yield gate
    gate.stop()


def search(ident: int, scenario: str) -> dict:
    return {"jsonrpc": "2.0", "id": ident, "method": "tools/call",
            "params": {"name": "search_issues", "arguments": {"query": scenario}}}


class Agent(threading.Thread):
    """One agent's call through cedargate, read to its end in the background: the status, the headers,
    the body's bytes as they came, and how the body ended."""

    def __init__(self, gate, url: str, message: dict,
                 accept: str = "application/json, text/event-stream") -> None:
        super().__init__(daemon=True)
        self.gate, self.url, self.message, self.accept = gate, url, message, accept
        self.status: int | None = None
        self.headers: httpx.Headers | None = None
        self.body = b""
        self.ended: str | None = None  # "complete", or the error that ended the body
        self.start()

    def run(self) -> None:
        try:
            with httpx.Client(proxy=self.gate.proxy_url, timeout=WAIT) as http, \
                    http.stream("POST", self.url, json=self.message,
                                headers={"Accept": self.accept}) as answer:
                self.status, self.headers = answer.status_code, answer.headers
                for data in answer.iter_raw():
                    self.body += data
            self.ended = "complete"
        except httpx.HTTPError as exc:
            self.ended = repr(exc)

    def finished(self) -> str | None:
        self.join(WAIT)
        assert not self.is_alive(), "the agent's call did not end"
        return self.ended


def ping(gate, url: str, ident: int) -> httpx.Response:
    """Another call through the same proxy, on its own connection."""
    with httpx.Client(proxy=gate.proxy_url, timeout=WAIT) as http:
        return http.post(url, json={"jsonrpc": "2.0", "id": ident, "method": "ping"})


def tool_calls_recorded(gate, at_least: int = 0) -> list[tuple]:
    """The recorded tool calls (decision, upstream status), once there are `at_least` of them."""
    deadline = time.monotonic() + WAIT
    while True:  # the recorder writes in the background
        with sqlite3.connect(gate.database) as db:
            rows = db.execute("SELECT decision, upstream_status FROM decisions WHERE action = ? ORDER BY at",
                              ('Action::"call_tool"',)).fetchall()
        if len(rows) >= at_least or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def test_events_split_across_chunks_all_reach_an_http11_agent(gate, mcp):
    before = len(tool_calls_recorded(gate))
    agent = Agent(gate, mcp.url, search(1, "split"))
    for n in range(len(SPLIT_AT)):
        if not mcp.wait_for(f"split-{n}", agent):
            break  # the agent's answer ended early: what it got is checked below
        # The proxy has read the piece before this call's round trip ends (one event loop for both).
        assert ping(gate, mcp.url, 100 + n).json() == {"jsonrpc": "2.0", "id": 100 + n, "result": {}}
        mcp.release(f"split-{n}")
    assert agent.finished() == "complete"
    assert agent.status == 200 and agent.headers["content-type"] == "text/event-stream"
    assert sse_data(agent.body) == [json.loads(event.split(b"data: ", 1)[1]) for event in SPLIT_EVENTS]
    assert search(1, "split") in mcp.seen
    # The streamed answer's decision is recorded (when the stream starts), with the server's status.
    assert tool_calls_recorded(gate, before + 1)[before:] == [("allow", 200)]


def test_an_unterminated_oversized_event_is_refused_and_other_calls_go_on(gate, mcp):
    before = len(tool_calls_recorded(gate))
    agent = Agent(gate, mcp.url, search(1, "flood"))
    mcp.wait_for("flood")
    # Half a MiB of one event is held, unchecked; meanwhile another call gets its answer.
    assert ping(gate, mcp.url, 2).json() == {"jsonrpc": "2.0", "id": 2, "result": {}}
    assert agent.is_alive()  # the flooded stream is still open
    mcp.release("flood")
    agent.finished()
    assert agent.status == 200
    assert b"AAAA" not in agent.body  # not one byte of the event cedargate could not check
    [refusal] = sse_data(agent.body)
    assert refusal["id"] == 1 and refusal["error"]["data"]["type"] == UPSTREAM_ANSWER
    assert "more than 1048576 bytes" in refusal["error"]["data"]["detail"]
    # cedargate stopped reading the server: it could not send the rest of its 8 MiB.
    # The server learns of the cut at its next write past what the socket buffers hold: a moment later.
    wait_until(lambda: mcp.flood_cut or mcp.flood_sent >= FLOOD_MAX, "the flood to end")
    assert mcp.flood_cut and mcp.flood_sent < FLOOD_MAX
    assert ping(gate, mcp.url, 3).status_code == 200
    assert tool_calls_recorded(gate, before + 1)[before:] == [("allow", 200)]


def test_a_gzip_bomb_answer_is_refused_and_other_calls_go_on(gate, mcp):
    before = len(tool_calls_recorded(gate))
    agent = Agent(gate, mcp.url, search(1, "bomb"), accept="application/json")
    mcp.wait_for("bomb")
    assert ping(gate, mcp.url, 2).json() == {"jsonrpc": "2.0", "id": 2, "result": {}}
    assert agent.is_alive()
    mcp.release("bomb")
    assert agent.finished() == "complete"
    assert agent.status == 502 and agent.headers["content-type"] == "application/problem+json"
    problem = json.loads(agent.body)
    assert problem["type"] == UPSTREAM_ANSWER and problem["status"] == 502
    assert "larger than 16777216 bytes once its gzip coding is decoded" in problem["detail"]
    assert search(1, "bomb") in mcp.seen  # decided, forwarded; the server's answer is what was refused
    assert ping(gate, mcp.url, 3).status_code == 200
    # Recorded with what the server said (200), not the 502 cedargate made of it.
    assert tool_calls_recorded(gate, before + 1)[before:] == [("allow", 200)]
