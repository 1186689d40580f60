"""An upstream that fails a decided call, through the real proxy: the agent gets problem+json saying what
failed and whether the call may have run, never mitmproxy's HTML page or a hang, and the record says what
failed. Each failure is a real peer on loopback: a closed port, a server that resets after reading the
call, a certificate no trusted CA signed, a server that never answers, a connect that never completes.
Clients: httpx over HTTP/1.1 and HTTP/2, as agents use it.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from e2e_support import APPROVERS, REPO, start_cedargate, write_config

from tests.support.manifests import use_manifest

POLICIES = REPO / "policies"
STOP = "/v1/instances/i-0abc/stop"  # allowed on localhost (a dev host), escalated on 127.0.0.1
TIMEOUT = 1  # seconds: upstream_connect_timeout and upstream_read_timeout of the gate under test
PROBLEM = "urn:cedargate:problem:"


def agent(gate) -> httpx.Client:
    trust = ssl.create_default_context(cafile=gate.ca_cert)
    # The client waits far longer than cedargate's timeouts: an answer must come from cedargate.
    return httpx.Client(proxy=gate.proxy_url, verify=trust, timeout=20)


@dataclass
class Answer:
    """What the agent got: as httpx (HTTP/1.1) or curl (HTTP/2 in the tunnel, as curl prefers) saw it."""

    http_version: str
    status_code: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def post_stop(gate, base: str, http2: bool = False) -> Answer:
    """The agent's call: stop an instance, a POST that must not be repeated blindly."""
    if not http2:
        with agent(gate) as http:
            response = http.post(base + STOP, json={"grace": 30})
        return Answer(response.http_version, response.status_code, dict(response.headers), response.content)
    done = subprocess.run(
        ["curl", "-s", "--http2", "--proxy", gate.proxy_url, "--cacert", str(gate.ca_cert), "-D", "-",
         "-H", "Content-Type: application/json", "--data", '{"grace":30}', "--max-time", "20", base + STOP],
        capture_output=True, timeout=30,
    )
    *_, head, body = done.stdout.split(b"\r\n\r\n")  # the proxy's answer to CONNECT comes first
    status_line, *fields = head.decode().split("\r\n")
    version, status = status_line.split()[:2]
    headers = {k.strip().lower(): v.strip() for k, v in (f.split(":", 1) for f in fields)}
    assert version == "HTTP/2"
    return Answer(version, int(status), headers, body)


def record_of(gate, decision_id: str, timeout: float = 10.0) -> dict:
    """The decision's row, once the writer committed it and, for a call that was let through (recorded
    before it was forwarded), what became of it."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(gate.database) as db:
            db.row_factory = sqlite3.Row
            # The outcome first: the row read after it has what the outcome added (they commit together).
            outcome = db.execute("SELECT 1 FROM audit_log WHERE kind = 'outcome' AND decision_id = ?",
                                 (decision_id,)).fetchone()
            row = db.execute("SELECT * FROM decisions WHERE decision_id = ?", (decision_id,)).fetchone()
        if row is not None and (outcome is not None or row["decision"] not in ("allow", "escalate")):
            return dict(row)
        assert time.monotonic() < deadline, f"decision {decision_id} was not recorded"
        time.sleep(0.05)


def audit_payload(gate, decision_id: str) -> dict:
    """The decision as the audit log holds it: its `decision` event, with its `outcome` event's additions."""
    with sqlite3.connect(gate.database) as db:
        [(payload,)] = db.execute("SELECT payload FROM audit_log WHERE kind = 'decision' AND decision_id = ?",
                                  (decision_id,)).fetchall()
        outcomes = db.execute("SELECT payload FROM audit_log WHERE kind = 'outcome' AND decision_id = ?",
                              (decision_id,)).fetchall()
    return {**json.loads(payload), **{k: v for (o,) in outcomes for k, v in json.loads(o).items()}}


def problem_of(response: httpx.Response | Answer, status: int, kind: str) -> dict:
    assert response.status_code == status, response.json()
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == PROBLEM + kind and problem["status"] == status
    assert problem["decision_id"] == response.headers["x-cedargate-decision"]
    return problem


@dataclass
class Peer:
    """A loopback server that misbehaves as `behave` says, and keeps what each connection sent it."""

    port: int
    received: list[bytes] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)  # ends every held connection


