"""MCP tool calls through the real proxy, with the official MCP SDK's client and server on loopback.

The SDK peers (tests/e2e/mcp_peers) run in their own virtualenv, `.venv-mcp`, as real agents and MCP
servers do; the agent is pointed at cedargate with HTTP_PROXY. What the agent prints is what its model
would see; the server's call log says what really reached the tool.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from e2e_support import APPROVERS, REPO, start_cedargate, write_config

from tests.support.manifests import use_manifest

PEERS = REPO / "tests" / "e2e" / "mcp_peers"
PEER_PYTHON = REPO / ".venv-mcp" / "bin" / "python"

MANIFEST = {"hosts": [{"host": "127.0.0.1", "mcp": [{
    "path": "/mcp", "server": "github", "tools": {
        "search_issues": {"severity": "low"},
        "delete_repository": {"severity": "critical", "reversible": False, "arguments": {"repo": {}}},
        "refund": {"severity": "high", "reversible": False,
                   "arguments": {"order_id": {}, "amount": {"type": "Decimal"}}},
        "shutdown_cluster": {"severity": "critical", "arguments": {"cluster": {}}},
    },
}]}]}

POLICIES = """
@id("github-mcp-sessions")
permit (principal in Team::"ops", action == Action::"mcp_rpc", resource == McpServer::"github");

@id("github-tools")
permit (principal in Team::"ops", action == Action::"call_tool", resource in McpServer::"github");

@id("no-repository-deletion")
@reason("Deleting a repository loses its history for good.")
@escalate("security")
forbid (principal, action == Action::"call_tool", resource == Tool::"github/delete_repository");

@id("no-cluster-shutdown")
@reason("Agents never shut clusters down.")
forbid (principal, action == Action::"call_tool", resource == Tool::"github/shutdown_cluster");

@id("large-refunds")
@reason("Refunds over 500 need a security reviewer.")
@escalate("security")
forbid (principal, action == Action::"call_tool", resource == Tool::"github/refund")
when { context.arguments has amount && context.arguments.amount.greaterThan(decimal("500.0")) };
"""

pytestmark = pytest.mark.skipif(not PEER_PYTHON.exists(), reason="the MCP peers' venv is built by `make test`")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class McpServer:
    url: str
    log: Path

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def _start_server(tmp_path: Path, *flags: str) -> Iterator[McpServer]:
    port = _free_port()
    log = tmp_path / "mcp-server.log"
    process = subprocess.Popen(
        [str(PEER_PYTHON), str(PEERS / "server.py"), "--port", str(port), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "MCP_SERVER_LOG": str(log)},
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("READY"), f"MCP server did not start: {line!r}"
        yield McpServer(line.split()[1], log)
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(params=["sse", "json"])
def mcp_server(request, tmp_path) -> Iterator[McpServer]:
    """The SDK's server, answering with event streams (its default) or with plain JSON."""
    yield from _start_server(tmp_path, *(["--json-response"] if request.param == "json" else []))


def _start_gate(tmp_path, policy_dir, upstream, policies: str = POLICIES):
    use_manifest(policy_dir, MANIFEST, policies)
    return start_cedargate(write_config(tmp_path / "c.yaml", policy_dir, tmp_path / "state", upstream,
                                        hold_max_wait=30))


@pytest.fixture
def gate(tmp_path, policy_dir, upstream):
    gate = _start_gate(tmp_path, policy_dir, upstream)
    yield gate
    gate.stop()


def run_agent(gate, url: str, steps: list[dict], *headers: str, protocol: str = "auto",
              timeout: float = 40, session_breaks: bool = False) -> list[dict]:
    """Run the SDK agent through cedargate; its output lines before "done" (or all, if the session broke)."""
    args = [str(PEER_PYTHON), str(PEERS / "agent.py"), "--url", url, "--steps", json.dumps(steps),
            "--protocol", protocol, "--timeout", str(timeout)]
    for header in headers:
        args += ["--header", header]
    finished = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 30,
                              env={**os.environ, "HTTP_PROXY": gate.proxy_url, "NO_PROXY": ""})
    lines = [json.loads(line) for line in finished.stdout.splitlines() if line.startswith("{")]
    if session_breaks:
        assert finished.returncode == 3 and lines[-1]["op"] == "session", finished.stdout
        return lines
    assert lines and lines[-1] == {"op": "done"}, f"agent broke (exit {finished.returncode}):\n" \
        f"{finished.stdout}\n{finished.stderr[-3000:]}"
    return lines[:-1]


