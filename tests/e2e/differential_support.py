"""The two ends of the differential test's wire: requests written as raw bytes, as an agent could write
them, and read back as the servers behind cedargate would read them.

`send_http1` / `send_http2` write an attempt through the proxy (straight to it, in a CONNECT tunnel, in a
TLS tunnel, or as HTTP/2 in one); `readings` reads a request the `raw_upstream` received every way a kind
of server does, each reading labelled with who reads it so; `forwarded_rows` finds what cedargate
recorded deciding. The policies and the Cedar oracle are the test's (`test_differential.py`).
"""

from __future__ import annotations

import base64
import codecs
import http.client
import ipaddress
import json
import re
import socket
import sqlite3
import ssl
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tests.support.launch import AGENT, TOKEN
from tests.support.upstream import RawCall

METHODS = ("GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE")
CONTEXT_HEADERS = ("content-type", "user-agent", "accept")
OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")
URL_OVERRIDE_HEADERS = ("x-original-url", "x-rewrite-url")
MARK = "{m}"  # the example's marker, filled in when sent: Hypothesis replays and shrinks the same data


@dataclass
class Gate:
    """The one cedargate every example goes through, and what the test reads of it and its upstream."""

    proxy_port: int
    database: Path
    ca_cert: Path
    http_port: int
    https_port: int
    calls: list[RawCall]


def canonical(host: str) -> str:
    """The address a host spelling connects to (`127.1`, `0x7f.0.0.1`, `[::ffff:127.0.0.1]`), written
    apart from cedargate's own `canonical_host` so that a slip there shows here."""
    name = host.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        address = ipaddress.ip_address(name)
        return str(address.ipv4_mapped or address) if address.version == 6 else str(address)
    except ValueError:
        pass
    if re.fullmatch(r"(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}", name):
        try:
            return socket.inet_ntoa(socket.inet_aton(name))
        except OSError:
            pass
    return name


def hostname(authority: str) -> str:
    authority = authority.rsplit("@", 1)[-1]  # a server taking userinfo in stride routes by what follows
    if authority.startswith("["):
        return authority.split("]", 1)[0] + "]"
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


# --- how servers read what arrived ----------------------------------------------------------------------

@dataclass(frozen=True)
class Reading:
    """One way a server may read a request: the values a policy decides on, and who reads it so."""

    how: str
    method: str
    scheme: str
    host: str
    port: int
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    agent: tuple[tuple[str, object], ...] | None  # X-Agent-* statements; None when they are invalid
    body: str | None  # the decided body fields as Cedar JSON text; None when the body is not JSON


class Divergence(AssertionError):
    """What the upstream received is not what cedargate decided."""


def readings(call: RawCall, scheme: str, port: int) -> list[Reading]:
    """Every reading of `call` that some kind of server makes; the first is h11's own."""
    if call.error:
        raise Divergence(f"cedargate forwarded a request a strict server cannot read ({call.error})")
    targets = [("request line", call.target)]
    if "#" in call.target:
        targets.append(("fragment dropped (Node)", call.target.split("#", 1)[0]))
    for name in URL_OVERRIDE_HEADERS:
        targets += [(f"{name} (Symfony, IIS)", v) for v in call.header(name)]
    hosts = [("Host header", hostname(v)) for v in call.header("host")]
    parsed = []
    for how, target in targets:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", target):
            netloc = urlsplit(target.split("#", 1)[0]).netloc
            hosts.append((f"{how} authority (RFC 9112 3.2.2)", hostname(netloc)))
            target = target.split("://", 1)[1][len(netloc):] or "/"
        path, _, query = target.partition("?")
        parsed.append((how, path, query))

    methods = [("request line", call.method.upper())]
    for name in OVERRIDE_HEADERS:
        methods += [(f"{name} (method override)", v.strip().upper()) for v in call.header(name)]
    for _, _, query in parsed:
        for value in _params(query).get("_method", []):
            methods.append(("_method in the query (Rails, Laravel)", value.upper()))
    if _media(call) == "application/x-www-form-urlencoded":
        form = _params(call.body.decode("latin-1"))
        methods += [("_method in the form body (Rails, Laravel)", v.upper()) for v in form.get("_method", [])]

    headers = tuple((n, ", ".join(call.header(n))) for n in CONTEXT_HEADERS if call.header(n))
    agent = _agent_statements(call)
    out = []
    for method_how, method in methods:
        for host_how, host in hosts or [("no host", "")]:
            for path_how, path, query in parsed:
                for body_how, body in _json_readings(call):
                    how = "; ".join(dict.fromkeys((method_how, host_how, path_how, body_how)))
                    out.append(Reading(how, method, scheme, canonical(host), port, path, query, headers,
                                       agent, body))
    return out