def _read_request(conn) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


@pytest.fixture
def peers(upstream) -> Iterator[Callable[..., Peer]]:
    """Start peers: `peers(behave, tls=...)`; `tls` is "trusted" (the upstream CA cedargate trusts),
    "self-signed", or None. Every peer and its connections end at teardown."""
    started: list[tuple[Peer, socket.socket]] = []
    trusted = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificates = upstream.ca_file.parent
    trusted.load_cert_chain(certificates / "upstream.pem", certificates / "upstream-key.pem")
    self_signed = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # The upstream CA's own certificate: self-signed, and not the leaf of any CA cedargate trusts here.
    self_signed.load_cert_chain(*_self_signed(upstream.ca_file.parent))

    def start(behave: Callable[[socket.socket, Peer], None], tls: str | None = None) -> Peer:
        listener = socket.create_server(("127.0.0.1", 0))
        peer = Peer(listener.getsockname()[1])
        context = {"trusted": trusted, "self-signed": self_signed, None: None}[tls]

        def serve(conn: socket.socket) -> None:
            conn.settimeout(10)
            try:
                if context is not None:
                    conn = context.wrap_socket(conn, server_side=True)
                behave(conn, peer)
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        started.append((peer, listener))
        return peer

    yield start
    for peer, listener in started:
        peer.release.set()
        listener.close()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    import datetime as dt
    from ipaddress import IPv4Address

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_file, key_file = directory / "self-signed.pem", directory / "self-signed-key.pem"
    if not cert_file.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256())
        )
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_file, key_file


def resets_after_reading(conn: socket.socket, peer: Peer) -> None:
    peer.received.append(_read_request(conn))
    if not isinstance(conn, ssl.SSLSocket):  # an RST, not a FIN (TLS would send its close first)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def hangs_after_reading(conn: socket.socket, peer: Peer) -> None:
    peer.received.append(_read_request(conn))
    peer.release.wait(30)


def never_speaks(conn: socket.socket, peer: Peer) -> None:
    peer.release.wait(30)


def answers_headers_then_stalls(conn: socket.socket, peer: Peer) -> None:
    peer.received.append(_read_request(conn))
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"ok\":")
    peer.release.wait(30)


@pytest.fixture(scope="module")
def gate(tmp_path_factory, upstream):
    tmp = tmp_path_factory.mktemp("boundary-upstream")
    policy_dir = tmp / "policies"
    shutil.copytree(POLICIES, policy_dir, ignore=shutil.ignore_patterns("tests"))
    gate = start_cedargate(write_config(tmp / "c.yaml", policy_dir, tmp / "state", upstream,
                                        upstream_connect_timeout=TIMEOUT, upstream_read_timeout=TIMEOUT))
    yield gate
    gate.stop()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("scheme,http2", [("http", False), ("https", False), ("https", True)])
def test_connection_refused_is_a_problem_saying_the_call_was_not_executed(gate, scheme, http2):
    response = post_stop(gate, f"{scheme}://localhost:{closed_port()}", http2)
    problem = problem_of(response, 502, "upstream-unreachable")
    assert problem["upstream_failure"] == "connect-refused" and problem["executed"] == "no"
    assert "refused the connection" in problem["detail"] and "NOT executed" in problem["detail"]
    row = record_of(gate, problem["decision_id"])
    assert row["decision"] == "allow" and row["upstream_status"] is None
    [failure] = json.loads(row["errors"])
    assert failure.startswith("upstream connect-refused: ") and failure.endswith("(call not sent)")
    # The audit log's copy of the decision says the same.
    assert json.loads(audit_payload(gate, problem["decision_id"])["errors"]) == [failure]


def test_a_client_that_expects_100_continue_still_gets_the_problem(gate):
    # mitmproxy answers "100 Continue" itself before the body: that is not the answer to the call.
    done = subprocess.run(
        ["curl", "-s", "-i", "--http1.1", "--proxy", gate.proxy_url, "-H", "Expect: 100-continue",
         "-H", "Content-Type: application/json", "--data", '{"grace":30}', "--max-time", "20",
         f"http://localhost:{closed_port()}{STOP}"],
        capture_output=True, timeout=30,
    )
    *_, head, body = done.stdout.split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ") and b"application/problem+json" in head
    assert json.loads(body)["type"] == PROBLEM + "upstream-unreachable"


