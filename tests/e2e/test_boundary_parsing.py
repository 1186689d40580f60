"""Calls a server would read otherwise than cedargate decided them, sent through the real proxy.

Each request is refused with problem+json, and the logging upstream (`raw_upstream`, the bytes read by
h11 as a strict server would) received nothing; the allowed controls show the same calls, written
plainly, reach it unchanged. Requests that a normal client would tidy up (a fragment, control bytes, a
folded header, two Host headers, trailers) are written byte for byte on a raw socket to the proxy, in
absolute form as a plain-HTTP proxy client sends them.
"""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import socket
import ssl
import threading
from dataclasses import dataclass

import httpx
import pytest
import yaml
from e2e_support import AGENT, REPO, TOKEN, start_cedargate, write_config

PROXY_AUTH = b"Basic " + base64.b64encode(f"{AGENT}:{TOKEN}".encode())
STOP = "/v1/instances/i-1/stop"  # ops-stop-instance allows it on localhost (a dev host)
BOUNDARY_POLICY = """
// A refund under investigation: nobody reads it.
@id("sealed-refund")
@reason("Refund o-9 is under investigation.")
forbid (principal, action == Action::"read_refund", resource)
when { context.order_id == "o-9" };
"""


@pytest.fixture(scope="module")
def gate(tmp_path_factory, raw_upstream):
    """cedargate with the bundled policies, and on localhost the bundled refund route and GitHub MCP
    endpoint (its other calls stay plain HTTP actions)."""
    tmp = tmp_path_factory.mktemp("boundary")
    policy_dir = tmp / "policies"
    shutil.copytree(REPO / "policies", policy_dir, ignore=shutil.ignore_patterns("tests"))
    manifest = yaml.safe_load((policy_dir / "actions.yaml").read_text())
    payments, github = manifest["hosts"]
    manifest["hosts"].append({"host": "localhost", "unknown": "http",
                              "routes": [r for r in payments["routes"] if r["action"] == "read_refund"],
                              "mcp": github["mcp"]})
    (policy_dir / "actions.yaml").write_text(yaml.safe_dump(manifest))
    (policy_dir / "boundary.cedar").write_text(BOUNDARY_POLICY)
    gate = start_cedargate(write_config(tmp / "c.yaml", policy_dir, tmp / "state", raw_upstream))
    yield gate
    gate.stop()


@pytest.fixture
def received(raw_upstream):
    """The raw upstream, emptied: what it receives during the test."""
    raw_upstream.reset()
    return raw_upstream


@pytest.fixture
def base(received) -> str:
    return f"http://localhost:{received.http_port}"


def client(gate) -> httpx.Client:
    trust = ssl.create_default_context(cafile=gate.ca_cert)
    return httpx.Client(proxy=gate.proxy_url, verify=trust, timeout=15, headers={"Prefer": "respond-async"})


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def problem(self) -> dict:
        assert self.headers["content-type"] == "application/problem+json"
        return json.loads(self.body)


def _request(method: str, target: bytes, host: bytes, fields: tuple[bytes, ...], body: bytes,
             chunked: bytes | None, proxy_auth: bool) -> bytes:
    head = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: " + host]
    if proxy_auth:
        head.append(b"Proxy-Authorization: " + PROXY_AUTH)
    head += [*fields, b"Transfer-Encoding: chunked" if chunked is not None else b"Content-Length: %d" % len(body)]
    return b"\r\n".join(head) + b"\r\n\r\n" + (chunked if chunked is not None else body)


def _exchange(sock: socket.socket, request: bytes) -> Answer:
    sock.sendall(request)
    response = http.client.HTTPResponse(sock)
    response.begin()
    return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())


def send_raw(gate, method: str, target: bytes, *fields: bytes, body: bytes = b"", chunked: bytes | None = None,
             host: bytes | None = None) -> Answer:
    """One request written byte for byte to the proxy: `fields` are header lines as sent (a line starting
    with a space continues the one before); `chunked` is a chunked body sent as is. An origin-form
    `target` (a path) goes to `host`, as mitmproxy reads it from the Host header."""
    request = _request(method, target, host or target.split(b"/")[2], fields, body, chunked, True)
    with socket.create_connection(("127.0.0.1", gate.proxy_port), timeout=15) as sock:
        return _exchange(sock, request)


