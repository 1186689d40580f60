"""The CONNECT tunnel boundary: a tunnel carries calls to the one host it was opened to, and nothing else.

Raw sockets (and `ssl`), so the exact bytes an attacker would send reach the real proxy: an
absolute-form request target naming another host inside a tunnel, a request without Host, a
passthrough host named only in the TLS SNI or the Host header, and a TLS SNI that names another host
than the CONNECT. The upstreams are real: nginx with a "dev" (localhost) and a default "production"
vhost, a logging server read by h11, and an SNI-routing front that records the server names it is
sent. Each test asserts what the agent got and what the upstream received: nothing, or what was decided.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import sqlite3
import ssl

import pytest
from e2e_support import AGENT, TOKEN, recorded_rows, start_cedargate, write_config

STOP = "/v1/instances/i-1/stop"
PROXY_AUTHORIZATION = "Basic " + base64.b64encode(f"{AGENT}:{TOKEN}".encode()).decode()
PASSTHROUGH = r"pinned\.example\.test"


def connect(gate) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gate.proxy_port), timeout=10)


def open_tunnel(gate, authority: str) -> socket.socket:
    """A CONNECT tunnel through cedargate, authenticated as the test agent."""
    sock = connect(gate)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
                 f"Proxy-Authorization: {PROXY_AUTHORIZATION}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, f"the proxy closed the connection after CONNECT: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def tls(sock: socket.socket, server_name: str | None, *cafiles) -> ssl.SSLSocket:
    """TLS over the tunnel, trusting only `cafiles`; `server_name` is the SNI sent (None: none)."""
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=str(cafiles[0]))
    for cafile in cafiles[1:]:
        context.load_verify_locations(cafile=str(cafile))
    if server_name is None:
        context.check_hostname = False  # no SNI is sent without a server_hostname
    return context.wrap_socket(sock, server_hostname=server_name)


def exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    sock.sendall(request)
    method = request.split(b" ", 1)[0].decode()
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    body = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def problem_of(status: int, headers: dict[str, str], body: bytes) -> dict:
    assert headers.get("content-type") == "application/problem+json", (status, headers, body)
    problem = json.loads(body)
    assert problem["type"].startswith("urn:cedargate:problem:") and problem["status"] == status
    return problem


def decision_rows(gate, expected: int, timeout: float = 10.0) -> list[dict]:
    return _rows(gate, "SELECT * FROM decisions ORDER BY id", expected, timeout)


def audit_events(gate, kind: str, expected: int, timeout: float = 10.0) -> list[dict]:
    return _rows(gate, f"SELECT * FROM audit_log WHERE kind = '{kind}' ORDER BY seq", expected, timeout)


def _rows(gate, query: str, expected: int, timeout: float) -> list[dict]:
    return recorded_rows(gate, query, expected, timeout)


# 1. The request target inside a tunnel ---------------------------------------------------------------

@pytest.mark.parametrize("secure", [False, True], ids=["http", "https"])
def test_absolute_form_naming_another_host_inside_a_tunnel_is_refused(cedargate, nginx, upstream, secure):
    """Decided on the tunnel's Host::"localhost" (dev), nginx would route by the request line to production."""
    port = nginx.https_port if secure else nginx.http_port
    scheme = "https" if secure else "http"
    nginx.reset()
    sock = open_tunnel(cedargate, f"localhost:{port}")
    if secure:
        sock = tls(sock, "localhost", cedargate.ca_cert)
    with sock:
        answer = exchange(sock, f"POST {scheme}://127.0.0.1:{port}{STOP} HTTP/1.1\r\nHost: localhost:{port}\r\n"
                                f"Content-Length: 0\r\n\r\n".encode())
    problem = problem_of(*answer)
    assert answer[0] == 400
    assert problem["type"] == "urn:cedargate:problem:mapping-error"
    assert f"127.0.0.1:{port}" in problem["detail"] and f"localhost:{port}" in problem["detail"]
    assert nginx.seen("production") == [] and nginx.seen("dev") == []
    [row] = decision_rows(cedargate, 1)
    assert (row["decision"], row["host"], row["path"]) == ("error", "localhost", STOP)


