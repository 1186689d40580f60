"""End-to-end harness: a real upstream on loopback (HTTP and HTTPS) and the real `cedargate run` process.

Each test gets its own cedargate, started as users start it (the console script, a YAML config, a
policy directory), on port 0 so tests never collide; the printed listening lines give the ports.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[2]
CEDARGATE = Path(sys.executable).parent / "cedargate"
AGENT, TOKEN = "ops-bot", "e2e-token-3f9c1a"
# Reviewers: id -> (bearer token, roles). "ops-bot" as a reviewer exists to prove self-approval is refused.
APPROVERS = {
    "erin": ("erin-token-1", ["engineering-manager"]),
    "max": ("max-token-6", ["engineering-manager"]),
    "sam": ("sam-token-2", ["security"]),
    "lee": ("lee-token-3", ["lead-engineer"]),
    "sec-lead": ("sec-lead-token-4", ["security", "lead-engineer"]),
    "ops-bot": ("ops-bot-reviewer-5", ["engineering-manager"]),
}


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


def _handler(calls: list[SeenCall]):
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


def _make_tls(tmp: Path, extra_names: tuple[str, ...] = ()) -> tuple[Path, Path, Path]:
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


@pytest.fixture(scope="session")
def upstream(tmp_path_factory) -> Upstream:
    tmp = tmp_path_factory.mktemp("upstream")
    ca_file, cert_file, key_file = _make_tls(tmp)
    calls: list[SeenCall] = []
    plain = ThreadingHTTPServer(("127.0.0.1", 0), _handler(calls))
    secure = ThreadingHTTPServer(("127.0.0.1", 0), _handler(calls))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    secure.socket = context.wrap_socket(secure.socket, server_side=True)
    for server in (plain, secure):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Upstream(plain.server_address[1], secure.server_address[1], ca_file, calls)
    plain.shutdown()
    secure.shutdown()


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


def _serve_raw(conn, calls: list[RawCall], tls: ssl.SSLContext | None) -> None:
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


@pytest.fixture(scope="session")
def raw_upstream(upstream: Upstream) -> RawUpstream:
    import socket

    # The same certificate as `upstream`, so cedargate's upstream_ca_bundle trusts both.
    ca_file = upstream.ca_file
    cert_file, key_file = ca_file.parent / "upstream.pem", ca_file.parent / "upstream-key.pem"
    calls: list[RawCall] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    listeners = []
    for secure in (False, True):
        sock = socket.create_server(("127.0.0.1", 0))
        listeners.append(sock)

        def accept(sock=sock, secure=secure) -> None:
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                threading.Thread(target=_serve_raw, args=(conn, calls, context if secure else None),
                                 daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
    yield RawUpstream(listeners[0].getsockname()[1], listeners[1].getsockname()[1], ca_file, calls)
    for sock in listeners:
        sock.close()


@dataclass
class Cedargate:
    process: subprocess.Popen
    proxy_port: int
    api_port: int
    state_dir: Path
    policy_dir: Path
    output: list[str]

    @property
    def proxy_url(self) -> str:
        return f"http://{AGENT}:{TOKEN}@127.0.0.1:{self.proxy_port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def ca_cert(self) -> Path:
        return self.state_dir / "mitmproxy-ca-cert.pem"

    @property
    def database(self) -> Path:
        return self.state_dir / "cedargate.db"

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def write_config(path: Path, policy_dir: Path, state_dir: Path, upstream: Upstream, **extra) -> Path:
    config = {
        "proxy": {"host": "127.0.0.1", "port": 0},
        "api": {"host": "127.0.0.1", "port": 0},
        "policy_dir": str(policy_dir),
        "state_dir": str(state_dir),
        "policy_reload_interval": 0.2,
        "upstream_ca_bundle": str(upstream.ca_file),
        "agents": {AGENT: {"token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}},
        "approvers": {
            name: {"token_sha256": hashlib.sha256(token.encode()).hexdigest(), "roles": roles}
            for name, (token, roles) in APPROVERS.items()
        },
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def start_cedargate(config: Path, *extra_args: str, timeout: float = 30.0, preexec_fn=None) -> Cedargate:
    """`preexec_fn` runs in the child before cedargate starts (e.g. to lower its open-file limit)."""
    loaded = yaml.safe_load(config.read_text())
    process = subprocess.Popen(
        [str(CEDARGATE), "run", "--config", str(config), *extra_args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=preexec_fn,
    )
    output: list[str] = []
    ports: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while len(ports) < 2:
        line = process.stdout.readline()
        if not line:
            process.wait(5)
            raise RuntimeError("cedargate exited before listening:\n" + "".join(output))
        output.append(line)
        listening = re.match(r"cedargate (proxy|API) listening on http://[^\s]+:(\d+)$", line.strip())
        if listening:
            ports[listening.group(1)] = int(listening.group(2))
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("cedargate did not start in time:\n" + "".join(output))
    # Keep draining output so the child never blocks on a full pipe.
    threading.Thread(target=lambda: output.extend(process.stdout), daemon=True).start()
    return Cedargate(process, ports["proxy"], ports["API"], Path(loaded["state_dir"]), Path(loaded["policy_dir"]), output)


def recorded_rows(gate: Cedargate, sql: str, expected: int, timeout: float = 10.0) -> list[dict]:
    """The rows `sql` reads from the record once the batching writer has committed `expected` of them
    (or, past `timeout`, those it has)."""
    import sqlite3

    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(gate.database) as db:
            db.row_factory = sqlite3.Row
            rows = [dict(r) for r in db.execute(sql)]
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request):
    """None (the embedded SQLite default), or a fresh schema on the real PostgreSQL server."""
    if request.param == "sqlite":
        yield None
        return
    import sqlalchemy

    schema = f"cg_e2e_{uuid.uuid4().hex[:12]}"
    server = sqlalchemy.create_engine(PG_SERVER)
    try:
        with server.begin() as conn:
            conn.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    except sqlalchemy.exc.OperationalError as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}")
    yield f"{PG_SERVER}?options=-csearch_path%3D{schema}"
    with server.begin() as conn:
        conn.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
    server.dispose()


@pytest.fixture
def cedargate(tmp_path, policy_dir, upstream):
    gate = start_cedargate(write_config(tmp_path / "cedargate.yaml", policy_dir, tmp_path / "state", upstream))
    upstream.reset()
    yield gate
    gate.stop()


@dataclass
class Nginx:
    """A real nginx on loopback with two virtual hosts, as a shared front would have them.

    `localhost` is the "dev" server; every other name, 127.0.0.1 included, reaches the default
    "production" server. Both listen on the same HTTP and HTTPS ports, so which vhost served a call is
    nginx's own routing (RFC 9112 section 3.2.2: an absolute-form target wins over Host). Each vhost
    logs `$server_name $request $host` to its own file, so tests can say which one saw a call and the
    request line it got.
    """

    http_port: int
    https_port: int
    directory: Path

    VHOSTS = ("dev", "production")

    def seen(self, vhost: str) -> list[str]:
        """The access log lines of `vhost` ("dev" or "production"), one per request it served."""
        log = self.directory / f"{vhost}.access.log"
        return log.read_text().splitlines() if log.exists() else []

    def reset(self) -> None:
        for vhost in self.VHOSTS:
            (self.directory / f"{vhost}.access.log").write_text("")


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _nginx_conf(directory: Path, http_port: int, https_port: int, cert: Path, key: Path) -> str:
    def server(vhost: str, names: str, default: str) -> str:
        return f"""
    server {{
        listen 127.0.0.1:{http_port}{default};
        listen 127.0.0.1:{https_port} ssl{default};
        server_name {names};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        access_log {directory}/{vhost}.access.log vhost;
        default_type application/json;
        location / {{ return 200 '{{"vhost": "{vhost}"}}'; }}
    }}"""

    temp = directory / "temp"
    return f"""daemon off;