def send_in_tunnel(gate, port: int, method: str, path: bytes, *fields: bytes, body: bytes = b"",
                   chunked: bytes | None = None) -> Answer:
    """One request written byte for byte inside a TLS tunnel to localhost:`port` (CONNECT, then TLS with
    cedargate's CA), in origin form as clients send it there."""
    authority = b"localhost:%d" % port
    with socket.create_connection(("127.0.0.1", gate.proxy_port), timeout=15) as sock:
        sock.sendall(b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority
                     + b"\r\nProxy-Authorization: " + PROXY_AUTH + b"\r\n\r\n")
        established = b""
        while not established.endswith(b"\r\n\r\n"):
            established += sock.recv(1)
        assert established.startswith(b"HTTP/1.1 200"), established
        trust = ssl.create_default_context(cafile=gate.ca_cert)
        with trust.wrap_socket(sock, server_hostname="localhost") as tls:
            return _exchange(tls, _request(method, path, authority, fields, body, chunked, False))


def assert_refused(answer, says: str, status: int = 400, problem: str = "mapping-error") -> None:
    if isinstance(answer, httpx.Response):
        answer = Answer(answer.status_code, dict(answer.headers), answer.content)
    assert answer.status == status, answer.body
    body = answer.problem()
    assert body["type"] == f"urn:cedargate:problem:{problem}"
    assert says in body["detail"]


def tool_call(params: str) -> bytes:
    return b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":' + params.encode() + b"}"


# -- 5. JSON keys that are one name to servers matching keys ignoring case -------------------------------

@pytest.mark.parametrize("body", [
    b'{"force": false, "FORCE": true}',
    b'{"options": {"kind": "soft", "\\u212aind": "hard"}}',  # Go folds the Kelvin sign to k
    b'{"steps": [{"task": "drain", "ta\xc5\xbfk": "wipe"}]}',  # ... and the long s to s (here in UTF-8)
])
def test_rest_body_with_keys_equal_ignoring_case_is_refused(gate, received, base, body):
    with client(gate) as http:
        refused = http.post(base + STOP, content=body, headers={"Content-Type": "application/json"})
        allowed = http.post(base + STOP, content=b'{"force": false}', headers={"Content-Type": "application/json"})
    assert_refused(refused, "one name to servers that match keys ignoring case")
    assert allowed.status_code == 200
    assert [(c.method, c.target, c.body) for c in received.calls] == [("POST", STOP, b'{"force": false}')]


@pytest.mark.parametrize("params", [
    # search_issues is allowed; an MCP server built on the Go SDK (before CVE-2026-27896) runs the last.
    '{"name":"search_issues","NAME":"transfer_repository","arguments":{}}',
    # no-merges-to-payments reads arguments.repo; Go reads "argumentſ" as "arguments", the last one.
    '{"name":"merge_pull_request","arguments":{"repo":"acme/web","number":7},'
    '"argument\u017f":{"repo":"acme/payments","number":7}}',
])
def test_mcp_message_with_keys_equal_ignoring_case_is_refused(gate, received, base, params):
    with client(gate) as http:
        refused = http.post(base + "/mcp", content=tool_call(params), headers={"Content-Type": "application/json"})
        allowed = http.post(base + "/mcp", content=tool_call('{"name":"search_issues","arguments":{}}'),
                            headers={"Content-Type": "application/json"})
    assert_refused(refused, "one name to servers that match keys ignoring case")
    assert allowed.status_code == 200
    assert [json.loads(c.body)["params"]["name"] for c in received.calls] == ["search_issues"]


# -- 6. Method and URL overrides ---------------------------------------------------------------------------