def _params(query: str) -> dict[str, list[str]]:
    try:
        return parse_qs(query, keep_blank_values=True)
    except ValueError:
        return {}


def _media(call: RawCall) -> str:
    return ", ".join(call.header("content-type")).split(";", 1)[0].strip().lower()


def _agent_statements(call: RawCall) -> tuple | None:
    values = call.header("x-agent-confidence")
    if not values:
        return ()
    value = ", ".join(values).strip()
    if not re.fullmatch(r"0(\.\d{1,4})?|1(\.0{1,4})?", value):
        return None
    return (("confidence", {"__extn": {"fn": "decimal", "arg": value if "." in value else value + ".0"}}),)


class _Object(list):
    """A JSON object as its members in order, repeated keys and all."""


JSON_KEY_RULES = (("JSON keys exact, last wins (JavaScript, Python)", False, True),
                  ("JSON keys exact, first wins", False, False),
                  ("JSON keys ignoring case, last wins (Go, ASP.NET)", True, True),
                  ("JSON keys ignoring case, first wins", True, False))


def _json_readings(call: RawCall) -> list[tuple[str, str | None]]:
    """The body's decided fields (`amount`, `sku`) as each kind of JSON server reads them."""
    content_types = call.header("content-type")
    medias = {v.split(";", 1)[0].strip().lower() for v in content_types}
    if not call.body or not any(m in ("application/json", "text/json") or m.endswith("+json")
                                for m in medias):
        return [("no JSON body", None)]
    charsets = {m.group(1).strip('"').lower() for v in content_types
                for m in [re.search(r"charset\s*=\s*([^;\s]+)", v, re.I)] if m} or {"utf-8"}
    out = []
    for charset in charsets:
        try:
            text = call.body.decode(codecs.lookup(charset).name)
        except (LookupError, UnicodeDecodeError):
            continue
        try:  # RFC 8259, a repeated key refused
            strict = json.loads(text, object_pairs_hook=_unique, parse_constant=_no_constant)
            out.append(("strict JSON", decided_fields(strict)))
        except (ValueError, RecursionError):
            pass
        try:  # most servers' parsers: NaN taken (Python), repeated keys taken
            members = json.loads(text, object_pairs_hook=_Object)
        except (ValueError, RecursionError):
            continue  # no server reads it: each answers 400 and executes nothing
        if not isinstance(members, _Object):
            out.append(("JSON", decided_fields(members)))
            continue
        for how, fold, last in JSON_KEY_RULES:
            picked = {}
            for name in ("amount", "sku"):
                found = [v for k, v in members if (k.casefold() == name if fold else k == name)]
                if found:
                    picked[name] = found[-1] if last else found[0]
            out.append((how, decided_fields(picked)))
    return list(dict.fromkeys(out)) or [("JSON no server reads", None)]


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _unique(pairs):
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("duplicate key")
    return dict(pairs)


def decided_fields(value) -> str:
    """The body as the policies see it, as JSON text: an object's `amount` and `sku`, or the value itself."""
    if isinstance(value, dict):
        value = {k: value[k] for k in ("amount", "sku") if k in value}
    return json.dumps(_cedar_value(value), sort_keys=True)


def _cedar_value(value):
    """As `proxy.calls.mapping` documents the body in the context: no nulls, floats as decimals, integers past
    Cedar's Long as strings."""
    if isinstance(value, _Object):
        value = dict(value)
    if isinstance(value, float):
        if abs(value) < 922_337_203_685_477 and round(value, 4) == value:
            return {"__extn": {"fn": "decimal", "arg": f"{value:.4f}"}}
        return repr(value)
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        return str(value)
    if isinstance(value, list):
        return [_cedar_value(v) for v in value if v is not None]
    if isinstance(value, dict):
        return {k: _cedar_value(v) for k, v in value.items() if v is not None}
    return value


# --- the record -------------------------------------------------------------------------------------

def decision_rows(database: Path, after: int) -> list[dict]:
    with closing(sqlite3.connect(database)) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM decisions WHERE id > ? ORDER BY id", (after,))]


def last_row_id(database: Path) -> int:
    if not database.exists():
        return 0
    with closing(sqlite3.connect(database)) as db:
        return db.execute("SELECT coalesce(max(id), 0) FROM decisions").fetchone()[0]