@pytest.mark.parametrize("secure", [False, True], ids=["http", "https"])
def test_absolute_form_naming_the_tunnel_goes_upstream_in_origin_form(cedargate, nginx, secure):
    port = nginx.https_port if secure else nginx.http_port
    scheme = "https" if secure else "http"
    nginx.reset()
    sock = open_tunnel(cedargate, f"localhost:{port}")
    if secure:
        sock = tls(sock, "localhost", cedargate.ca_cert)
    with sock:
        status, _, body = exchange(sock, f"POST {scheme}://localhost:{port}{STOP} HTTP/1.1\r\n"
                                         f"Host: localhost:{port}\r\nContent-Length: 0\r\n\r\n".encode())
    assert (status, json.loads(body)) == (200, {"vhost": "dev"})
    assert nginx.seen("dev") == [f"localhost POST {STOP} HTTP/1.1 localhost"]
    assert nginx.seen("production") == []


@pytest.mark.parametrize("secure", [False, True], ids=["http", "https"])
def test_a_tunnelled_request_without_host_reaches_the_host_it_was_decided_for(cedargate, nginx, secure):
    """HTTP/1.0 needs no Host; nginx would serve a Host-less call from its default (production) vhost."""
    port = nginx.https_port if secure else nginx.http_port
    nginx.reset()
    sock = open_tunnel(cedargate, f"localhost:{port}")
    if secure:
        sock = tls(sock, "localhost", cedargate.ca_cert)
    with sock:
        status, _, body = exchange(sock, f"POST {STOP} HTTP/1.0\r\nContent-Length: 0\r\n\r\n".encode())
    assert (status, json.loads(body)) == (200, {"vhost": "dev"})
    assert nginx.seen("production") == []
    assert nginx.seen("dev") == [f"localhost POST {STOP} HTTP/1.0 localhost"]


def test_a_proxy_request_without_host_reaches_the_host_it_was_decided_for(cedargate, nginx):
    """Outside tunnels too: the absolute-form target is decided, and nginx must get its host as Host."""
    nginx.reset()
    with connect(cedargate) as sock:
        status, _, body = exchange(sock, f"POST http://localhost:{nginx.http_port}{STOP} HTTP/1.0\r\n"
                                         f"Proxy-Authorization: {PROXY_AUTHORIZATION}\r\n"
                                         f"Content-Length: 0\r\n\r\n".encode())
    assert (status, json.loads(body)) == (200, {"vhost": "dev"})
    assert nginx.seen("production") == []
    assert nginx.seen("dev") == [f"localhost POST {STOP} HTTP/1.0 localhost"]


def test_an_empty_host_is_refused_in_a_tunnel_and_outside(cedargate, nginx):
    """A server may read an empty Host as none, and serve the call from its default (production) vhost."""
    nginx.reset()
    port = nginx.http_port
    with open_tunnel(cedargate, f"localhost:{port}") as sock:
        tunnelled = exchange(sock, f"POST {STOP} HTTP/1.0\r\nHost: \r\nContent-Length: 0\r\n\r\n".encode())
    with connect(cedargate) as sock:
        proxied = exchange(sock, f"POST http://localhost:{port}{STOP} HTTP/1.0\r\nHost: \r\n"
                                 f"Proxy-Authorization: {PROXY_AUTHORIZATION}\r\nContent-Length: 0\r\n\r\n".encode())
    for answer in (tunnelled, proxied):
        assert answer[0] == 400 and problem_of(*answer)["type"] == "urn:cedargate:problem:mapping-error"
        assert "Host header is empty" in problem_of(*answer)["detail"]
    assert nginx.seen("production") == [] and nginx.seen("dev") == []


def test_a_proxy_request_goes_upstream_in_origin_form_with_the_decided_host(cedargate, nginx):
    nginx.reset()
    port = nginx.http_port
    with connect(cedargate) as sock:
        allowed = exchange(sock, f"POST http://localhost:{port}{STOP} HTTP/1.1\r\nHost: localhost:{port}\r\n"
                                 f"Proxy-Authorization: {PROXY_AUTHORIZATION}\r\nContent-Length: 0\r\n\r\n".encode())
    with connect(cedargate) as sock:
        spoofed = exchange(sock, f"POST http://127.0.0.1:{port}{STOP} HTTP/1.1\r\nHost: localhost:{port}\r\n"
                                 f"Proxy-Authorization: {PROXY_AUTHORIZATION}\r\nContent-Length: 0\r\n\r\n".encode())
    assert (allowed[0], json.loads(allowed[2])) == (200, {"vhost": "dev"})
    assert nginx.seen("dev") == [f"localhost POST {STOP} HTTP/1.1 localhost"]
    assert problem_of(*spoofed)["type"] == "urn:cedargate:problem:mapping-error"
    assert nginx.seen("production") == []


