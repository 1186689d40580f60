"""cedargate under stock mitmproxy: `mitmdump -s addons/enforcer.py` composed as `cedargate run` composes it.

The script's addons are cedargate's own (`addons.default_addons`, reading the `cedargate_` options) and
`Standalone`, which does what `proxy.cli.serve` does around them (through `proxy.cli.fronts`): mitmproxy's
CA goes to cedargate's state directory, the proxy listens where cedargate's settings say (127.0.0.1 by
default) unless `listen_host`, `listen_port` or `confdir` were set on mitmproxy's command line, and the
override API starts on the same event loop, so held calls can be reviewed. Should the API not start (its
port taken, say), the proxy still decides calls, but refuses escalated ones at once instead of holding
them for a review nobody could give (`proxy.runtime.WithoutReview`), and a log line says why.

The limits at accept are `cedargate run`'s too (`proxy.cli.listeners`): the open-file limit is raised to
the hard limit when the script is read, before the core derives its ceilings from it; the event loop's
accept step is replaced when this addon loads (mitmdump loads scripts on its running loop, before its
servers listen), so every listener, mitmproxy's and the API's, backs off on "too many open files" and
logs once a minute; and each TCP listener mitmproxy starts for its proxy modes is put under the core's
`max_proxy_connections` as it starts listening (its `listen` wrapped, as `proxy.cli.master.ServeOn`
wraps it), so a connection past the ceiling is answered `503 proxy-saturated` and closed unread. Not
through mitmproxy's `client_connected` hook, which can only kill a connection (`client.error`): the
agent would see it closed with no answer, and mitmproxy would have made its connection handler first.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from mitmproxy import ctx, exceptions

from addons import default_addons
from addons.client_limits import ClientLimits
from addons.enforcer import Enforcer
from proxy.calls.connections import open_file_limit
from proxy.cli.fronts import api_server, bind_api, check_loopback, mitmproxy_options
from proxy.cli.listeners import guard_accepts, limit_connections
from proxy.runtime import Runtime
from proxy.settings.config import ConfigError

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

log = logging.getLogger(__name__)

# mitmproxy options cedargate sets from its settings unless the user set them on mitmproxy's command line.
USER_CHOICES = ("listen_host", "listen_port", "confdir")
ALLOW_HINT = "set allow_non_loopback: true in cedargate_config"
STOP_TIMEOUT = 5.0


def standalone_addons() -> list[object]:
    open_file_limit(raise_to_hard=True)  # first: the core's ceilings derive from it, as under `cedargate run`
    chain = default_addons()
    enforcer = next(addon for addon in chain if isinstance(addon, Enforcer))
    limits = next(addon for addon in chain if isinstance(addon, ClientLimits))
    return [*chain, Standalone(lambda: enforcer.runtime, limits)]


class Standalone:
    def __init__(self, runtime_of: Callable[[], Runtime | None], limits: ClientLimits | None = None) -> None:
        # The enforcer's runtime: it builds it from the options, and rebuilds it when they change.
        self._runtime_of = runtime_of
        self._limits = limits  # told the core's Capacity, to count upstream connections against the ceiling
        self._ceiled: list[Any] = []  # mitmproxy's listening sockets under the ceiling
        self._runtime: Runtime | None = None
        self._chosen: frozenset[str] | None = None
        self.api: uvicorn.Server | None = None
        self.api_address: tuple[str, int] | None = None
        self.unavailable: str | None = None
        self._socket: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    def load(self, loader: Any) -> None:
        try:
            guard_accepts()  # before mitmproxy's servers listen: they start serving with this accept step
        except RuntimeError:  # no running loop (mitmproxy's test master): `running` guards it then
            pass
        proxyserver = ctx.master.addons.get("proxyserver")  # type: ignore[no-untyped-call]  # mitmproxy: unhinted
        if proxyserver is not None:  # its signal holds receivers weakly: this addon keeps the method alive
            proxyserver.servers.changed.connect(self._ceil_new_servers)

    def _ceil_new_servers(self) -> None:
        """Wrap the `listen` of each TCP server instance about to start, so that its sockets come under the
        connection ceiling as they listen (`Servers.changed` fires with the instances before they start)."""
        from mitmproxy.proxy.mode_servers import AsyncioServerInstance

        proxyserver = ctx.master.addons.get("proxyserver")  # type: ignore[no-untyped-call]  # mitmproxy: unhinted
        for instance in proxyserver.servers:
            if (isinstance(instance, AsyncioServerInstance) and not instance.is_running
                    and instance.mode.transport_protocol in ("tcp", "both")
                    and not getattr(instance, "_cedargate_ceiled", False)):
                instance.listen = self._ceiled_listen(instance.listen)  # type: ignore[method-assign,assignment]
                instance._cedargate_ceiled = True  # type: ignore[attr-defined]

    def _ceiled_listen(self, listen: Callable[[str, int], Awaitable[list[Any]]]
                       ) -> Callable[[str, int], Awaitable[list[Any]]]:
        async def ceiled(host: str, port: int) -> list[Any]:
            servers = await listen(host, port)
            for server in servers:
                if isinstance(server, asyncio.Server):  # a UDP server (DNS mode) has no connections to count
                    for sock in server.sockets:
                        self._ceiled.append(sock)
                        if self._runtime is not None:
                            limit_connections(sock, self._runtime.capacity)
            return servers
        return ceiled

    def configure(self, updated: set[str]) -> None:
        runtime = self._runtime_of()
        if runtime is None or runtime is self._runtime:
            return
        if self._chosen is None:  # the first configure: what the command line set is the user's choice
            self._chosen = frozenset(name for name in USER_CHOICES
                                     if ctx.options.has_changed(name))  # type: ignore[no-untyped-call]  # mitmproxy: unannotated
        settings = runtime.settings
        wanted = mitmproxy_options(settings)
        if "confdir" in self._chosen:
            del wanted["confdir"]
        if "listen_host" not in self._chosen:
            wanted["listen_host"] = settings.proxy.host
        if "listen_port" not in self._chosen:
            wanted["listen_port"] = settings.proxy.port
        try:
            check_loopback("API", settings.api.host, settings.allow_non_loopback, ALLOW_HINT)
            if "listen_host" not in self._chosen:  # a listen_host given on the command line is meant
                check_loopback("proxy", settings.proxy.host, settings.allow_non_loopback, ALLOW_HINT)
        except ConfigError as exc:
            raise exceptions.OptionsError(str(exc)) from exc  # type: ignore[no-untyped-call]  # mitmproxy: unannotated
        if "listen_host" in self._chosen and ctx.options.listen_host in ("", "0.0.0.0", "::"):
            log.warning("the proxy listens on all interfaces (listen_host=%r, as set)",
                        ctx.options.listen_host)
        changed = {name: value for name, value in wanted.items() if getattr(ctx.options, name) != value}
        if changed:
            ctx.options.update(**changed)  # type: ignore[no-untyped-call]  # mitmproxy: unannotated
        self._runtime = runtime
        if self.api is not None:  # running: the API now reports on the rebuilt core
            app = cast("FastAPI", self.api.config.app)
            app.state.runtime = runtime
        self._hand_over(runtime)

    def _hand_over(self, runtime: Runtime) -> None:
        """Tell a runtime where its reviewers are, or that there are none; and count the proxy's connections
        on its Capacity from now on (a rebuilt core starts counting afresh: connections open before it
        close off the old one's counts)."""
        if self._limits is not None:
            self._limits.capacity = runtime.capacity
        for sock in self._ceiled:
            if sock.fileno() >= 0:  # still listening
                limit_connections(sock, runtime.capacity)
        if self.unavailable is not None:
            runtime.refuse_holds(self.unavailable)
        elif self.api_address is not None:
            runtime.api_started(*self.api_address)

    async def running(self) -> None:
        guard_accepts()  # done at load under mitmdump; here for a master that loaded this addon off its loop
        runtime = self._runtime
        if runtime is None:
            return
        try:
            self._socket = bind_api(runtime.settings)
        except ConfigError as exc:
            self._no_api(str(exc))
            return
        self.api = api_server(runtime, open_file_limit())
        self.api_address = (runtime.settings.api.host, self._socket.getsockname()[1])
        self._task = asyncio.create_task(self._serve(), name="cedargate override API")
        while not self.api.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self.api.started and self._runtime is not None:
            self._hand_over(self._runtime)
            host, port = self.api_address
            log.info("cedargate API listening on http://%s:%d", host, port)

    async def _serve(self) -> None:
        assert self.api is not None and self._socket is not None
        try:
            await self.api.serve(sockets=[self._socket])
        except (Exception, SystemExit) as exc:  # uvicorn ends a failed start with sys.exit
            self._no_api(f"the override API failed: {exc!r}")

    def _no_api(self, reason: str) -> None:
        self.unavailable = reason
        # A warning, not an error: mitmdump ends on an error logged at start, and the proxy can still decide
        # calls; only a review is impossible.
        log.warning("cedargate's override API is not running (%s): escalated calls are refused at once, not "
                    "held, since nobody can review them", reason)
        if self._runtime is not None:
            self._hand_over(self._runtime)

    async def done(self) -> None:
        if self.api is not None and self._task is not None:
            self.api.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._task), STOP_TIMEOUT)
            except TimeoutError:
                self._task.cancel()
        if self._socket is not None:
            self._socket.close()