def _decisions(gate) -> list[tuple[str, str, str]]:
    deadline = time.monotonic() + 10
    while True:  # the recorder writes in the background; wait for the rows it has queued
        with sqlite3.connect(gate.database) as db:
            rows = db.execute("SELECT action, resource, decision FROM decisions ORDER BY at").fetchall()
        if any(r[0] == 'Action::"call_tool"' for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


@pytest.mark.parametrize("protocol", ["legacy", "modern"])
def test_tool_calls_are_decided_and_hard_denied_tools_are_hidden(gate, mcp_server, protocol):
    steps = [
        {"op": "list_tools"},
        {"op": "call_tool", "name": "search_issues", "arguments": {"query": "flaky"}},
        {"op": "call_tool", "name": "shutdown_cluster", "arguments": {"cluster": "eu-1"}},
        {"op": "call_tool", "name": "refund", "arguments": {"order_id": "A1", "amount": 120.5}},
    ]
    listed, search, shutdown, refund = run_agent(gate, mcp_server.url, steps, protocol=protocol)

    # The hard-denied tool is not offered; the escalatable one is (a human may allow it).
    assert listed["tools"] == ["search_issues", "delete_repository", "refund"]
    assert search["is_error"] is False and search["text"] == "found 3 issues for flaky"
    assert refund["is_error"] is False and refund["text"] == "refunded 120.5 EUR on A1"
    # The denial reaches the model as a tool error it can read; the session goes on.
    assert shutdown["is_error"] is True
    assert "shutdown_cluster" in shutdown["text"] and "Agents never shut clusters down." in shutdown["text"]
    assert "do not retry" in shutdown["text"]
    assert shutdown["meta"]["cedargate/problem"]["policies"][0]["id"] == "no-cluster-shutdown"
    assert [c.split()[0] for c in mcp_server.calls()] == ["search_issues", "refund"]
    recorded = _decisions(gate)
    assert ('Action::"call_tool"', 'Tool::"github/shutdown_cluster"', "deny") in recorded
    assert ('Action::"call_tool"', 'Tool::"github/search_issues"', "allow") in recorded
    # The audit log says what each MCP message was, which method and path ("POST /mcp") do not.
    with sqlite3.connect(gate.database) as db:
        payloads = [json.loads(p) for (p,) in db.execute("SELECT payload FROM audit_log WHERE kind = 'decision'")]
    details = [p["detail"] for p in payloads if "detail" in p]
    assert {"server": "github", "rpc_kind": "request", "rpc_method": "tools/call",
            "tool": "shutdown_cluster"} in details
    opening = "initialize" if protocol == "legacy" else "server/discover"
    assert any(d["rpc_method"] == opening and "tool" not in d for d in details)


def _approve(gate, override_id: str, approver: str = "sam") -> httpx.Response:
    token = APPROVERS[approver][0]
    return httpx.post(f"{gate.api_url}/overrides/{override_id}/approve", json={"reason": "checked with the owner"},
                      headers={"Authorization": f"Bearer {token}"}, timeout=10)


def _pending(gate, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = httpx.get(f"{gate.api_url}/overrides", params={"status": "pending"},
                          headers={"Authorization": f"Bearer {APPROVERS['sam'][0]}"}, timeout=10).json()
        if found["items"] if isinstance(found, dict) else found:
            items = found["items"] if isinstance(found, dict) else found
            return items[0]
        time.sleep(0.1)
    raise AssertionError("no override request appeared")


def test_escalated_tool_call_is_held_and_released_once_when_granted(gate, mcp_server):
    steps = [{"op": "call_tool", "name": "delete_repository", "arguments": {"repo": "acme/old-site"}}]
    outcome: list = []
    agent = threading.Thread(target=lambda: outcome.append(run_agent(
        gate, mcp_server.url, steps, "X-Agent-Justification: the repository was archived in 2019", protocol="legacy")))
    agent.start()
    try:
        pending = _pending(gate)
        shown = httpx.get(f"{gate.api_url}/overrides/{pending['id']}",
                          headers={"Authorization": f"Bearer {APPROVERS['sam'][0]}"}, timeout=10).json()
        # The reviewer sees which tool, with which arguments, and why the agent wants it.
        assert shown["tool_call"] == {"server": "github", "name": "delete_repository",
                                      "arguments": {"repo": "acme/old-site"}}
        # ...and at a glance, as the list shows it too: not "POST .../mcp" like every other MCP call.
        assert (shown["tool"], shown["key_arguments"]) == ("delete_repository", {"repo": "acme/old-site"})
        assert (shown["severity"], shown["reversible"], shown["roles_needed"]) == ("critical", False, ["security"])
        assert shown["justification"] == "the repository was archived in 2019"
        assert mcp_server.calls() == []  # held: nothing reached the server yet
        assert _approve(gate, pending["id"]).status_code == 200
    finally:
        agent.join(60)
    [[deleted]] = outcome
    assert deleted["is_error"] is False and deleted["text"] == "deleted acme/old-site"
    assert mcp_server.calls() == ['delete_repository {"repo": "acme/old-site"}']


def test_pending_answer_names_the_override_and_the_identical_retry_is_released(gate, mcp_server):
    refund = {"op": "call_tool", "name": "refund", "arguments": {"order_id": "B7", "amount": 900}}
    # The agent will not wait: the proxy answers at once that a human is reviewing the call.
    [first] = run_agent(gate, mcp_server.url, [refund], "Prefer: wait=0")
    assert first["is_error"] is True
    problem = first["meta"]["cedargate/problem"]
    assert problem["type"] == "urn:cedargate:problem:override-pending" and problem["required_roles"] == ["security"]
    assert problem["override_id"] in first["text"] and "Retry the identical call" in first["text"]
    assert mcp_server.calls() == []

    assert _approve(gate, problem["override_id"]).status_code == 200
    # A new session and a new JSON-RPC id: the same tool call with the same arguments is released, once.
    [second, third] = run_agent(gate, mcp_server.url, [refund, refund], "Prefer: wait=0")
    assert second["is_error"] is False and second["text"] == "refunded 900.0 EUR on B7"
    assert third["is_error"] is True  # the grant was for one call
    assert third["meta"]["cedargate/problem"]["type"] == "urn:cedargate:problem:override-pending"
    assert mcp_server.calls() == ['refund {"order_id": "B7", "amount": 900.0, "currency": "EUR"}']


@pytest.mark.parametrize("protocol", ["legacy", "modern"])
def test_bad_agent_statement_is_refused_with_a_readable_reason(gate, mcp_server, protocol):
    call = {"op": "call_tool", "name": "search_issues", "arguments": {"query": "x"}}
    # The agent sends the header on every request, so cedargate refuses to open its session at all,
    # with a JSON-RPC error the SDK shows as it is, not a bare HTTP status.
    [broken] = run_agent(gate, mcp_server.url, [call], "X-Agent-Confidence: very", protocol=protocol,
                         session_breaks=True)
    assert "X-Agent-Confidence must be a number from 0 to 1" in broken["exception"]
    assert "Call cannot be checked" in broken["exception"]
    assert mcp_server.calls() == []


class _BatchServer(ThreadingHTTPServer):
    """A JSON-RPC server that takes batches (the SDK no longer sends them, but agents and servers may)."""

    def __init__(self) -> None:
        self.bodies: list = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                answers = [server.answer(m) for m in (body if isinstance(body, list) else [body]) if "id" in m]
                payload = json.dumps(answers if isinstance(body, list) else answers[0]).encode() if answers else b""
                self.send_response(200 if answers else 202)  # notifications only: accepted, no answer
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @staticmethod
    def answer(message: dict) -> dict:
        if message["method"] == "tools/list":
            tools = [{"name": n, "inputSchema": {"type": "object"}} for n in
                     ("search_issues", "shutdown_cluster", "delete_repository", "unlisted_tool")]
            return {"jsonrpc": "2.0", "id": message["id"], "result": {"tools": tools}}
        text = f"ran {message['params']['name']}"
        return {"jsonrpc": "2.0", "id": message["id"], "result": {"content": [{"type": "text", "text": text}]}}


def test_batch_is_decided_message_by_message(gate):
    server = _BatchServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/mcp"

    def tool(i, name, **arguments):
        return {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": name, "arguments": arguments}}

    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        tool(2, "search_issues", query="x"),
        tool(3, "shutdown_cluster", cluster="eu-1"),
        tool(4, "delete_repository", repo="acme/a"),
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}},
    ]
    refused_only = [tool(5, "shutdown_cluster", cluster="us-1"), tool(6, "unlisted_tool")]
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 2, "progress": 1}}
    try:
        with httpx.Client(proxy=gate.proxy_url, timeout=30) as http:
            answered = http.post(url, json=batch, headers={"Accept": "application/json, text/event-stream"})
            all_refused = http.post(url, json=refused_only)
            accepted = http.post(url, json=[progress, tool(7, "shutdown_cluster", cluster="ap-1")])
    finally:
        server.shutdown()
    # The server accepted the notification (202); the refused call still gets its answer.
    assert accepted.status_code == 200 and [a["id"] for a in accepted.json()] == [7]
    with sqlite3.connect(gate.database) as db:
        deadline = time.monotonic() + 10
        # Forwarded mcp_rpc messages: the tools/list and the notification of the first batch, then this one.
        while len(rows := db.execute("SELECT upstream_status FROM decisions WHERE action = ? AND "
                                     "upstream_status IS NOT NULL ORDER BY at", ('Action::"mcp_rpc"',)).fetchall()) < 3:
            assert time.monotonic() < deadline, "the notification's decision was not recorded"
            time.sleep(0.1)
    assert rows[-1] == (202,)  # what the upstream said, not the answer cedargate made of it
    # Nothing of a batch cedargate refuses whole goes upstream; each request gets one answer.
    assert all_refused.status_code == 200
    assert [(a["id"], a["result"]["isError"]) for a in all_refused.json()] == [(5, True), (6, True)]
    assert "not in the action manifest" in all_refused.json()[1]["result"]["content"][0]["text"]
    assert answered.status_code == 200
    answers = {a["id"]: a for a in answered.json()}
    assert sorted(answers) == [1, 2, 3, 4]
    assert [t["name"] for t in answers[1]["result"]["tools"]] == ["search_issues", "delete_repository"]
    assert answers[2]["result"]["content"][0]["text"] == "ran search_issues"
    assert answers[3]["result"]["isError"] is True
    assert "Agents never shut clusters down." in answers[3]["result"]["content"][0]["text"]
    # An escalated message in a batch is not held; its answer says how to retry it.
    pending = answers[4]["result"]["_meta"]["cedargate/problem"]
    assert pending["type"] == "urn:cedargate:problem:override-pending"
    # Only the allowed messages reached the server.
    assert server.bodies == [[batch[0], batch[1], batch[4]], [progress]]


