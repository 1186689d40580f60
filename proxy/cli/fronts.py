"""The two fronts around one `Runtime`, as both ways of running cedargate compose them.

`cedargate run` (`proxy.cli.serve`) and stock `mitmdump -s addons/enforcer.py` (`proxy.cli.standalone`)
take from here what they must do alike: refuse a non-loopback address unless it is meant, give mitmproxy
cedargate's options (its CA in the state directory, no upstream contacted or raw bytes relayed before a
decision, the operator's upstream CAs), and build the override API on a socket bound up front, so a
taken port is an error that says so rather than uvicorn ending the process.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.calls.connections import ConnectionGuard, default_connection_cap
from proxy.runtime import Runtime
from proxy.settings.config import ConfigError, Settings
from proxy.vocabulary.hosts import is_loopback

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger(__name__)

API_ACCEPT_BACKLOG = 128  # as mitmproxy's proxy (asyncio's default, 100), not uvicorn's 2,048


def check_loopback(name: str, host: str, allowed: bool, how_to_allow: str) -> None:
    """Refuse (`ConfigError`) to listen where others can reach, unless the operator allowed it; then warn."""
    if is_loopback(host):
        return
    if not allowed:
        raise ConfigError(
            f"refusing to bind the {name} to non-loopback address {host}: agents or others on the network "
            f"could reach it; {how_to_allow} to mean it"
        )
    log.warning("the %s listens on non-loopback address %s", name, host)


def mitmproxy_options(settings: Settings) -> dict[str, Any]:
    """The mitmproxy options every cedargate proxy runs with."""
    options: dict[str, Any] = {
        # The CA agents must trust lives with cedargate's other state, not in ~/.mitmproxy.
        "confdir": str(settings.state_dir),
        # Contact no upstream before the call is decided (eager would connect on CONNECT).
        "connection_strategy": "lazy",
        # Bytes in a tunnel that are not HTTP would be relayed as raw TCP, undecided: refuse them.
        # (passthrough_hosts is not mitmproxy's ignore_hosts, which matches SNI and Host too: see
        # addons.passthrough.)
        "rawtcp": False,
    }
    if settings.upstream_ca_bundle:
        options["ssl_verify_upstream_trusted_ca"] = str(settings.upstream_ca_bundle)
    return options


def ca_cert(confdir: str | Path) -> Path:
    """The CA certificate agents must trust; mitmproxy writes it when its TLS addon starts running."""
    return Path(confdir).expanduser() / "mitmproxy-ca-cert.pem"


def ensure_ca(state_dir: Path) -> Path:
    """Make mitmproxy's CA in the state directory if it has none, under a lock; returns its certificate.

    mitmproxy makes its CA when its TLS addon first configures, writing one file after another: two
    processes starting at once on one new state directory (two `cedargate run`, or the workers of one)
    would each make a CA of their own, the last written overwriting the first while its process signs
    with it, or read a file half written. Made here first, under a lock, every proxy finds it whole.
    """
    from mitmproxy.certs import CertStore

    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state_dir / "mitmproxy-ca.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel should this process die holding it
        # mitmproxy's own names and key size (its TlsConfig's CONF_BASENAME and key_size default).
        CertStore.from_store(state_dir, "mitmproxy", 2048)
    finally:
        os.close(fd)
    return ca_cert(state_dir)


def bind_api(settings: Settings) -> socket.socket:
    """The override API's listening socket, or `ConfigError` naming the address and what to change."""
    host, port = settings.api.host, settings.api.port
    # IPPROTO_TCP, so asyncio sets TCP_NODELAY on its connections (see proxy.cli.master.listening_socket).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses the port
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"the override API cannot listen on {host}:{port}: {exc.strerror or exc}; set api.port (or "
            "api.host) to a free address, or 0 for any free port"
        ) from exc
    return sock


def api_server(runtime: Runtime, open_files: int) -> uvicorn.Server:
    """The override API as a uvicorn server on the caller's event loop, whose signal handlers stop it."""
    import uvicorn

    from override_api.connections import close_connection, guarded_protocol
    from override_api.main import create_app

    settings = runtime.settings

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # the composer's handlers stop both fronts
            yield

    # The API's connections under the same timeouts and cap as the proxy's (see override_api.connections);
    # not uvicorn's limit_concurrency, which counts idle connections and would answer everyone 503.
    guard = ConnectionGuard(
        "API", header_timeout=settings.header_read_timeout, idle_timeout=settings.idle_timeout,
        max_unproven=settings.max_unauthenticated_connections or default_connection_cap(open_files),
        close=close_connection, unproven="were idle",
    )
    return _Server(uvicorn.Config(
        create_app(runtime), host=settings.api.host, port=settings.api.port, log_level="warning",
        lifespan="off", http=guarded_protocol(guard),
        # Typed int by uvicorn, which only hands it to loop.call_later: a float is kept as it is.
        timeout_keep_alive=settings.idle_timeout,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=settings.max_header_bytes,
        # asyncio accepts up to `backlog` connections at once, before the guard sees any: uvicorn's 2,048
        # would take every free file in a flood, and the proxy's calls would fail for want of one.
        backlog=API_ACCEPT_BACKLOG,
    ))
