"""The mitmproxy master `cedargate run` proxies with: mitmproxy's addons that a proxy needs, then cedargate's.

mitmdump's `DumpMaster` loads some forty addons (HAR and flow saving, onboarding at mitm.it, header and
body modifiers, replay, sticky cookies...), and mitmproxy calls every addon's hook for every event of
every call: measured, mitmproxy with only the addons below serves 1.63x mitmdump's calls at 0.61x its
CPU per call. So `cedargate run` builds a plain `Master` with only these: the option checks (`Core`),
the server and its protocol layers (`Proxyserver`, `NextLayer`), TLS interception with the CA in the
state directory (`TlsConfig`), the h2c-upgrade stripping that keeps HTTP/1 clients safe (`DisableH2C`),
mitmproxy's refusal of clients from public addresses (`Block`, `block_global`), and its exit on an error
logged at start (`ErrorCheck`), then cedargate's own (`addons.default_addons`). Stock `mitmdump -s
addons/enforcer.py` keeps mitmproxy's own set.

The proxy listens on a socket bound by cedargate (`listening_socket`): a taken port is a `ConfigError`
that says so, and `cedargate run --workers N` hands that socket to every worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from proxy.settings.config import ConfigError, Settings
from proxy.vocabulary.problems import MEDIA_TYPE, Problem, problem_document

if TYPE_CHECKING:
    from mitmproxy.master import Master

    from proxy.runtime import Runtime

log = logging.getLogger(__name__)

PROXY_ACCEPT_BACKLOG = 100  # asyncio's default, which mitmproxy's own listener uses


def listening_socket(settings: Settings) -> socket.socket:
    """The proxy's listening socket, or `ConfigError` naming the address and what to change.

    A plain socket, the port this process's alone: a second cedargate (or anything else) on the same port
    is refused with EADDRINUSE, as with mitmdump. Under `cedargate run --workers N` every worker inherits
    it and they take turns accepting from it (`proxy.cli.balance`).
    """
    host, port = settings.proxy.host, settings.proxy.port
    sock = _tcp_socket(host)
    try:
        sock.bind((host, port))
        sock.listen(PROXY_ACCEPT_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"the proxy cannot listen on {host}:{port}: {exc.strerror or exc}; is another cedargate or proxy "
            "running there? Set proxy.port (--listen-port) or proxy.host to a free address, or 0 for any "
            "free port"
        ) from exc
    return sock


def _tcp_socket(host: str) -> socket.socket:
    # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY on a connection only when its socket says
    # TCP, and accepted sockets inherit the listener's; without it Nagle's algorithm and the client's
    # delayed ACK add 40 ms to every answer on a kept-alive connection.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as mitmproxy: a restart reuses the port
    return sock


def proxy_addons() -> list[Any]:
    """mitmproxy's addons a cedargate proxy needs (see the module's docstring), in mitmdump's order."""
    from mitmproxy.addons import block, core, disable_h2c, errorcheck, next_layer, proxyserver, tlsconfig

    return [
        core.Core(),
        block.Block(),
        disable_h2c.DisableH2C(),
        proxyserver.Proxyserver(),  # type: ignore[no-untyped-call]  # mitmproxy: unannotated
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        errorcheck.ErrorCheck(),
    ]


def proxy_master(runtime: Runtime, open_files: int, sock: socket.socket, options: dict[str, Any]) -> Master:
    """A master with the lean addon set and cedargate's, serving on `sock` (bound and listening); stop it
    gracefully with `stop_gracefully`."""
    from mitmproxy.master import Master
    from mitmproxy.options import Options

    from addons import default_addons
    from proxy.cli.dispatch import HookTable

    host, port = sock.getsockname()[:2]
    opts = Options(listen_host=host, listen_port=port)
    master = Master(opts)
    # Hooks found once per event rather than searched for on every event (`proxy.cli.dispatch`).
    master.options.changed.disconnect(master.addons._configure_all)
    master.addons = HookTable(master)
    master.addons.add(*proxy_addons())
    # Among them ClientLimits: request size caps, timeouts and the unauthenticated-connection cap.
    master.addons.add(*default_addons(runtime, open_files))
    master.addons.add(ServeOn(sock), Drain())
    opts.update(**options)  # type: ignore[no-untyped-call]  # mitmproxy: unannotated
    return master


