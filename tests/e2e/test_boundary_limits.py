"""One client must not stall the proxy or the API for everyone: size caps, timeouts, connection caps.

The real `cedargate run`, the raw logging upstream, and raw sockets where a test needs a client that
misbehaves byte by byte (httpx where an agent behaves). Tests assert what clients observe (the answer,
or the connection closed by cedargate) and what the upstream received, and order events, never time them:
each wait is a bounded poll for something that must happen.
"""

from __future__ import annotations

import base64
import json
import resource
import select
import socket
import ssl
import subprocess
import time

import httpx
import pytest
from e2e_support import AGENT, TOKEN, start_cedargate, write_config

LIMITS = {
    "max_header_bytes": 16 * 1024,
    "max_request_body_bytes": 1024 * 1024,
    "header_read_timeout": 5.0,
    "idle_timeout": 3.0,
    "max_unauthenticated_connections": 20,
}
CREDENTIALS = "Proxy-Authorization: Basic " + base64.b64encode(f"{AGENT}:{TOKEN}".encode()).decode() + "\r\n"
PIECE = 64 * 1024
BOUND = 20.0  # seconds any awaited outcome gets before the test gives up: far above what it needs


@pytest.fixture
def gate(tmp_path, policy_dir, upstream, raw_upstream):
    gate = start_cedargate(write_config(tmp_path / "cedargate.yaml", policy_dir, tmp_path / "state", upstream,
                                        **LIMITS))
    raw_upstream.reset()
    yield gate
    gate.stop()


@pytest.fixture
def capped_gate(tmp_path, policy_dir, upstream, raw_upstream):
    """Timeouts far longer than the test, so only the cap on unauthenticated connections closes any."""
    config = {**LIMITS, "header_read_timeout": 120.0, "idle_timeout": 120.0}
    gate = start_cedargate(write_config(tmp_path / "cedargate.yaml", policy_dir, tmp_path / "state", upstream,
                                        **config))
    raw_upstream.reset()
    yield gate
    gate.stop()