def post_through(gate, message: dict, headers: dict[str, str] | None = None) -> tuple[httpx.Response, list]:
    """`message` posted through cedargate to a `_BatchServer` of its own: the answer, and what reached
    the server."""
    server = _BatchServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with httpx.Client(proxy=gate.proxy_url, timeout=30) as http:
            answered = http.post(f"http://127.0.0.1:{server.server_address[1]}/mcp", json=message, headers=headers)
    finally:
        server.shutdown()
    return answered, server.bodies


def test_mcp_routing_headers_must_match_the_message(gate):
    message = {"jsonrpc": "2.0", "id": 9, "method": "tools/call",
               "params": {"name": "shutdown_cluster", "arguments": {"cluster": "eu-1"}}}
    # A gateway behind cedargate routing on Mcp-Name would run search_issues' handler... or not.
    answered, reached = post_through(gate, message, {"Mcp-Method": "tools/call", "Mcp-Name": "search_issues"})
    assert answered.status_code == 200 and answered.json()["result"]["isError"] is True
    assert "Mcp-Name header says 'search_issues'" in answered.json()["result"]["content"][0]["text"]
    assert reached == []


def test_a_key_in_another_spelling_is_refused_before_the_server(gate):
    # A server matching JSON keys ignoring case (Go's encoding/json) would run the tool with these
    # arguments, which the policy never saw (it saw none).
    message = {"jsonrpc": "2.0", "id": 9, "method": "tools/call",
               "params": {"name": "search_issues", "Arguments": {"query": "prod secrets"}}}
    answered, reached = post_through(gate, message)
    assert answered.status_code == 200 and answered.json()["result"]["isError"] is True
    assert "spell it 'arguments'" in answered.json()["result"]["content"][0]["text"]
    assert reached == []