class ServeOn:
    """Has mitmproxy's regular-mode server accept on a socket cedargate bound, instead of binding its own.

    mitmproxy's server instance binds in `listen(host, port)` with `asyncio.start_server`, which takes a
    bound socket instead (`sock=`); its `Servers.changed` signal fires with the new instances before they
    start, which is where the one for the proxy's mode is given ours. An addon, so the master keeps it
    (the signal holds its receivers weakly).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def load(self, loader: Any) -> None:
        from mitmproxy import ctx

        proxyserver = ctx.master.addons.get("proxyserver")  # type: ignore[no-untyped-call]  # mitmproxy: unhinted
        proxyserver.servers.changed.connect(self._give_socket)

    def _give_socket(self) -> None:
        from mitmproxy import ctx
        from mitmproxy.proxy.mode_servers import RegularInstance

        proxyserver = ctx.master.addons.get("proxyserver")  # type: ignore[no-untyped-call]  # mitmproxy: unhinted
        for instance in proxyserver.servers:
            if isinstance(instance, RegularInstance) and not instance.is_running:
                instance.listen = self._listen(instance)  # type: ignore[method-assign,assignment]

    def _listen(self, instance: Any) -> Callable[[str, int], Awaitable[list[asyncio.Server]]]:
        async def listen(host: str, port: int) -> list[asyncio.Server]:
            return [await asyncio.start_server(instance.handle_stream, sock=self.sock,
                                               backlog=PROXY_ACCEPT_BACKLOG)]
        return listen


DRAIN_TIMEOUT = 30.0  # as gunicorn's graceful_timeout: how long a stopping proxy lets its calls finish


def stop_gracefully(master: Master, timeout: float = DRAIN_TIMEOUT) -> asyncio.Task[None]:
    """Stop `master` (from `proxy_master`) once its calls in flight are done (`Drain`); idempotent."""
    drain = master.addons.get("drain")  # type: ignore[no-untyped-call]  # mitmproxy: unhinted
    if drain.stopping is None:
        drain.stopping = asyncio.create_task(drain.stop(master, timeout), name="cedargate graceful stop")
    return drain.stopping  # type: ignore[no-any-return]


class Drain:
    """A graceful stop: no new connections, the calls in flight finish, then the master stops.

    mitmproxy's shutdown ends every connection at once, the calls still upstream with them: the agent sees
    its connection dropped with no answer though the upstream may have acted. So a stop first closes the
    listening socket (under `--workers N`, the other workers still hold it), waits up to `timeout` for the
    calls it counts in flight (from their request's headers to their response or error), then shuts down.
    """

    def __init__(self) -> None:
        self.in_flight: set[str] = set()
        self.stopping: asyncio.Task[None] | None = None

    def requestheaders(self, flow: Any) -> None:
        if self.stopping is not None:
            # A kept-alive connection's next call: refused undecided, so that a busy agent cannot keep the
            # stop waiting; it is told to retry on a new connection (another worker, or the restarted one).
            flow.response = _stopping_answer()
            return
        self.in_flight.add(flow.id)

    def responseheaders(self, flow: Any) -> None:
        # While stopping, every answer closes its HTTP/1 connection: the agent reconnects elsewhere.
        if self.stopping is not None and flow.response is not None and flow.request.http_version.startswith("HTTP/1"):
            flow.response.headers["connection"] = "close"

    def response(self, flow: Any) -> None:
        self.in_flight.discard(flow.id)

    def error(self, flow: Any) -> None:
        self.in_flight.discard(flow.id)

    async def stop(self, master: Master, timeout: float) -> None:
        proxyserver = master.addons.get("proxyserver")  # type: ignore[no-untyped-call]  # mitmproxy: unhinted
        for instance in proxyserver.servers:
            if instance.is_running:
                await instance.stop()
        if self.in_flight:
            log.info("stopping: waiting up to %.0f s for %d calls in flight", timeout, len(self.in_flight))
        deadline = asyncio.get_running_loop().time() + timeout
        while self.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            log.warning("stopping with %d calls still in flight after %.0f s", len(self.in_flight), timeout)
        master.shutdown()  # type: ignore[no-untyped-call]  # mitmproxy: unhinted


def _stopping_answer() -> Any:
    from mitmproxy import http

    headers = {"Content-Type": MEDIA_TYPE, "Connection": "close", "Retry-After": "1"}
    return http.Response.make(503, json.dumps(problem_document(Problem.STOPPING)).encode(), headers)


def proxy_addrs(master: Master) -> list[Any]:
    proxyserver = master.addons.get("proxyserver")  # type: ignore[no-untyped-call]  # mitmproxy: unhinted
    return [addr for server in proxyserver.servers for addr in server.listen_addrs]