def client(gate, timeout: float = 10) -> httpx.Client:
    return httpx.Client(proxy=gate.proxy_url, verify=ssl.create_default_context(cafile=gate.ca_cert),
                        timeout=timeout)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=BOUND)


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer with a Content-Length (all cedargate's refusals have one)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a whole answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body[:length]


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other side closed (or reset) the connection; never blocks."""
    if not readable(sock):
        return False
    try:
        return sock.recv(65536, socket.MSG_PEEK) == b""
    except ConnectionError:
        return True


def wait_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes the connection; fails if it does not within BOUND."""
    sock.settimeout(BOUND)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        raise AssertionError("cedargate did not close the connection") from None
    except ConnectionError:
        pass
    return received


def allowed_call(gate, raw_upstream, path: str = "/v1/instances") -> httpx.Response:
    with client(gate) as http:
        return http.get(f"http://localhost:{raw_upstream.http_port}{path}")


def assert_problem(status: int, headers: dict[str, str], body: bytes, expected: int, kind: str) -> dict:
    assert status == expected, body
    assert headers["content-type"] == "application/problem+json"
    problem = json.loads(body)
    assert problem["type"] == f"urn:cedargate:problem:{kind}"
    assert problem["status"] == expected
    return problem


# --- request size caps --------------------------------------------------------------------------------


@pytest.mark.parametrize("authenticated", [True, False])
def test_a_request_head_over_the_cap_gets_431_and_the_upstream_sees_nothing(gate, raw_upstream,
                                                                            authenticated):
    port = raw_upstream.http_port
    sock = connect(gate.proxy_port)
    sock.sendall(f"POST http://localhost:{port}/v1/instances/i-1/stop HTTP/1.1\r\nHost: localhost:{port}\r\n"
                 f"{CREDENTIALS if authenticated else ''}Content-Length: 0\r\nX-Pad: ".encode())
    # One header line of 1 MiB and more, as the review's 40 MB one; cedargate reads no more than its cap.
    for _ in range((1 << 20) // PIECE + 1):
        sock.sendall(b"a" * PIECE)
    sock.sendall(b"\r\n\r\n")
    problem = assert_problem(*read_answer(sock), 431, "request-headers-too-large")
    assert "16384 bytes" in problem["detail"]
    sock.close()

    # The upstream saw nothing of it: the next call is the first it receives.
    assert allowed_call(gate, raw_upstream).status_code == 200
    assert [(c.method, c.target) for c in raw_upstream.calls] == [("GET", "/v1/instances")]


def test_a_body_announced_over_the_cap_gets_413_before_it_is_sent(gate, raw_upstream):
    port = raw_upstream.http_port
    declared = 24 * 1024 * 1024
    sock = connect(gate.proxy_port)
    sock.sendall(f"POST http://localhost:{port}/v1/instances/i-1/stop HTTP/1.1\r\nHost: localhost:{port}\r\n"
                 f"{CREDENTIALS}Content-Type: application/octet-stream\r\nContent-Length: {declared}\r\n\r\n"
                 .encode())
    sent = 0
    while sent < declared and not readable(sock):
        sock.sendall(b"\0" * PIECE)
        sent += PIECE
    problem = assert_problem(*read_answer(sock), 413, "request-too-large")
    assert "1048576 bytes" in problem["detail"]
    # The answer came while the client was still sending: the body was never read whole.
    assert sent < declared
    sock.close()
    assert allowed_call(gate, raw_upstream).status_code == 200
    assert [(c.method, c.target) for c in raw_upstream.calls] == [("GET", "/v1/instances")]


def test_a_chunked_body_growing_over_the_cap_gets_413_while_it_is_sent(gate, raw_upstream):
    port = raw_upstream.http_port
    total = 24 * 1024 * 1024
    sock = connect(gate.proxy_port)
    sock.sendall(f"POST http://localhost:{port}/v1/instances/i-1/stop HTTP/1.1\r\nHost: localhost:{port}\r\n"
                 f"{CREDENTIALS}Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                 .encode())
    sent = 0
    while sent < total and not readable(sock):
        sock.sendall(b"%x\r\n%s\r\n" % (PIECE, b"\0" * PIECE))
        sent += PIECE
    assert_problem(*read_answer(sock), 413, "request-too-large")
    assert LIMITS["max_request_body_bytes"] < sent < total
    sock.close()
    assert allowed_call(gate, raw_upstream).status_code == 200
    assert [(c.method, c.target) for c in raw_upstream.calls] == [("GET", "/v1/instances")]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_agent_posting_a_body_over_the_cap_reads_413_problem_json(gate, raw_upstream, scheme):
    port = raw_upstream.http_port if scheme == "http" else raw_upstream.https_port
    with client(gate) as http:
        # httpx writes the whole body before it reads: cedargate lets it, discarding, then it reads the 413.
        response = http.post(f"{scheme}://localhost:{port}/v1/instances/i-1/stop", content=b"\0" * (3 << 20),
                             headers={"Content-Type": "application/octet-stream"})
    assert_problem(response.status_code, dict(response.headers), response.content, 413, "request-too-large")
    with client(gate) as http:
        # Under the cap, a body of any type still passes unchanged.
        small = http.post(f"{scheme}://localhost:{port}/v1/instances/i-1/stop", content=b"\1" * 4096,
                          headers={"Content-Type": "application/octet-stream"})
    assert small.status_code == 200
    [seen] = raw_upstream.calls
    assert seen.body == b"\1" * 4096


def test_an_http2_agent_posting_a_body_over_the_cap_reads_413_problem_json(gate, raw_upstream, tmp_path):
    """curl, which prefers HTTP/2 (httpx offers HTTP/1.1 first, and mitmproxy follows the client)."""
    url = f"https://localhost:{raw_upstream.https_port}/v1/instances/i-1/stop"
    answers = []
    for name, size in (("large", 3 << 20), ("small", 4096)):
        body, out = tmp_path / name, tmp_path / f"{name}.out"
        body.write_bytes(b"\1" * size)
        result = subprocess.run(
            ["curl", "-s", "--http2", "--proxy", gate.proxy_url, "--cacert", str(gate.ca_cert),
             "-H", "Content-Type: application/octet-stream", "--data-binary", f"@{body}", "-o", str(out),
             "-w", "%{http_code} %{http_version} %{content_type}", url],
            capture_output=True, text=True, timeout=2 * BOUND,
        )
        answers.append((*result.stdout.split(" ", 2), out.read_bytes()))
    (status, version, content_type, problem), (small_status, _, _, _) = answers
    assert version == "2"
    assert_problem(int(status), {"content-type": content_type}, problem, 413, "request-too-large")
    assert small_status == "200"
    [seen] = raw_upstream.calls  # mitmproxy speaks HTTP/1.1 to this upstream
    assert seen.body == b"\1" * 4096


def test_a_client_sending_on_while_its_call_is_held_is_cut_off(gate, raw_upstream):
    """mitmproxy buffers what arrives on a connection while its call waits for a human; cedargate reads
    no more than a whole request's worth."""
    port = raw_upstream.http_port
    sock = connect(gate.proxy_port)
    # A production host: escalated and held for a human.
    sock.sendall(f"POST http://127.0.0.1:{port}/v1/instances/i-1/stop HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 f"{CREDENTIALS}Content-Length: 0\r\n\r\n".encode())
    sent, total = 0, 24 * 1024 * 1024
    try:
        while sent < total and not readable(sock):
            sock.sendall(b"\0" * PIECE)
            sent += PIECE
    except ConnectionError:
        pass
    assert wait_closed(sock) == b""  # cut off, without an answer to the held call
    assert sent < total
    assert raw_upstream.calls == []


# --- timeouts -----------------------------------------------------------------------------------------


def test_silent_and_slowloris_clients_are_closed_while_an_agent_is_answered(gate, raw_upstream):
    silent = connect(gate.proxy_port)
    slow = connect(gate.proxy_port)
    slow.sendall(f"GET http://localhost:{raw_upstream.http_port}/v1/instances HTTP/1.1\r\n".encode())

    # Another agent's call is answered while both hold their connections open...
    assert allowed_call(gate, raw_upstream).status_code == 200
    assert not closed_by_peer(silent) and not closed_by_peer(slow)

    # ...then the slow one, sending a header line at a time (each well within any inactivity timeout),
    # is cut off before it completes its head, and so is the silent one.
    deadline = time.monotonic() + BOUND
    while not closed_by_peer(slow):
        assert time.monotonic() < deadline, "cedargate kept reading a head sent a line at a time"
        try:
            slow.sendall(b"X-Slow: 1\r\n")
        except ConnectionError:
            break
        time.sleep(0.2)
    assert wait_closed(slow) == b""
    assert wait_closed(silent) == b""
    assert [c.target for c in raw_upstream.calls] == ["/v1/instances"]
    # And cedargate still answers.
    assert allowed_call(gate, raw_upstream).status_code == 200


def test_an_idle_kept_alive_connection_is_closed_after_the_idle_timeout(gate, raw_upstream):
    sock = connect(gate.proxy_port)
    port = raw_upstream.http_port
    sock.sendall(f"GET http://localhost:{port}/v1/instances HTTP/1.1\r\nHost: localhost:{port}\r\n"
                 f"{CREDENTIALS}\r\n".encode())
    status, headers, _ = read_answer(sock)
    assert status == 200 and headers.get("connection", "").lower() != "close"
    assert wait_closed(sock) == b""


# --- unauthenticated connections ----------------------------------------------------------------------


def open_idle(port: int, count: int) -> list[socket.socket]:
    return [connect(port) for _ in range(count)]


def oldest_closed(state: list[bool], closed: int) -> bool:
    """Whether exactly `closed` connections are closed, the oldest ones (allowing the server to have
    taken a few of a burst out of order)."""
    margin = 5
    return sum(state) == closed and all(state[:closed - margin]) and not any(state[closed + margin:])


def settle(socks: list[socket.socket], closed: int) -> list[bool]:
    """Which connections the server closed, once `closed` of them are (or BOUND passed)."""
    deadline = time.monotonic() + BOUND
    while True:
        state = [closed_by_peer(s) for s in socks]
        if sum(state) >= closed or time.monotonic() > deadline:
            time.sleep(0.3)  # let any surplus closing show, so a count above `closed` is seen
            return [closed_by_peer(s) for s in socks]
        time.sleep(0.05)


def test_unauthenticated_connections_past_the_cap_close_the_oldest_and_an_agent_is_answered(
        capped_gate, raw_upstream):
    cap = LIMITS["max_unauthenticated_connections"]
    idle = open_idle(capped_gate.proxy_port, 2 * cap)
    # The oldest are closed: `cap` stay open, the newest among them.
    assert oldest_closed(settle(idle, cap), cap)

    assert allowed_call(capped_gate, raw_upstream).status_code == 200
    # The agent's connection, unauthenticated while it connected, took the oldest one's place.
    assert oldest_closed(settle(idle, cap + 1), cap + 1)
    warnings = [line for line in capped_gate.output if "connections that had not authenticated" in line]
    assert len(warnings) == 1, warnings  # once per interval, not once per connection
    for sock in idle:
        sock.close()


def test_idle_api_connections_past_the_cap_do_not_stop_healthz(capped_gate):
    cap = LIMITS["max_unauthenticated_connections"]
    idle = open_idle(capped_gate.api_port, 2 * cap)
    assert oldest_closed(settle(idle, cap), cap)
    health = httpx.get(f"{capped_gate.api_url}/healthz", timeout=BOUND)
    assert health.status_code == 200
    assert oldest_closed(settle(idle, cap + 1), cap + 1)
    for sock in idle:
        sock.close()


def test_silent_and_slowloris_api_clients_are_closed_while_healthz_answers(gate):
    silent = connect(gate.api_port)
    slow = connect(gate.api_port)
    slow.sendall(b"GET /healthz HTTP/1.1\r\n")
    assert httpx.get(f"{gate.api_url}/healthz", timeout=BOUND).status_code == 200
    assert not closed_by_peer(silent) and not closed_by_peer(slow)
    deadline = time.monotonic() + BOUND
    while not closed_by_peer(slow):
        assert time.monotonic() < deadline, "the API kept reading a head sent a line at a time"
        try:
            slow.sendall(b"X-Slow: 1\r\n")
        except ConnectionError:
            break
        time.sleep(0.2)
    assert wait_closed(slow) == b""
    assert wait_closed(silent) == b""


def flood(port: int, count: int) -> list[socket.socket]:
    """Up to `count` idle connections; stops early once the server's listen queue stays full."""
    opened: list[socket.socket] = []
    refused = 0
    while len(opened) < count and refused < 3:
        try:
            opened.append(socket.create_connection(("127.0.0.1", port), timeout=1))
            refused = 0
        except OSError:
            refused += 1
    return opened


def test_an_api_request_head_over_the_cap_is_refused_as_problem_json(gate):
    sock = connect(gate.api_port)
    # h11 caps what it buffers of a head not yet complete (a complete one read at once passes).
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (4 * LIMITS["max_header_bytes"]))
    status, headers, body = read_answer(sock)
    assert status == 400
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(body)["status"] == 400
    assert wait_closed(sock) == b""


def test_idle_connections_cannot_exhaust_open_files(tmp_path, policy_dir, upstream, raw_upstream):
    """The review's flood at the usual open-file limit: 1,024 files, and more idle connections to each
    front than that, without any limit configured. Agents and reviewers are still answered."""
    files = 1024

    def usual_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    config = write_config(tmp_path / "cedargate.yaml", policy_dir, tmp_path / "state", upstream,
                          header_read_timeout=120.0, idle_timeout=120.0)
    gate = start_cedargate(config, preexec_fn=usual_limit)
    raw_upstream.reset()
    idle: list[socket.socket] = []
    try:
        idle += flood(gate.proxy_port, files + 50)
        idle += flood(gate.api_port, files + 50)
        with client(gate, timeout=BOUND) as http:
            answer = http.get(f"http://localhost:{raw_upstream.http_port}/v1/instances")
        health = httpx.get(f"{gate.api_url}/healthz", timeout=BOUND)
        assert answer.status_code == 200
        assert health.status_code == 200
        assert [c.target for c in raw_upstream.calls] == ["/v1/instances"]
    finally:
        for sock in idle:
            sock.close()
        gate.stop()
