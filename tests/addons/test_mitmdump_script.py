"""cedargate under stock mitmproxy, run the way the README documents it:

    mitmdump -s addons/enforcer.py --set cedargate_policy_dir=policies/ --set cedargate_config=cedargate.yaml

A real mitmdump subprocess, given no listen address (cedargate's settings choose loopback), a real upstream
server recording what reaches it, httpx as the agent and as the reviewer on the override API the script
starts. HOME points into the test's directory, so a CA that landed in ~/.mitmproxy would be seen there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from addon_support import AGENT, REPO, TOKEN, TOKEN_SHA256

from tests.support.raw_http import assert_refused_saturated
from tests.support.waiting import wait_until

MITMDUMP = Path(sys.executable).parent / "mitmdump"
STARTUP_TIMEOUT = 30.0
APPROVER, APPROVER_TOKEN = "erin", "erin-standalone-token"
# On 127.0.0.1, a production-critical host: escalated to an engineering manager.
STOP = "/v1/instances/i-0abc/stop"


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
    home: Path

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


def write_config(directory: Path, api_port: int = 0, **settings: object) -> Path:
    """cedargate's config, with `settings`; the proxy's port is chosen here, its address left to the defaults."""
    config = directory / "cedargate.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(directory / "state"),
        "proxy": {"port": free_port()},
        "api": {"port": api_port},
        "agents": {AGENT: {"token_sha256": TOKEN_SHA256}},
        "approvers": {APPROVER: {"token_sha256": hashlib.sha256(APPROVER_TOKEN.encode()).hexdigest(),
                                 "roles": ["engineering-manager"]}},
        **settings,
    }))
    return config


def start_mitmdump(directory: Path, policy_dir: Path, config: Path, *options: str,
                   preexec_fn: Callable[[], object] | None = None) -> Mitmdump:
    """mitmdump with the script and cedargate's options only: no listen address, port or confdir.
    `preexec_fn` runs in the child before mitmdump starts (to lower its open-file limit, say)."""
    log = directory / "mitmdump.log"
    home = directory / "home"
    home.mkdir(exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(MITMDUMP), "-s", "addons/enforcer.py",
                "--set", f"cedargate_policy_dir={policy_dir}", "--set", f"cedargate_config={config}",
                *options,
            ],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": str(home), "PYTHONUNBUFFERED": "1"}, preexec_fn=preexec_fn,
        )
    port = yaml.safe_load(config.read_text())["proxy"]["port"]
    return Mitmdump(process, port, directory / "state", log, home)


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


def api_url(mitmdump: Mitmdump) -> str:
    """The override API's address, from the line the script logs once it listens (port 0: chosen at start)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        found = re.search(r"cedargate API listening on (http://\S+)", mitmdump.log.read_text())
        if found:
            return found.group(1)
        if mitmdump.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("the override API did not start:\n" + mitmdump.log.read_text())
        time.sleep(0.1)


def listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP socket listens on at `port`, as `ss -ltn` shows them (Linux /proc)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # /proc prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                family = socket.AF_INET if len(words) == 4 else socket.AF_INET6
                found.add(socket.inet_ntop(family, words))
    return found


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


def reviewer(url: str, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{url}{path}", headers={"Authorization": f"Bearer {APPROVER_TOKEN}"},
                         trust_env=False, timeout=15, **kwargs)


def pending_overrides(url: str, count: int = 1) -> list[dict]:
    deadline = time.monotonic() + 15
    while True:
        found = reviewer(url, "GET", "/overrides?status=pending").json()
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_listens_on_loopback_only_and_keeps_the_ca_in_the_state_dir(proxy):
    assert listening_addresses(proxy.port) == {"127.0.0.1"}
    api_port = int(api_url(proxy).rsplit(":", 1)[1])
    assert listening_addresses(api_port) == {"127.0.0.1"}
    assert (proxy.state_dir / "mitmproxy-ca-cert.pem").is_file()
    assert not (proxy.home / ".mitmproxy").exists()


def test_escalated_call_is_held_until_approved_through_the_started_api(proxy, upstream):
    api = api_url(proxy)
    url = f"http://127.0.0.1:{upstream.port}{STOP}"
    with ThreadPoolExecutor(1) as pool, agent_client(proxy.proxy()) as agent:
        agent.timeout = httpx.Timeout(60)
        held = pool.submit(agent.post, url, json={"grace": 30})
        [request] = pending_overrides(api)
        assert upstream.calls == []  # held, not forwarded
        assert request["url"] == url and request["agent"] == AGENT
        granted = reviewer(api, "POST", f"/overrides/{request['id']}/approve", json={"reason": "wedged"})
        assert granted.status_code == 200 and granted.json()["status"] == "granted"
        response = held.result(timeout=30)
    assert response.status_code == 200
    assert [(c.method, c.path) for c in upstream.calls] == [("POST", STOP)]
    assert reviewer(api, "GET", f"/overrides/{request['id']}").json()["status"] == "released"