@pytest.mark.parametrize("header, says", [
    ("X-HTTP-Method-Override", "real method"),
    ("X-HTTP-Method", "real method"),
    ("X-Method-Override", "real method"),
    ("X_HTTP_METHOD_OVERRIDE", "real method"),  # PHP and Rack read it as X-HTTP-Method-Override
    ("X-Original-URL", "real path"),
    ("X-Rewrite-URL", "real path"),
])
def test_method_and_url_override_headers_are_refused(gate, received, base, header, says):
    value = "/v1/volumes/vol-1" if header.endswith("URL") else "DELETE"
    with client(gate) as http:
        refused = http.post(base + STOP, headers={header: value})
    assert_refused(refused, says)
    assert received.calls == []


@pytest.mark.parametrize("query, content_type, body", [
    ("_method=DELETE", None, b""),
    ("%5Fmethod=DELETE", None, b""),
    ("a=1&.method=DELETE", None, b""),  # PHP reads ".method" as "_method"
    ("", "application/x-www-form-urlencoded", b"reason=stuck&_method=DELETE"),
    ("", None, b"_method=DELETE"),  # Rack reads a POST without a type as a form
    ("", "multipart/form-data; boundary=XyZ",
     b'--XyZ\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--XyZ--\r\n'),
    ("", "application/json", b'{"_method": "DELETE"}'),  # Laravel reads a JSON body's _method
])
def test_method_parameter_in_query_or_body_is_refused(gate, received, base, query, content_type, body):
    headers = {"Content-Type": content_type} if content_type else {}
    with client(gate) as http:
        refused = http.post(base + STOP + ("?" + query if query else ""), content=body, headers=headers)
        allowed = http.post(base + STOP + "?method=graceful", content=b"reason=stuck",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_refused(refused, "send the call with its real method instead")
    assert allowed.status_code == 200
    assert [(c.method, c.target, c.body) for c in received.calls] == [("POST", STOP + "?method=graceful",
                                                                       b"reason=stuck")]


# -- 7. Request-target lookalikes --------------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    # ops-stop-instance's `like "/v1/instances/*/stop"` matches; Node runs POST /v1/instances/i-1.
    b"/v1/instances/i-1#/stop",
    b"/mcp#x",
])
def test_fragment_in_the_request_target_is_refused(gate, received, base, path):
    answer = send_raw(gate, "POST", base.encode() + path, b"Content-Type: application/json",
                      body=tool_call('{"name":"search_issues"}'))
    assert_refused(answer, "'#', which starts a fragment")
    assert received.calls == []


@pytest.mark.parametrize("target", [
    b"/v1/instances/\x1b[2J\x1b[1;1HPOST",  # an escape sequence that repaints a reviewer's terminal
    b"/v1/inst\x7fances",
    b"/v1/instances?zone=\x1b[8m",
    b"/v1/instances?zone=a\x00b",
    # mitmproxy refuses non-ASCII in an absolute-form target itself, but not in origin form (as in tunnels).
    b"/v1/instances/\xc2\x9b31m",  # C1 CSI, UTF-8 encoded
    b"/v1/instances/\x9b31m",  # C1 CSI as a raw byte
])
def test_control_characters_in_path_or_query_are_refused(gate, received, base, target):
    if target.isascii():
        answer = send_raw(gate, "GET", base.encode() + target)
    else:
        answer = send_raw(gate, "GET", target, host=base.encode().split(b"/")[2])
    assert_refused(answer, "percent-encode it")
    assert received.calls == []


def test_path_values_with_semicolons_are_refused(gate, received, base):
    # sealed-refund forbids o-9; Tomcat and Spring run GET /v1/refunds/o-9 for /v1/refunds/o-9;v=1.
    with client(gate) as http:
        parameter = http.get(base + "/v1/refunds/o-9;v=1")
        sealed = http.get(base + "/v1/refunds/o-9")
        other = http.get(base + "/v1/refunds/o-1")
    assert_refused(parameter, "';' parameter")
    assert_refused(sealed, "under investigation", status=403, problem="policy-denied")
    assert other.status_code == 200
    assert [c.target for c in received.calls] == ["/v1/refunds/o-1"]


