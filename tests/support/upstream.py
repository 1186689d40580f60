"""The logging upstreams tests send calls to: servers on loopback (HTTP and HTTPS) that record what reaches
them, so a test can say what got through.

`logging_upstream` parses with the standard library's HTTP server and records each call's method, path,
headers and body; `raw_upstream` logs the raw bytes of each request and reads them with h11, as a strict
server would. Both answer 200 with `{"ok": true, "method": ..., "path": ...}`. `make_tls` makes the
private CA and leaf certificate they (and any other test server) serve HTTPS with.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class SeenCall:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    """A loopback API that records every call it receives, so tests can say what got through."""

    http_port: int
    https_port: int
    ca_file: Path
    calls: list[SeenCall] = field(default_factory=list)

    def reset(self) -> None:
        self.calls.clear()


def _logging_handler(calls: list[SeenCall]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            calls.append(SeenCall(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            payload = json.dumps({"ok": True, "method": self.command, "path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve

        def log_message(self, *args) -> None:
            pass

    return Handler


def make_tls(tmp: Path, extra_names: tuple[str, ...] = ()) -> tuple[Path, Path, Path]:
    """A private CA and a leaf for localhost/127.0.0.1 (and `extra_names`), as an internal service would have."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cedargate test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1")),
                                         *(x509.DNSName(name) for name in extra_names)]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = tmp / "upstream-ca.pem", tmp / "upstream.pem", tmp / "upstream-key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_file, cert_file, key_file


@contextmanager
def logging_upstream(tmp: Path) -> Iterator[Upstream]:
    """A recording upstream on loopback, over HTTP and HTTPS; its CA and certificate go to `tmp`."""
    ca_file, cert_file, key_file = make_tls(tmp)
    calls: list[SeenCall] = []
    plain = ThreadingHTTPServer(("127.0.0.1", 0), _logging_handler(calls))
    secure = ThreadingHTTPServer(("127.0.0.1", 0), _logging_handler(calls))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    secure.socket = context.wrap_socket(secure.socket, server_side=True)
    for server in (plain, secure):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Upstream(plain.server_address[1], secure.server_address[1], ca_file, calls)
    plain.shutdown()
    secure.shutdown()


@contextmanager
def plain_upstream_on(port: int) -> Iterator[list[SeenCall]]:
    """A recording plain-HTTP upstream on a given loopback port (one that refused connections before, say);
    yields the calls it receives."""
    calls: list[SeenCall] = []
    server = ThreadingHTTPServer(("127.0.0.1", port), _logging_handler(calls))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield calls
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class RawCall:
    """One request as the bytes a server received, and as a strict HTTP/1.1 parser (h11) reads them."""

    raw: bytes
    method: str | None = None
    target: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    error: str | None = None  # what h11 refused, when it could not read the request

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


@dataclass
class RawUpstream:
    """A loopback server that logs the raw bytes of every request, read by h11 as a strict server would.

    Tests of the enforcement boundary assert on what the upstream received, byte for byte: the call
    cedargate decided, or nothing.
    """

    http_port: int
    https_port: int
    ca_file: Path
    calls: list[RawCall] = field(default_factory=list)

    def reset(self) -> None:
        self.calls.clear()


def serve_raw(conn: socket.socket, calls: list[RawCall], tls: ssl.SSLContext | None) -> None:
    """Serve one accepted connection: log each request's bytes as h11 reads them, answer 200."""
    import h11

    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
    conn.settimeout(10)
    try:
        if tls is not None:
            conn = tls.wrap_socket(conn, server_side=True)
        while True:
            raw = bytearray()
            call: RawCall | None = None
            while True:
                try:
                    event = parser.next_event()
                except h11.RemoteProtocolError as exc:
                    calls.append(RawCall(bytes(raw), error=str(exc)))
                    return
                if event is h11.NEED_DATA:
                    data = conn.recv(65536)
                    if not data:
                        if raw:
                            calls.append(RawCall(bytes(raw), error="connection closed mid-request"))
                        return
                    raw += data
                    parser.receive_data(data)
                elif isinstance(event, h11.Request):
                    call = RawCall(b"", event.method.decode(), event.target.decode("latin-1"),
                                   [(k.decode().lower(), v.decode("latin-1")) for k, v in event.headers])
                elif isinstance(event, h11.Data) and call is not None:
                    call.body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage) and call is not None:
                    call.raw = bytes(raw)
                    calls.append(call)
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
            payload = json.dumps({"ok": True, "method": call.method, "path": call.target}).encode()
            conn.sendall(parser.send(h11.Response(status_code=200, headers=[
                ("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])))
            conn.sendall(parser.send(h11.Data(data=payload)) + parser.send(h11.EndOfMessage()))
            parser.start_next_cycle()
    except (OSError, ssl.SSLError, h11.LocalProtocolError):
        return
    finally:
        conn.close()


@contextmanager
def raw_upstream(upstream: Upstream) -> Iterator[RawUpstream]:
    """A raw-logging upstream on loopback, over HTTP and HTTPS, with the same certificate as `upstream`
    (so a cedargate whose upstream_ca_bundle trusts one trusts both)."""
    ca_file = upstream.ca_file
    cert_file, key_file = ca_file.parent / "upstream.pem", ca_file.parent / "upstream-key.pem"
    calls: list[RawCall] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    listeners = []
    for secure in (False, True):
        sock = socket.create_server(("127.0.0.1", 0))
        listeners.append(sock)

        def accept(sock: socket.socket = sock, secure: bool = secure) -> None:
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                threading.Thread(target=serve_raw, args=(conn, calls, context if secure else None),
                                 daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
    yield RawUpstream(listeners[0].getsockname()[1], listeners[1].getsockname()[1], ca_file, calls)
    for sock in listeners:
        sock.close()