# 2. passthrough_hosts is decided on the CONNECT authority alone ---------------------------------------

@pytest.fixture
def passthrough_gate(tmp_path, policy_dir, upstream, sni_front, raw_upstream):
    """cedargate with pinned.example.test and the SNI front on localhost as passthrough hosts."""
    bundle = tmp_path / "cas.pem"
    bundle.write_bytes(upstream.ca_file.read_bytes() + sni_front.ca_file.read_bytes())
    config = write_config(tmp_path / "cedargate.yaml", policy_dir, tmp_path / "state", upstream,
                          upstream_ca_bundle=str(bundle),
                          passthrough_hosts=[PASSTHROUGH, rf"^localhost:{sni_front.port}$"])
    gate = start_cedargate(config)
    sni_front.reset()
    raw_upstream.reset()
    yield gate
    gate.stop()


def test_a_passthrough_host_named_only_in_the_sni_does_not_open_an_undecided_tunnel(passthrough_gate, sni_front):
    gate = passthrough_gate
    with tls(open_tunnel(gate, f"127.0.0.1:{sni_front.port}"), "pinned.example.test",
             gate.ca_cert, sni_front.ca_file) as sock:
        answer = exchange(sock, b"GET /v1/instances HTTP/1.1\r\nHost: pinned.example.test\r\n\r\n")
    problem = problem_of(*answer)
    assert answer[0] == 421 and problem["type"] == "urn:cedargate:problem:mapping-error"
    assert "pinned.example.test" in problem["detail"]
    assert sni_front.server_names == [] and sni_front.calls == []


def test_a_passthrough_host_named_only_in_the_host_header_does_not_open_an_undecided_tunnel(passthrough_gate,
                                                                                            raw_upstream):
    with open_tunnel(passthrough_gate, f"127.0.0.1:{raw_upstream.http_port}") as sock:
        answer = exchange(sock, b"DELETE /v1/volumes/v-1 HTTP/1.1\r\nHost: pinned.example.test\r\n\r\n")
    problem = problem_of(*answer)
    assert answer[0] == 400 and problem["type"] == "urn:cedargate:problem:mapping-error"
    assert "pinned.example.test" in problem["detail"]
    assert raw_upstream.calls == []
    [row] = decision_rows(passthrough_gate, 1)
    assert (row["decision"], row["method"], row["host"]) == ("error", "DELETE", "127.0.0.1")