def test_with_its_api_port_taken_escalated_calls_are_refused_at_once_not_held(tmp_path, upstream):
    policy_dir = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policy_dir, ignore=shutil.ignore_patterns("tests"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = start_mitmdump(tmp_path, policy_dir, write_config(tmp_path, api_port=port))
        try:
            wait_until_ready(started)
            upstream.calls.clear()
            with agent_client(started.proxy()) as agent:
                refused = agent.post(f"http://127.0.0.1:{upstream.port}{STOP}")  # asks to be held 55 s
                allowed = agent.get(f"http://localhost:{upstream.port}/v1/instances")
        finally:
            stop(started)
    assert refused.status_code == 403
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert problem["type"] == "urn:cedargate:problem:review-unavailable"
    assert f"127.0.0.1:{port}: Address already in use" in problem["detail"]
    assert allowed.status_code == 200
    assert [c.path for c in upstream.calls] == ["/v1/instances"]
    output = started.log.read_text()
    assert "cedargate's override API is not running" in output
    assert f"cannot listen on 127.0.0.1:{port}" in output


@pytest.mark.parametrize(("option", "message"), [
    ("cedargate_api_port=70000", "cedargate_api_port: '70000' is not a TCP port; set it to 1-65535, or 0"),
    ("cedargate_api_port=eighty", "cedargate_api_port: 'eighty' is not a TCP port"),
    ("cedargate_state_dir=", "cedargate_state_dir is empty"),
])
def test_a_wrong_cedargate_option_stops_mitmdump_saying_what_to_fix(tmp_path, option, message):
    started = start_mitmdump(tmp_path, REPO / "policies", write_config(tmp_path), "--set", option)
    try:
        started.process.wait(STARTUP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"mitmdump kept running with --set {option}")
    finally:
        stop(started)
    assert started.process.returncode != 0
    assert message in started.log.read_text()


def own_mitmdump(tmp_path: Path, **settings: object) -> Mitmdump:
    policy_dir = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policy_dir, ignore=shutil.ignore_patterns("tests"))
    return start_mitmdump(tmp_path, policy_dir, write_config(tmp_path, **settings))


def test_past_max_proxy_connections_a_new_connection_gets_503_proxy_saturated(tmp_path, upstream):
    """The ceiling `cedargate run` applies where it accepts applies under mitmdump too: agents' and upstream
    connections count against it, and one past it is answered at once and closed unread."""
    started = own_mitmdump(tmp_path, max_proxy_connections=3, header_read_timeout=120.0, idle_timeout=120.0)
    idle: socket.socket | None = None
    try:
        wait_until_ready(started)
        api = api_url(started)

        def limits() -> dict:
            return httpx.get(f"{api}/status", trust_env=False, timeout=15).json()["limits"]

        upstream.calls.clear()
        with agent_client(started.proxy()) as agent:
            # A kept-alive agent and the upstream connection mitmproxy keeps for it: 2; one idle client: 3.
            assert agent.get(f"http://localhost:{upstream.port}/v1/instances").status_code == 200
            idle = socket.create_connection(("127.0.0.1", started.port), timeout=15)
            wait_until(lambda: limits()["proxy_connections"] == 3, "3 connections open", STARTUP_TIMEOUT)
            shown = limits()
            assert (shown["agent_connections"], shown["upstream_connections"]) == (2, 1)
            assert "processes" not in shown  # each process's own figures are for auditors (/status/processes)
            assert_refused_saturated(started.port, f"GET http://localhost:{upstream.port}/v1/instances HTTP/1.1\r\n"
                                     f"Host: localhost:{upstream.port}\r\n\r\n".encode(), STARTUP_TIMEOUT, 3)
            shown = limits()
            assert (shown["max_proxy_connections"], shown["refused_connections"]) == (3, 1)
            assert httpx.get(f"{api}/healthz", trust_env=False, timeout=15).status_code == 200
            idle.close()
            wait_until(lambda: limits()["proxy_connections"] == 2, "the idle connection closed", STARTUP_TIMEOUT)
            # Below the ceiling again: calls flow.
            assert agent.get(f"http://localhost:{upstream.port}/v1/instances").status_code == 200
        assert [c.path for c in upstream.calls] == ["/v1/instances"] * 2  # the refused one never went
    finally:
        if idle is not None:
            idle.close()
        stop(started)


def test_out_of_files_on_accept_backs_off_and_logs_once(tmp_path, upstream):
    """As under `cedargate run`: accept out of files pauses the listener and says so once a minute, instead
    of mitmproxy logging a traceback per retry; once files are free again, calls are served."""
    files = 256

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    policy_dir = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policy_dir, ignore=shutil.ignore_patterns("tests"))
    config = write_config(tmp_path, max_proxy_connections=5000, max_held_calls=100,
                          max_unauthenticated_connections=5000, header_read_timeout=120.0, idle_timeout=120.0)
    started = start_mitmdump(tmp_path, policy_dir, config, preexec_fn=low_limit)
    flood: list[socket.socket] = []
    try:
        wait_until_ready(started)
        api = api_url(started)
        try:
            for _ in range(files + 50):  # more than the process has files: the rest wait in the listen queue
                try:
                    flood.append(socket.create_connection(("127.0.0.1", started.port), timeout=2))
                except TimeoutError:
                    break  # the listen queue is full too
            wait_until(lambda: "out of files" in started.log.read_text(), "the out-of-files line", STARTUP_TIMEOUT)
            time.sleep(3)  # a while at the limit, retrying: the retries must not be logged one by one
            said = started.log.read_text()
            assert said.count("out of files") == 1, said
            assert "socket.accept" not in said and "Unhandled error" not in said, said
        finally:
            for sock in flood:
                sock.close()
        wait_until(lambda: httpx.get(f"{api}/healthz", trust_env=False, timeout=15).status_code == 200, "healthz",
                   STARTUP_TIMEOUT)
        upstream.calls.clear()
        with agent_client(started.proxy()) as agent:
            assert agent.get(f"http://localhost:{upstream.port}/v1/instances").status_code == 200
    finally:
        stop(started)