master_process on;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 64; }}
http {{
    log_format vhost '$server_name $request $host';
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
{server("production", "production.invalid", " default_server")}
{server("dev", "localhost", "")}
}}
"""


@pytest.fixture(scope="module")
def nginx(tmp_path_factory, upstream: Upstream):
    """nginx serving the "dev" (localhost) and default "production" vhosts over HTTP and HTTPS."""
    import shutil
    import socket

    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light): the vhost routing tests need it")
    directory = tmp_path_factory.mktemp("nginx")
    (directory / "temp").mkdir()
    # The same certificate as `upstream`, so cedargate's upstream_ca_bundle trusts it.
    cert, key = upstream.ca_file.parent / "upstream.pem", upstream.ca_file.parent / "upstream-key.pem"
    http_port, https_port = _free_loopback_port(), _free_loopback_port()
    conf = directory / "nginx.conf"
    conf.write_text(_nginx_conf(directory, http_port, https_port, cert, key))
    process = subprocess.Popen([binary, "-c", str(conf), "-p", str(directory), "-e", str(directory / "error.log")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    for port in (http_port, https_port):
        while True:
            if process.poll() is not None:
                log = directory / "error.log"
                raise RuntimeError("nginx exited at start:\n" + (log.read_text() if log.exists() else ""))
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    process.kill()
                    raise RuntimeError(f"nginx did not listen on {port} in time") from None
                time.sleep(0.05)
    served = Nginx(http_port, https_port, directory)
    served.reset()
    yield served
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@dataclass
class SniFront:
    """An HTTPS front that routes by TLS SNI, as SNI-routing load balancers do: it records the server
    name of every handshake it receives and the requests that follow (read by h11, as `raw_upstream`).

    Its certificate (from its own CA, `ca_file`) names `localhost`, 127.0.0.1 and every name in
    `backends`, so a proxy that sent it another SNI would be let in.
    """

    port: int
    ca_file: Path
    backends: tuple[str, ...]
    server_names: list[str | None] = field(default_factory=list)
    calls: list[RawCall] = field(default_factory=list)

    def reset(self) -> None:
        self.server_names.clear()
        self.calls.clear()


SNI_BACKENDS = ("prod.internal.test", "pinned.example.test")


@pytest.fixture(scope="module")
def sni_front(tmp_path_factory):
    import socket

    tmp = tmp_path_factory.mktemp("sni-front")
    ca_file, cert_file, key_file = _make_tls(tmp, extra_names=SNI_BACKENDS)
    front = SniFront(0, ca_file, SNI_BACKENDS)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    context.sni_callback = lambda _conn, name, _ctx: front.server_names.append(name)
    listener = socket.create_server(("127.0.0.1", 0))
    front.port = listener.getsockname()[1]

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_serve_raw, args=(conn, front.calls, context), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield front
    listener.close()