def test_a_passthrough_tunnel_is_relayed_uninspected_and_on_the_record(passthrough_gate, sni_front):
    gate = passthrough_gate
    # Trusting only the front's CA: a certificate from cedargate would fail the handshake.
    with tls(open_tunnel(gate, f"localhost:{sni_front.port}"), "localhost", sni_front.ca_file) as sock:
        status, _, body = exchange(sock, b"GET /v1/instances HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status == 200 and json.loads(body)["path"] == "/v1/instances"
    assert sni_front.server_names == ["localhost"]
    assert [c.target for c in sni_front.calls] == ["/v1/instances"]
    [event] = audit_events(gate, "passthrough", 1)
    assert event["agent"] == AGENT
    assert json.loads(event["payload"]) == {"host": "localhost", "port": sni_front.port, "server_name": "localhost"}


def test_a_passthrough_tunnel_is_not_relayed_before_its_record_is_committed(passthrough_gate, sni_front):
    """A tunnel relayed uninspected is a forwarded call: it waits for its `passthrough` event to commit,
    and while the record cannot take it (another process holds SQLite's write lock past busy_timeout)
    it is intercepted instead, so no relayed tunnel is ever missing from the record, even after a kill -9."""
    gate = passthrough_gate
    lock = sqlite3.connect(gate.database, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        # Trusting only the front's CA: an intercepted tunnel (cedargate's certificate) fails the handshake.
        with pytest.raises(ssl.SSLError), tls(open_tunnel(gate, f"localhost:{sni_front.port}"), "localhost",
                                               sni_front.ca_file) as sock:
            exchange(sock, b"GET /v1/instances HTTP/1.1\r\nHost: localhost\r\n\r\n")
        os.kill(gate.process.pid, signal.SIGKILL)
        gate.process.wait(10)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert sni_front.calls == []  # nothing relayed that the record does not hold
    assert audit_events(gate, "passthrough", 0) == []


def test_a_passthrough_tunnel_whose_sni_names_another_host_is_not_passed_through(passthrough_gate, sni_front):
    gate = passthrough_gate
    with tls(open_tunnel(gate, f"localhost:{sni_front.port}"), "prod.internal.test",
             gate.ca_cert, sni_front.ca_file) as sock:
        answer = exchange(sock, b"GET /v1/instances HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert answer[0] == 421 and problem_of(*answer)["type"] == "urn:cedargate:problem:mapping-error"
    assert sni_front.server_names == [] and sni_front.calls == []
    assert audit_events(gate, "passthrough", 0) == []


def test_plain_http_to_a_passthrough_host_is_decided_like_any_call(passthrough_gate, raw_upstream, sni_front):
    """Passthrough exists for TLS that cannot be intercepted (pinned certificates); plain HTTP can be decided."""
    with open_tunnel(passthrough_gate, f"localhost:{sni_front.port}") as sock:
        answer = exchange(sock, b"DELETE /v1/volumes/v-1 HTTP/1.1\r\nHost: localhost\r\nPrefer: respond-async\r\n\r\n")
    assert answer[0] == 403 and problem_of(*answer)["type"] == "urn:cedargate:problem:override-pending"
    assert sni_front.calls == []
    [row] = decision_rows(passthrough_gate, 1)
    assert (row["method"], row["host"], row["decision"]) == ("DELETE", "localhost", "escalate")


# 3. The TLS server name is the CONNECT host ---------------------------------------------------------------

@pytest.fixture
def front_gate(tmp_path, policy_dir, upstream, sni_front):
    config = write_config(tmp_path / "cedargate.yaml", policy_dir, tmp_path / "state", upstream,
                          upstream_ca_bundle=str(sni_front.ca_file))
    gate = start_cedargate(config)
    sni_front.reset()
    yield gate
    gate.stop()


def test_an_sni_naming_another_host_than_the_connect_is_refused(front_gate, sni_front):
    """Decided on Host::"localhost", an SNI-routing front would hand the call to prod.internal.test."""
    with tls(open_tunnel(front_gate, f"localhost:{sni_front.port}"), "prod.internal.test",
             front_gate.ca_cert) as sock:
        answer = exchange(sock, f"POST {STOP} HTTP/1.1\r\nHost: localhost:{sni_front.port}\r\n"
                                f"Content-Length: 0\r\n\r\n".encode())
    problem = problem_of(*answer)
    assert answer[0] == 421 and problem["type"] == "urn:cedargate:problem:mapping-error"
    assert "prod.internal.test" in problem["detail"] and "localhost" in problem["detail"]
    assert sni_front.server_names == [] and sni_front.calls == []
    [row] = decision_rows(front_gate, 1)
    assert (row["decision"], row["host"]) == ("error", "localhost")


@pytest.mark.parametrize("authority,server_name", [("localhost", "localhost"), ("LocalHost", "localhost"),
                                                    ("127.0.0.1", None)])
def test_an_sni_naming_the_connect_host_or_none_for_an_address_is_forwarded(front_gate, sni_front, authority,
                                                                            server_name):
    with tls(open_tunnel(front_gate, f"{authority}:{sni_front.port}"), server_name, front_gate.ca_cert) as sock:
        status, _, body = exchange(sock, f"GET /v1/instances HTTP/1.1\r\nHost: {authority}:{sni_front.port}\r\n\r\n"
                                   .encode())
    assert status == 200 and json.loads(body)["path"] == "/v1/instances"
    assert [c.target for c in sni_front.calls] == ["/v1/instances"]
