"""`cedargate run`: the mitmproxy proxy and the override API in one process and one event loop.

It assembles the two fronts around a single `Runtime`, so the API reports on exactly the core that
decides the calls; what it shares with `mitmdump -s addons/enforcer.py` (`proxy.cli.standalone`) is in
`proxy.cli.fronts`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Any

from proxy.calls.connections import open_file_limit
from proxy.cli.fronts import api_server, bind_api, ca_cert, check_loopback, mitmproxy_options
from proxy.runtime import Runtime
from proxy.settings.config import ConfigError, Settings

if TYPE_CHECKING:
    from mitmproxy.tools.dump import DumpMaster

log = logging.getLogger(__name__)


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    from mitmproxy import options
    from mitmproxy.tools.dump import DumpMaster

    from addons import default_addons

    try:
        for name, listen in (("proxy", settings.proxy), ("API", settings.api)):
            check_loopback(name, listen.host, settings.allow_non_loopback, "pass --allow-non-loopback")
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None

    runtime = Runtime.start(settings)
    try:
        api_socket = bind_api(settings)
    except ConfigError:
        runtime.close()
        raise
    open_files = open_file_limit(raise_to_hard=True)
    opts = options.Options(listen_host=settings.proxy.host, listen_port=settings.proxy.port)
    master = DumpMaster(opts, with_termlog=False, with_dumper=False)
    # Among them ClientLimits: request size caps, timeouts and the unauthenticated-connection cap.
    master.addons.add(*default_addons(runtime, open_files))  # type: ignore[no-untyped-call]  # mitmproxy: unannotated
    opts.update(**mitmproxy_options(settings))  # type: ignore[no-untyped-call]  # mitmproxy: unannotated
    api = api_server(runtime, open_files)

    loop = asyncio.get_running_loop()

    def stop() -> None:
        api.should_exit = True
        master.shutdown()  # type: ignore[no-untyped-call]  # mitmproxy: unhinted

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)

    # mitmproxy writes its CA when its TLS addon starts running, which may come after the listeners:
    # "listening" is printed once agents can also read the CA they must trust.
    ca = ca_cert(opts.confdir)

    async def announce() -> None:
        while not (api.started and _proxy_addrs(master) and ca.exists()):
            await asyncio.sleep(0.02)
        # Port 0 asks the OS for a free port; print the real ones so tests and users can find them.
        proxy_port = _proxy_addrs(master)[0][1]
        api_port = api_socket.getsockname()[1]
        runtime.api_started(settings.api.host, api_port)
        print(f"cedargate proxy listening on http://{settings.proxy.host}:{proxy_port}", flush=True)
        print(f"cedargate API listening on http://{settings.api.host}:{api_port}", flush=True)
        revision = runtime.engine.status.revision
        assert revision is not None  # the runtime started with its policies loaded
        print(f"policy revision {revision[:12]} from {settings.policy_dir}", flush=True)
        if ready:
            ready.set()

    runtime.jobs.start()  # expiry: the core's, on this loop
    try:
        await asyncio.gather(master.run(), api.serve(sockets=[api_socket]), announce())
    finally:
        runtime.jobs.stop()
        api_socket.close()
        runtime.close()


def _proxy_addrs(master: DumpMaster) -> list[Any]:
    proxyserver = master.addons.get("proxyserver")  # type: ignore[no-untyped-call]  # mitmproxy: unhinted
    return [addr for server in proxyserver.servers for addr in server.listen_addrs]