class _QuirkyServer(ThreadingHTTPServer):
    """An MCP server that answers in ways clients accept but a strict reader might miss: a tool list
    replayed on the GET stream (resumption) with a Content-Length, and JSON under another media type."""

    TOOLS = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": n, "inputSchema": {"type": "object"}}
                                                             for n in ("search_issues", "shutdown_cluster")]}}

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, media: str, payload: bytes, status: int = 200) -> None:
                self.send_response(status)
                self.send_header("Content-Type", media)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                server.seen.append(("GET", dict(self.headers)))
                quirk = self.headers.get("X-Quirk")
                if quirk == "switch":  # a protocol switch nobody asked for
                    self.send_response(101)
                    self.send_header("Upgrade", "websocket")
                    self.send_header("Connection", "Upgrade")
                    self.end_headers()
                    self.wfile.write(b"\x81\x05hello")  # a WebSocket text frame
                    return
                tools = json.dumps(server.TOOLS)
                if quirk == "utf-7":  # "tools" spelled so that only a UTF-7 reader sees it
                    tools = tools.replace('"tools"', '"+AHQ-ools"')
                media = "text/event-stream" + ("; charset=utf-7" if quirk == "utf-7" else "")
                replay = b"id: 7\nevent: message\ndata: " + tools.encode() + b"\n\n"
                if quirk == "base64":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Encoding", "base64")
                    payload = base64.b64encode(json.dumps(server.TOOLS).encode())
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self._answer(media, replay)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.seen.append(("POST", json.loads(body)))
                self._answer("application/json-rpc", json.dumps(server.TOOLS).encode())

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_tool_lists_are_filtered_wherever_the_server_sends_them(gate):
    server = _QuirkyServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/mcp"
    try:
        with httpx.Client(proxy=gate.proxy_url, timeout=30) as http:
            replayed = http.get(url, headers={"Accept": "text/event-stream", "Last-Event-ID": "6"})
            listed = http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
            upgrade = http.get(url, headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                             "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                             "Sec-WebSocket-Version": "13"})
            utf7 = http.post(url, content=b'{"jsonrpc":"2.0","id":2,"method":"tools/+AGM-all","params":'
                                          b'{"name":"shutdown_cluster","arguments":{"cluster":"eu-1"}}}',
                             headers={"Content-Type": "application/json; charset=utf-7"})
            lookalike = http.post(url + "/", json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
            # Answers an MCP client would read otherwise than cedargate are not passed on.
            utf7_answer = http.get(url, headers={"X-Quirk": "utf-7"})
            base64_answer = http.get(url, headers={"X-Quirk": "base64"})
            try:
                switched = http.get(url, headers={"X-Quirk": "switch"})
            except httpx.HTTPError as exc:  # the connection is cut
                switched = exc
    finally:
        server.shutdown()
    assert utf7_answer.status_code == 502 and utf7_answer.json()["type"] == "urn:cedargate:problem:upstream-answer"
    assert base64_answer.status_code == 502
    assert not isinstance(switched, httpx.Response) or switched.status_code != 101
    # The event stream arrives whole and readable (its Content-Length was the server's, not ours).
    assert replayed.status_code == 200 and "content-length" not in replayed.headers
    data = [line[5:].strip() for line in replayed.text.splitlines() if line.startswith("data:")]
    assert [[t["name"] for t in json.loads(d)["result"]["tools"]] for d in data] == [["search_issues"]]
    assert [t["name"] for t in listed.json()["result"]["tools"]] == ["search_issues"]
    # Refused before anything reaches the server: an upgrade, another charset, a path like the endpoint's.
    assert upgrade.status_code == 400 and "upgrades" in upgrade.json()["detail"]
    assert utf7.status_code == 415 and "must be UTF-8" in utf7.json()["detail"]
    assert lookalike.status_code == 404 and "send MCP calls to /mcp" in lookalike.json()["detail"]
    assert [method for method, _ in server.seen] == ["GET", "POST", "GET", "GET", "GET"]


@pytest.mark.parametrize("protocol", ["legacy", "modern"])
def test_opening_a_session_follows_policy_like_any_call(tmp_path, policy_dir, upstream, mcp_server, protocol):
    # Without the permit for the server's plumbing (initialize, server/discover, notifications...), the
    # agent cannot open a session, and its SDK says why instead of failing on an HTTP status.
    without_sessions = POLICIES.replace('@id("github-mcp-sessions")\npermit', '@id("github-mcp-sessions")\nforbid')
    assert without_sessions != POLICIES
    gate = _start_gate(tmp_path, policy_dir, upstream, without_sessions)
    try:
        [broken] = run_agent(gate, mcp_server.url, [{"op": "list_tools"}], protocol=protocol, session_breaks=True)
    finally:
        gate.stop()
    assert "cedargate refused" in broken["exception"] and "Denied by policy" in broken["exception"]
    assert mcp_server.calls() == []