@pytest.mark.parametrize("scheme,http2", [("http", False), ("https", False), ("https", True)])
def test_reset_after_the_call_was_read_says_it_may_have_been_executed(gate, peers, scheme, http2):
    peer = peers(resets_after_reading, tls="trusted" if scheme == "https" else None)
    response = post_stop(gate, f"{scheme}://localhost:{peer.port}", http2)
    problem = problem_of(response, 502, "upstream-reset")
    assert problem["upstream_failure"] == "reset" and problem["executed"] == "maybe"
    assert "MAY have been executed" in problem["detail"]
    # It may indeed: the server read the whole call before it closed the connection.
    [received] = peer.received
    assert received.startswith(f"POST {STOP} HTTP/1.1\r\n".encode()) and received.endswith(b'{"grace":30}')
    [failure] = json.loads(record_of(gate, problem["decision_id"])["errors"])
    assert failure.startswith("upstream reset: ") and failure.endswith("(call sent)")


@pytest.mark.parametrize("http2", [False, True])
def test_certificate_no_trusted_ca_signed_is_refused_before_anything_is_sent(gate, peers, http2):
    peer = peers(resets_after_reading, tls="self-signed")
    response = post_stop(gate, f"https://localhost:{peer.port}", http2)
    problem = problem_of(response, 502, "upstream-tls")
    assert problem["upstream_failure"] == "tls-verify" and problem["executed"] == "no"
    assert "certificate" in problem["detail"] and "upstream_ca_bundle" in problem["detail"]
    assert peer.received == []  # the handshake failed: no byte of the call went to the server
    [failure] = json.loads(record_of(gate, problem["decision_id"])["errors"])
    assert failure.startswith("upstream tls-verify: Certificate verify failed")
    assert failure.endswith("(call not sent)")


@pytest.mark.parametrize("scheme,http2", [("http", False), ("https", False), ("https", True)])
def test_upstream_that_never_answers_times_out_with_504(gate, peers, scheme, http2):
    peer = peers(hangs_after_reading, tls="trusted" if scheme == "https" else None)
    response = post_stop(gate, f"{scheme}://localhost:{peer.port}", http2)
    problem = problem_of(response, 504, "upstream-timeout")
    assert problem["upstream_failure"] == "read-timeout" and problem["executed"] == "maybe"
    assert f"did not answer within {TIMEOUT} s" in problem["detail"]
    assert "MAY have been executed" in problem["detail"]
    [received] = peer.received
    assert received.startswith(f"POST {STOP} HTTP/1.1\r\n".encode())
    row = record_of(gate, problem["decision_id"])
    assert row["upstream_status"] is None
    [failure] = json.loads(row["errors"])
    assert failure.startswith("upstream read-timeout: ") and failure.endswith("(call sent)")


def test_answer_whose_body_stalls_after_its_headers_times_out_with_504(gate, peers):
    peer = peers(answers_headers_then_stalls)
    with agent(gate) as http:
        response = http.get(f"http://localhost:{peer.port}/v1/instances")
    problem = problem_of(response, 504, "upstream-timeout")
    assert problem["upstream_failure"] == "read-timeout" and problem["executed"] == "maybe"
    assert "upstream read-timeout" in json.loads(record_of(gate, problem["decision_id"])["errors"])[0]


@pytest.mark.parametrize("http2", [False, True])
def test_tls_handshake_that_never_completes_times_out_before_anything_is_sent(gate, peers, http2):
    peer = peers(never_speaks)  # accepts the TCP connection, then says nothing: no TLS handshake
    response = post_stop(gate, f"https://localhost:{peer.port}", http2)
    problem = problem_of(response, 504, "upstream-timeout")
    assert problem["upstream_failure"] == "connect-timeout" and problem["executed"] == "no"
    assert f"did not accept a connection within {TIMEOUT} s" in problem["detail"]
    [failure] = json.loads(record_of(gate, problem["decision_id"])["errors"])
    assert failure.startswith("upstream connect-timeout: ") and failure.endswith("(call not sent)")


