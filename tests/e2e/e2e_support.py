"""End-to-end harness: the test credentials, a config for the real `cedargate run` process, its fixtures
(`cedargate`, the logging `upstream` and `raw_upstream`, `database_url`) and the servers only the e2e tests
need (a real nginx, an SNI-routing front).

The upstreams and the launcher themselves are shared with bench/ and live in tests/support; they are
re-exported here so the tests import them from one place. Each test gets its own cedargate, started as
users start it (the console script, a YAML config, a policy directory), on port 0 so tests never
collide; the printed listening lines give the ports.
"""

from __future__ import annotations

import hashlib
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.support.launch import AGENT, CEDARGATE, REPO, TOKEN, Cedargate, start_cedargate
from tests.support.upstream import (
    RawCall,
    RawUpstream,
    SeenCall,
    Upstream,
    logging_upstream,
    make_tls,
    serve_raw,
)
from tests.support.upstream import raw_upstream as serve_raw_upstream

__all__ = ["AGENT", "CEDARGATE", "REPO", "TOKEN", "Cedargate", "RawCall", "RawUpstream", "SeenCall", "Upstream",
           "start_cedargate"]

# Reviewers: id -> (bearer token, roles). "ops-bot" as a reviewer exists to prove self-approval is refused.
APPROVERS = {
    "erin": ("erin-token-1", ["engineering-manager"]),
    "max": ("max-token-6", ["engineering-manager"]),
    "sam": ("sam-token-2", ["security"]),
    "lee": ("lee-token-3", ["lead-engineer"]),
    "sec-lead": ("sec-lead-token-4", ["security", "lead-engineer"]),
    "ops-bot": ("ops-bot-reviewer-5", ["engineering-manager"]),
}


@pytest.fixture(scope="session")
def upstream(tmp_path_factory) -> Iterator[Upstream]:
    with logging_upstream(tmp_path_factory.mktemp("upstream")) as served:
        yield served


@pytest.fixture(scope="session")
def raw_upstream(upstream: Upstream) -> Iterator[RawUpstream]:
    with serve_raw_upstream(upstream) as served:
        yield served


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


def recorded_rows(gate: Cedargate, sql: str, expected: int, timeout: float = 10.0) -> list[dict]:
    """The rows `sql` reads from the record once the batching writer has committed `expected` of them,
    and the outcome of every call recorded before it went upstream or into a hold (or, past `timeout`,
    those it has)."""
    import sqlite3

    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(gate.database) as db:
            db.row_factory = sqlite3.Row
            # Outcomes first: rows read after have what they added (they commit together).
            unfinished = db.execute(_WITHOUT_OUTCOME).fetchone()[0]
            rows = [dict(r) for r in db.execute(sql)]
        if len(rows) >= expected and not unfinished or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


# Calls recorded before they went upstream (or into a hold) whose outcome is not on the record yet.
_WITHOUT_OUTCOME = (
    "SELECT count(*) FROM decisions d WHERE d.decision IN ('allow', 'escalate') AND NOT EXISTS "
    "(SELECT 1 FROM audit_log a WHERE a.kind = 'outcome' AND a.decision_id = d.decision_id)"
)


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
    ca_file, cert_file, key_file = make_tls(tmp, extra_names=SNI_BACKENDS)
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
            threading.Thread(target=serve_raw, args=(conn, front.calls, context), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield front
    listener.close()