def test_two_host_headers_are_refused(gate, received, base):
    # Decided on localhost (a dev host, where stopping is routine); a server taking the second Host
    # would stop the instance on 127.0.0.1, which is production-critical.
    production = f"Host: 127.0.0.1:{received.http_port}".encode()
    answer = send_raw(gate, "POST", base.encode() + STOP.encode(), production)
    assert_refused(answer, "more than one Host header")
    assert received.calls == []


@pytest.mark.parametrize("continued", [b" X-HTTP-Method-Override: DELETE", b"\tand more"])
def test_folded_header_lines_are_refused(gate, received, base, continued):
    answer = send_raw(gate, "POST", base.encode() + STOP.encode(), b"X-Trace: t-1", continued)
    assert_refused(answer, "folded line (obs-fold")
    assert received.calls == []


@pytest.mark.parametrize("value", [b"t-1\x1b[2J", b"t-1\x00", b"t-1\x7f", b"t\x0b1"])
def test_control_characters_in_header_values_are_refused(gate, received, base, value):
    answer = send_raw(gate, "POST", base.encode() + STOP.encode(), b"X-Trace: " + value)
    assert_refused(answer, "control character")
    assert received.calls == []


def test_a_tab_inside_a_header_value_is_legal_and_passes(gate, received, base):
    answer = send_raw(gate, "POST", base.encode() + STOP.encode(), b"X-Trace: t-1\tretry 2")
    assert answer.status == 200
    [seen] = received.calls
    assert (seen.method, seen.target, seen.header("x-trace")) == ("POST", STOP, ["t-1\tretry 2"])


def test_chunked_request_with_trailers_is_answered_and_not_forwarded(gate, received, base):
    # mitmproxy's HTTP/1 reader crashed on trailers: the agent waited for an answer that never came.
    answer = send_raw(gate, "POST", base.encode() + STOP.encode(), b"Content-Type: application/json",
                      chunked=b"2\r\n{}\r\n0\r\nX-HTTP-Method-Override: DELETE\r\n\r\n")
    assert_refused(answer, "trailer fields (X-HTTP-Method-Override)")
    assert received.calls == []


def test_trailers_and_control_characters_inside_a_tls_tunnel_are_refused(gate, received):
    port = received.https_port
    trailers = send_in_tunnel(gate, port, "POST", STOP.encode(), b"Content-Type: application/json",
                              chunked=b"2\r\n{}\r\n0\r\nX-Agent-Confidence: 0.1\r\n\r\n")
    control = send_in_tunnel(gate, port, "GET", b"/v1/instances/\xc2\x9b2J")
    allowed = send_in_tunnel(gate, port, "POST", STOP.encode(), b"Content-Type: application/json",
                             chunked=b"2\r\n{}\r\n0\r\n\r\n")
    assert_refused(trailers, "trailer fields (X-Agent-Confidence)")
    assert_refused(control, "U+009B")
    assert allowed.status == 200
    assert [(c.method, c.target, c.body) for c in received.calls] == [("POST", STOP, b"{}")]


def test_an_upstream_answer_with_trailers_is_a_bad_gateway_not_a_hang(gate, received):
    # mitmproxy's HTTP/1 reader crashed on an answer's trailers as it did on a request's.
    done = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as server:
        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                             b"\r\n2\r\n{}\r\n0\r\nX-Checksum: 1\r\n\r\n")
                done.wait(30)  # the connection stays open: only the proxy can end the exchange

        threading.Thread(target=answer, daemon=True).start()
        try:
            answered = send_raw(gate, "GET", b"http://localhost:%d/v1/instances" % server.getsockname()[1])
        finally:
            done.set()
    assert answered.status == 502


def test_chunked_request_without_trailers_is_decided_and_passes(gate, received, base):
    answer = send_raw(gate, "POST", base.encode() + STOP.encode(), b"Content-Type: application/json",
                      chunked=b"2\r\n{}\r\n0\r\n\r\n")
    assert answer.status == 200
    [seen] = received.calls
    assert (seen.method, seen.target, seen.body) == ("POST", STOP, b"{}")