def decision_row(database: Path, decision_id: str) -> dict:
    """The record of one decision, once the batching writer has committed it."""
    deadline = time.monotonic() + 5
    while True:
        with closing(sqlite3.connect(database)) as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM decisions WHERE decision_id = ?", (decision_id,)).fetchone()
        if row is not None or time.monotonic() > deadline:
            assert row is not None, f"decision {decision_id} was not recorded"
            return dict(row)
        time.sleep(0.03)


def forwarded_rows(gate: Gate, after: int, marker: str, expected: int) -> list[dict]:
    """The decisions on this example's paths, once the batching writer has committed `expected` forwarded
    ones (or after 5 s: a request nobody decided has none)."""
    deadline = time.monotonic() + 5
    while True:
        rows = [r for r in decision_rows(gate.database, after) if marker in r["path"]]
        if sum(r["upstream_status"] is not None for r in rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.03)


# --- writing requests -----------------------------------------------------------------------------------

@dataclass
class Sent:
    """One attempt as sent: its marker, where it went, the bytes, and the answer (if any)."""

    marker: str
    scheme: str
    port: int
    wire: bytes = b""
    status: int | None = None
    content_type: str | None = None
    answer: bytes = b""
    note: str = ""

    def problem(self) -> dict:
        """The answer as the problem+json (RFC 9457) cedargate refuses with."""
        assert self.content_type == "application/problem+json", (self.status, self.content_type, self.answer)
        return json.loads(self.answer)


def _basic() -> str:
    return "Basic " + base64.b64encode(f"{AGENT}:{TOKEN}".encode()).decode()