@pytest.fixture
def unconnectable_port() -> Iterator[int]:
    """A port whose listen backlog is full: Linux drops new SYNs, so a connect neither completes nor fails."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    with socket.socket() as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(("127.0.0.1", port))
            hangs = False
        except TimeoutError:
            hangs = True
    if not hangs:
        pytest.skip("this kernel completes connections past a full listen backlog")
    yield port
    for sock in (*fillers, listener):
        sock.close()


def test_connect_that_never_completes_times_out_with_504(gate, unconnectable_port):
    with agent(gate) as http:
        response = http.get(f"http://127.0.0.1:{unconnectable_port}/v1/instances")
    problem = problem_of(response, 504, "upstream-timeout")
    assert problem["upstream_failure"] == "connect-timeout" and problem["executed"] == "no"
    assert "NOT executed" in problem["detail"]
    [failure] = json.loads(record_of(gate, problem["decision_id"])["errors"])
    assert failure.startswith("upstream connect-timeout: ") and failure.endswith("(call not sent)")


def test_call_held_for_a_human_longer_than_the_read_timeout_still_goes_through(gate, upstream):
    upstream.reset()
    with agent(gate) as http:
        held = []
        url = f"http://127.0.0.1:{upstream.http_port}{STOP}"  # production: held for an engineering manager
        thread = threading.Thread(target=lambda: held.append(http.post(url)))
        thread.start()
        token = APPROVERS["erin"][0]
        try:
            deadline = time.monotonic() + 15
            while not (pending := httpx.get(f"{gate.api_url}/overrides?status=pending", timeout=10,
                                            headers={"Authorization": f"Bearer {token}"}).json()):
                assert time.monotonic() < deadline, "the call was not held"
                time.sleep(0.05)
            time.sleep(TIMEOUT * 1.5)  # held past both timeouts: they count only once the call is sent
            granted = httpx.post(f"{gate.api_url}/overrides/{pending[0]['id']}/approve", timeout=10,
                                 json={"reason": "on-call"}, headers={"Authorization": f"Bearer {token}"})
            assert granted.status_code == 200
        finally:
            thread.join(30)
    [response] = held
    assert response.status_code == 200 and response.json()["path"] == STOP
    assert [c.path for c in upstream.calls] == [STOP]


def test_mitmproxy_refusal_of_an_unreadable_request_is_problem_json(gate):
    with socket.create_connection(("127.0.0.1", gate.proxy_port), timeout=10) as sock:
        sock.sendall(b"GET http://localhost:1/ HTTP/1.1 EXTRA\r\nHost: localhost:1\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"content-type: application/problem+json" in head.lower() and b"mitmproxy" not in head.lower()
    problem = json.loads(body)
    assert problem["type"] == PROBLEM + "http-error" and problem["status"] == 400
    assert "NOT forwarded" in problem["detail"]


MCP_MANIFEST = {"hosts": [{"host": "127.0.0.1", "mcp": [{"path": "/mcp", "server": "github", "tools": {}}]}]}
MCP_POLICIES = """
@id("github-mcp-sessions")
permit (principal in Team::"ops", action == Action::"mcp_rpc", resource == McpServer::"github");
"""


@pytest.fixture
def mcp_gate(tmp_path, policy_dir, upstream):
    use_manifest(policy_dir, MCP_MANIFEST, MCP_POLICIES)
    gate = start_cedargate(write_config(tmp_path / "c.yaml", policy_dir, tmp_path / "state", upstream,
                                        upstream_connect_timeout=TIMEOUT, upstream_read_timeout=TIMEOUT))
    yield gate
    gate.stop()


EVENT = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "late"}}


def streams_events_slowly(conn: socket.socket, peer: Peer) -> None:
    """An MCP server's GET stream: headers at once, then an event only after longer than the read timeout."""
    peer.received.append(_read_request(conn))
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    peer.release.wait(TIMEOUT * 2)
    event = b"event: message\ndata: " + json.dumps(EVENT).encode() + b"\n\n"
    conn.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))


def test_streamed_mcp_answer_is_not_cut_by_the_read_timeout(mcp_gate, peers):
    peer = peers(streams_events_slowly)
    with httpx.Client(proxy=mcp_gate.proxy_url, timeout=20) as http:
        response = http.get(f"http://127.0.0.1:{peer.port}/mcp", headers={"Accept": "text/event-stream"})
    assert response.status_code == 200
    data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
    assert [json.loads(d) for d in data] == [EVENT]
