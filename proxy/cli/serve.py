"""`cedargate run`: the mitmproxy proxy and the override API in one process and one event loop.

This is the one place in `proxy/` that touches mitmproxy and uvicorn: it assembles the two fronts
around a single `Runtime`, so the API reports on exactly the core that decides the calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from proxy.calls.connections import ConnectionGuard, default_connection_cap, open_file_limit
from proxy.runtime import Runtime
from proxy.settings.config import Settings

if TYPE_CHECKING:
    from mitmproxy.tools.dump import DumpMaster

log = logging.getLogger(__name__)

API_ACCEPT_BACKLOG = 128  # as mitmproxy's proxy (asyncio's default, 100), not uvicorn's 2,048


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    import uvicorn
    from mitmproxy import options
    from mitmproxy.tools.dump import DumpMaster

    from addons import default_addons
    from override_api.connections import close_connection, guarded_protocol
    from override_api.main import create_app

    for name, listen in (("proxy", settings.proxy), ("API", settings.api)):
        if not listen.is_loopback:
            if not settings.allow_non_loopback:
                raise SystemExit(
                    f"refusing to bind the {name} to non-loopback address {listen.host}: "
                    "agents or others on the network could reach it; pass --allow-non-loopback to mean it"
                )
            log.warning("the %s listens on non-loopback address %s", name, listen.host)

    runtime = Runtime.start(settings)
    open_files = open_file_limit(raise_to_hard=True)
    opts = options.Options(listen_host=settings.proxy.host, listen_port=settings.proxy.port,
                           confdir=str(settings.state_dir))
    master = DumpMaster(opts, with_termlog=False, with_dumper=False)
    # Among them ClientLimits: request size caps, timeouts and the unauthenticated-connection cap.
    master.addons.add(*default_addons(runtime, open_files))  # type: ignore[no-untyped-call]  # mitmproxy: unhinted
    opts.update(  # type: ignore[no-untyped-call]  # mitmproxy's Options.update has no hints
        # Contact no upstream before the call is decided (eager would connect on CONNECT).
        connection_strategy="lazy",
        # Bytes in a tunnel that are not HTTP would be relayed as raw TCP, undecided: refuse them.
        # (passthrough_hosts is not mitmproxy's ignore_hosts, which matches SNI and Host too: see
        # addons.passthrough.)
        rawtcp=False,
    )
    if settings.upstream_ca_bundle:
        opts.update(ssl_verify_upstream_trusted_ca=str(settings.upstream_ca_bundle))  # type: ignore[no-untyped-call]

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # the shared loop's handlers below stop both fronts
            yield

    # The API's connections under the same timeouts and cap as the proxy's (see override_api.connections);
    # not uvicorn's limit_concurrency, which counts idle connections and would answer everyone 503.
    api_guard = ConnectionGuard(
        "API", header_timeout=settings.header_read_timeout, idle_timeout=settings.idle_timeout,
        max_unproven=settings.max_unauthenticated_connections or default_connection_cap(open_files),
        close=close_connection, unproven="were idle",
    )
    api = _Server(uvicorn.Config(
        create_app(runtime), host=settings.api.host, port=settings.api.port, log_level="warning",
        lifespan="off", http=guarded_protocol(api_guard),
        # uvicorn hints an int but uses it as a delay (loop.call_later), so a fraction of a second holds.
        timeout_keep_alive=settings.idle_timeout,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=settings.max_header_bytes,
        # asyncio accepts up to `backlog` connections at once, before the guard sees any: uvicorn's 2,048
        # would take every free file in a flood, and the proxy's calls would fail for want of one.
        backlog=API_ACCEPT_BACKLOG,
    ))

    loop = asyncio.get_running_loop()

    def stop() -> None:
        api.should_exit = True
        master.shutdown()  # type: ignore[no-untyped-call]  # mitmproxy: unhinted

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)

    # mitmproxy writes its CA when its TLS addon starts running, which may come after the listeners: "listening"
    # is printed once agents can also read the CA they must trust.
    ca_cert = settings.state_dir / "mitmproxy-ca-cert.pem"

    async def announce() -> None:
        while not (api.started and _proxy_addrs(master) and ca_cert.exists()):
            await asyncio.sleep(0.02)
        # Port 0 asks the OS for a free port; print the real ones so tests and users can find them.
        proxy_port = _proxy_addrs(master)[0][1]
        api_port = api.servers[0].sockets[0].getsockname()[1] if api.servers else settings.api.port
        runtime.api_started(settings.api.host, api_port)
        print(f"cedargate proxy listening on http://{settings.proxy.host}:{proxy_port}", flush=True)
        print(f"cedargate API listening on http://{settings.api.host}:{api_port}", flush=True)
        revision = runtime.engine.status.revision
        assert revision is not None  # the runtime started with its policies loaded
        print(f"policy revision {revision[:12]} from {settings.policy_dir}", flush=True)
        if ready:
            ready.set()

    try:
        await asyncio.gather(master.run(), api.serve(), announce())
    finally:
        runtime.close()


def _proxy_addrs(master: DumpMaster) -> list[Any]:
    proxyserver = master.addons.get("proxyserver")  # type: ignore[no-untyped-call]  # mitmproxy: unhinted
    return [addr for server in proxyserver.servers for addr in server.listen_addrs]