def _open(gate: Gate, transport: str, connect: str, port: int, sni: str | None, alpn: str):
    sock = socket.create_connection(("127.0.0.1", gate.proxy_port), timeout=3)
    if transport == "forward":
        return sock
    sock.sendall(f"CONNECT {connect}:{port} HTTP/1.1\r\nHost: {connect}:{port}\r\n"
                 f"Proxy-Authorization: {_basic()}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("the proxy closed the tunnel")
        head += data
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        sock.close()
        raise ConnectionError(f"CONNECT answered {status}")
    if transport == "tunnel":
        return sock
    context = ssl.create_default_context(cafile=str(gate.ca_cert))
    context.check_hostname = False  # an SNI naming another host is one of the things tried
    context.set_alpn_protocols([alpn])
    return context.wrap_socket(sock, server_hostname=sni)


@dataclass(frozen=True)
class Http1Attempt:
    """One HTTP/1.1 request as the bytes an agent writes; `{m}` is the marker, `{port}` the upstream's."""

    transport: str  # "forward" (to the proxy), "tunnel" (CONNECT), "tls" (CONNECT, then TLS)
    scheme: str
    connect: str  # the host in CONNECT, or in the URL of a forwarded request
    sni: str | None
    method: str
    target: str
    header_lines: tuple[str, ...]  # as written, odd spacing and folds included
    framing: str  # a key of FRAMINGS
    body: bytes
    version: str = "HTTP/1.1"

    def wire(self, marker: str, port: int) -> bytes:
        def fill(text: str) -> str:
            return text.replace(MARK, marker).replace("{port}", str(port))

        lines = [f"{fill(self.method)} {fill(self.target)} {self.version}"]
        if self.transport == "forward":
            lines.append(f"Proxy-Authorization: {_basic()}")
        lines += [fill(line) for line in self.header_lines]
        framing_lines, framed = FRAMINGS[self.framing]
        body = self.body.replace(MARK.encode(), marker.encode())
        head = "\r\n".join(lines + framing_lines(body)).encode("utf-8", "surrogateescape") + b"\r\n\r\n"
        after = framed(body).replace(MARK.encode(), marker.encode())
        return head + after.replace(b"{port}", str(port).encode())


def _chunks(body: bytes, trailer: bytes = b"", extension: bytes = b"") -> bytes:
    half = len(body) // 2
    parts = [p for p in (body[:half], body[half:]) if p]
    return b"".join(b"%x%s\r\n%s\r\n" % (len(p), extension, p) for p in parts) + b"0\r\n" + trailer + b"\r\n"


SMUGGLED = b"GET /d/{m}/smuggled?deny=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"

# How a body is framed: the header lines that say so, and the bytes that follow the head.
FRAMINGS: dict[str, tuple[Callable[[bytes], list[str]], Callable[[bytes], bytes]]] = {
    "none": (lambda b: [], lambda b: b""),
    "length": (lambda b: [f"Content-Length: {len(b)}"], lambda b: b),
    "chunked": (lambda b: ["Transfer-Encoding: chunked"], _chunks),
    "chunked with extension": (lambda b: ["Transfer-Encoding: chunked"],
                               lambda b: _chunks(b, extension=b";x=1")),
    "chunked with trailer": (lambda b: ["Transfer-Encoding: chunked"],
                             lambda b: _chunks(b, trailer=b"X-Trailer: 1\r\n")),
    "Chunked, spaced": (lambda b: ["Transfer-Encoding:  Chunked "], _chunks),
    "gzip, chunked": (lambda b: ["Transfer-Encoding: gzip, chunked"], _chunks),
    "chunked and length": (lambda b: ["Transfer-Encoding: chunked", f"Content-Length: {len(b)}"], _chunks),
    "two transfer-encodings": (lambda b: ["Transfer-Encoding: chunked", "Transfer-Encoding: identity"],
                               _chunks),
    "two equal lengths": (lambda b: [f"Content-Length: {len(b)}"] * 2, lambda b: b),
    "two lengths": (lambda b: [f"Content-Length: {len(b)}", f"Content-Length: {len(b) + 5}"],
                    lambda b: b + b"12345"),
    "length list": (lambda b: [f"Content-Length: {len(b)}, {len(b)}"], lambda b: b),
    "signed length": (lambda b: [f"Content-Length: +{len(b)}"], lambda b: b),
    "pipelined after length": (lambda b: [f"Content-Length: {len(b)}"], lambda b: b + SMUGGLED),
}


def send_http1(gate: Gate, attempt: Http1Attempt) -> Sent:
    port = gate.https_port if attempt.scheme == "https" else gate.http_port
    sent = Sent(uuid.uuid4().hex[:12], attempt.scheme, port)
    sent.wire = attempt.wire(sent.marker, port)
    try:
        sock = _open(gate, attempt.transport, attempt.connect, port, attempt.sni, "http/1.1")
    except (OSError, ConnectionError) as exc:
        sent.note = f"tunnel refused: {exc}"
        return sent
    with sock:
        try:
            sock.sendall(sent.wire)
            response = http.client.HTTPResponse(sock, method=attempt.method.upper())
            response.begin()
            sent.status, sent.content_type = response.status, response.getheader("content-type")
            sent.answer = response.read()
        except (OSError, http.client.HTTPException) as exc:
            sent.note = f"no answer: {exc!r}"
            return sent
        if attempt.framing == "pipelined after length":
            sock.settimeout(1.0)  # the second request's answer, so that its arrival counts for this example
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
    return sent


@dataclass(frozen=True)
class Http2Attempt:
    """One HTTP/2 request in a TLS tunnel (ALPN h2); mitmproxy sends it to the upstream as HTTP/1.1."""

    connect: str
    sni: str | None
    headers: tuple[tuple[str, str], ...]  # pseudo-headers and fields as written, no validation
    body: bytes
    content_length: str  # "right", "none" or "wrong": the content-length field added


def send_http2(gate: Gate, attempt: Http2Attempt) -> Sent:
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions

    port = gate.https_port
    sent = Sent(uuid.uuid4().hex[:12], "https", port)
    body = attempt.body.replace(MARK.encode(), sent.marker.encode()).replace(b"{port}", str(port).encode())
    headers = [(n, v.replace(MARK, sent.marker).replace("{port}", str(port))) for n, v in attempt.headers]
    if attempt.content_length != "none":
        headers.append(("content-length", str(len(body) + (3 if attempt.content_length == "wrong" else 0))))
    sent.wire = repr(headers).encode() + b" " + body
    try:
        sock = _open(gate, "tls", attempt.connect, port, attempt.sni, "h2")
    except (OSError, ConnectionError) as exc:
        sent.note = f"tunnel refused: {exc}"
        return sent
    config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False,
                                       normalize_outbound_headers=False, validate_inbound_headers=False)
    conn = h2.connection.H2Connection(config)
    with sock:
        if sock.selected_alpn_protocol() != "h2":
            sent.note = f"ALPN chose {sock.selected_alpn_protocol()}"
            return sent
        try:
            conn.initiate_connection()
            conn.send_headers(1, headers, end_stream=not body)
            if body:
                conn.send_data(1, body, end_stream=True)
            sock.sendall(conn.data_to_send())
            ended = False
            while not ended and (data := sock.recv(65536)):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        fields = dict(event.headers)
                        sent.status = int(fields[b":status"])
                        sent.content_type = fields.get(b"content-type", b"").decode() or None
                    elif isinstance(event, h2.events.DataReceived):
                        sent.answer += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset,
                                            h2.events.ConnectionTerminated)):
                        ended = True
                sock.sendall(conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError) as exc:
            sent.note = f"no answer: {exc!r}"
    return sent
