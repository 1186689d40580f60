"""cedargate under stock mitmproxy, run the way the README documents it:

    mitmdump -s addons/enforcer.py --set policy_dir=policies/ --set cedargate_config=cedargate.yaml

A real mitmdump subprocess on loopback, a real upstream server recording what reaches it, and httpx as
the agent. HOME points into the test's directory so mitmproxy's CA is generated there, not in ~/.mitmproxy.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from addon_support import AGENT, REPO, TOKEN, TOKEN_SHA256

MITMDUMP = Path(sys.executable).parent / "mitmdump"
STARTUP_TIMEOUT = 30.0


class MitmdumpExited(Exception):
    """mitmdump ended before it accepted connections."""


@dataclass
class SeenCall:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Upstream:
    port: int
    calls: list[SeenCall] = field(default_factory=list)


@dataclass
class Mitmdump:
    process: subprocess.Popen
    port: int
    state_dir: Path
    log: Path

    def proxy(self, credentials: str | None = f"{AGENT}:{TOKEN}") -> str:
        userinfo = f"{credentials}@" if credentials else ""
        return f"http://{userinfo}127.0.0.1:{self.port}"


def _recording_handler(calls: list[SeenCall]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            calls.append(SeenCall(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            payload = json.dumps({"served": True, "method": self.command, "path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        def log_message(self, *args) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    calls: list[SeenCall] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _recording_handler(calls))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Upstream(server.server_address[1], calls)
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(directory: Path) -> Path:
    config = directory / "cedargate.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(directory / "state"),
        "agents": {AGENT: {"token_sha256": TOKEN_SHA256}},
    }))
    return config


def start_mitmdump(directory: Path, policy_dir: Path, config: Path) -> Mitmdump:
    port = free_port()
    log = directory / "mitmdump.log"
    home = directory / "home"
    home.mkdir(exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(MITMDUMP), "-s", "addons/enforcer.py",
                "--set", f"policy_dir={policy_dir}", "--set", f"cedargate_config={config}",
                "--listen-host", "127.0.0.1", "--listen-port", str(port),
            ],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": str(home), "PYTHONUNBUFFERED": "1"},
        )
    return Mitmdump(process, port, directory / "state", log)


def wait_until_ready(mitmdump: Mitmdump) -> None:
    """Poll the port until cedargate answers there: an unauthenticated probe gets cedargate's 407.

    An open port alone is not enough: mitmdump listens first and exits right after if start-up logged an
    error, so readiness is an answer from AgentAuth with the process still running.
    """
    process = mitmdump.process
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if process.poll() is not None:
            raise MitmdumpExited(f"mitmdump exited with {process.returncode}:\n{mitmdump.log.read_text()}")
        try:
            with httpx.Client(proxy=mitmdump.proxy(credentials=None), trust_env=False, timeout=2) as probe:
                answer = probe.get("http://127.0.0.1:9/readiness-probe")
            cedargate_answered = answer.headers.get("proxy-authenticate") == 'Basic realm="cedargate"'
            if answer.status_code == 407 and cedargate_answered and process.poll() is None:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"mitmdump did not answer as cedargate within {STARTUP_TIMEOUT}s:\n"
                                 + mitmdump.log.read_text())
        time.sleep(0.1)


def stop(mitmdump: Mitmdump) -> None:
    process = mitmdump.process
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture(scope="module")
def mitmdump(tmp_path_factory) -> Iterator[Mitmdump]:
    directory = tmp_path_factory.mktemp("mitmdump")
    policy_dir = directory / "policies"
    shutil.copytree(REPO / "policies", policy_dir, ignore=shutil.ignore_patterns("tests"))
    started = start_mitmdump(directory, policy_dir, write_config(directory))
    try:
        wait_until_ready(started)
        yield started
    finally:
        stop(started)


@pytest.fixture
def proxy(mitmdump, upstream) -> Mitmdump:
    upstream.calls.clear()
    return mitmdump


def agent_client(proxy_url: str) -> httpx.Client:
    # trust_env=False: only the proxy under test, whatever HTTP(S)_PROXY/NO_PROXY the machine has.
    return httpx.Client(proxy=proxy_url, trust_env=False, timeout=15)


def recorded(state_dir: Path, expected: int, timeout: float = 10.0, path: str | None = None) -> list[dict]:
    """The record's rows (for `path`, if given) once the batching writer committed `expected` of them.

    The proxy is shared across this module's tests, so a test waits for its own rows, not any rows.
    """
    deadline = time.monotonic() + timeout
    while True:
        rows: list[dict] = []
        if (state_dir / "cedargate.db").exists():
            with sqlite3.connect(state_dir / "cedargate.db") as db:
                db.row_factory = sqlite3.Row
                rows = [dict(r) for r in db.execute("SELECT * FROM decisions ORDER BY id")]
        rows = [r for r in rows if path is None or r["path"] == path]
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_allowed_call_reaches_upstream_without_the_proxy_credential(proxy, upstream):
    with agent_client(proxy.proxy()) as agent:
        response = agent.get(f"http://localhost:{upstream.port}/v1/instances")
    assert response.status_code == 200
    assert response.json() == {"served": True, "method": "GET", "path": "/v1/instances"}
    [seen] = upstream.calls
    assert (seen.method, seen.path) == ("GET", "/v1/instances")
    assert "proxy-authorization" not in seen.headers


def test_denied_call_gets_problem_json_and_never_reaches_upstream(proxy, upstream):
    with agent_client(proxy.proxy()) as agent:
        # Prefer: wait=0 asks not to be held should a human be able to grant an exception.
        response = agent.delete(
            f"http://localhost:{upstream.port}/v1/volumes/v1", headers={"Prefer": "wait=0"}
        )
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 403
    assert problem["decision_id"] == response.headers["x-cedargate-decision"]
    assert [p["id"] for p in problem["policies"]] == ["no-volume-deletion"]
    assert upstream.calls == []


def test_call_without_credentials_gets_407_and_never_reaches_upstream(proxy, upstream):
    with agent_client(proxy.proxy(credentials=None)) as agent:
        response = agent.get(f"http://localhost:{upstream.port}/v1/instances")
    assert response.status_code == 407
    assert response.headers["proxy-authenticate"] == 'Basic realm="cedargate"'
    assert response.json()["type"] == "urn:cedargate:problem:proxy-auth-required"
    assert upstream.calls == []


def test_wrong_token_gets_407_and_never_reaches_upstream(proxy, upstream):
    with agent_client(proxy.proxy(credentials=f"{AGENT}:not-the-token")) as agent:
        response = agent.get(f"http://localhost:{upstream.port}/v1/instances")
    assert response.status_code == 407
    assert upstream.calls == []


def test_decisions_are_recorded_in_the_configured_state_dir(proxy, upstream):
    with agent_client(proxy.proxy()) as agent:
        agent.get(f"http://localhost:{upstream.port}/v1/instances/i-7")
        agent.put(f"http://localhost:{upstream.port}/v1/instances/i-7", json={"size": "xl"})
    mine = recorded(proxy.state_dir, expected=2, timeout=10, path="/v1/instances/i-7")
    assert [(r["method"], r["decision"], r["upstream_status"]) for r in mine] == [
        ("GET", "allow", 200), ("PUT", "deny", None),
    ]
    assert [c.method for c in upstream.calls] == ["GET"]


def raw_proxy_request(port: int, request_line: str, headers: dict[str, str]) -> bytes:
    """Send one request exactly as written (no client normalising its URL) and read the whole answer."""
    fields = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head = f"{request_line}\r\n{fields}Connection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
        conn.sendall(head.encode())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_path_that_breaks_url_parsing_is_refused_not_forwarded(proxy, upstream):
    credential = base64.b64encode(f"{AGENT}:{TOKEN}".encode()).decode()
    answer = raw_proxy_request(
        proxy.port, f"DELETE http://localhost:{upstream.port}//[x/v1/volumes/v1 HTTP/1.1",
        {"Host": f"localhost:{upstream.port}", "Proxy-Authorization": f"Basic {credential}",
         "Prefer": "wait=0", "Content-Length": "0"},
    )
    status = int(answer.split(b" ", 2)[1])
    assert upstream.calls == [], f"the DELETE reached upstream as {upstream.calls[0].path!r}"
    assert 400 <= status < 500


def test_bad_policy_dir_stops_mitmdump_with_a_message_naming_it(tmp_path):
    missing = tmp_path / "no-such-policies"
    started = start_mitmdump(tmp_path, missing, write_config(tmp_path))
    try:
        started.process.wait(STARTUP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail("mitmdump kept running with a policy directory that does not exist")
    finally:
        stop(started)
    output = started.log.read_text()
    assert started.process.returncode != 0
    assert f"cedargate cannot start: policy directory {missing} does not exist" in output
