"""Passthrough: TLS tunnels to `passthrough_hosts` relayed uninspected, decided on the CONNECT host alone.

It replaces mitmproxy's `ignore_hosts`, which also matches the client's TLS SNI and first Host header:
naming a listed host there while connecting to any other host relayed an undecided tunnel. Here a
tunnel is passed through only when its CONNECT authority is listed (`proxy.calls.tunnels.Passthrough`) and
its SNI names that same host; any other tunnel is intercepted and each call in it decided (the
mapping refuses an SNI or Host naming another host). Only TLS is passed through: passthrough is for
clients that pin certificates, and plain HTTP can be decided. Each tunnel passed through is chained
onto the audit log as a `passthrough` event (agent, host, port, server name), committed before the
tunnel's first byte is relayed; a tunnel whose event the record cannot take in time is intercepted
instead, and its calls decided (and refused while the record is unavailable).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, MutableMapping

from mitmproxy import connection, ctx, exceptions, http, tls

from addons.agent_auth import AGENT
from addons.options import add_options
from proxy.calls.tunnels import Passthrough as PassthroughHosts
from proxy.record.store import RECORD_TIMEOUT
from proxy.runtime import Runtime

log = logging.getLogger(__name__)


class Passthrough:
    def __init__(self, runtime_of: Callable[[], Runtime | None]) -> None:
        # The enforcer's runtime, read when needed: under stock mitmproxy it builds (and rebuilds) it.
        self._runtime_of = runtime_of
        self._hosts: tuple[object, PassthroughHosts] | None = None
        self.agents: MutableMapping[connection.Client, str] = weakref.WeakKeyDictionary()

    def load(self, loader) -> None:
        add_options(loader)

    def configure(self, updated: set[str]) -> None:
        for option in ("ignore_hosts", "allow_hosts"):
            if option in updated and getattr(ctx.options, option):
                raise exceptions.OptionsError(
                    "cedargate decides which tunnels pass uninspected on the CONNECT host alone; "
                    f"mitmproxy's {option} also matches the client's TLS SNI and Host header, which the "
                    f"client chooses. Unset {option} and list the hosts in passthrough_hosts in cedargate's "
                    "config instead"
                )

    def http_connected(self, flow: http.HTTPFlow) -> None:
        agent = flow.metadata.get(AGENT)
        if agent:
            self.agents[flow.client_conn] = agent

    async def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        server = data.context.server
        runtime = self._runtime_of()
        # No address: TLS to the proxy itself (a secure web proxy), not a tunnel.
        if runtime is None or server.address is None or data.ignore_connection:
            return
        hosts = self._passthrough(runtime)
        if not hosts:
            return
        host, port = server.address[:2]
        server_name = data.client_hello.sni
        if not hosts.admits(host, port, server_name):
            if hosts.covers(host, port):
                log.warning("not passing through the tunnel to %s:%s: its TLS server name is %r; "
                            "intercepting it", host, port, server_name)
            return
        if runtime.recorder.unavailable_reason():
            log.warning("not passing through the tunnel to %s:%s: the record is unavailable", host, port)
            return  # intercepted, the calls are refused while nothing can be recorded
        agent = self.agents.get(data.context.client)
        committed = runtime.recorder.commit_event({"kind": "passthrough", "agent": agent, "payload": {
            "host": host, "port": port, "server_name": server_name}})
        try:  # on the record before a byte is relayed: a relayed tunnel is a forwarded call
            await asyncio.wait_for(asyncio.wrap_future(committed), RECORD_TIMEOUT)
        except Exception as exc:  # the store failing, or too slow
            log.warning("not passing through the tunnel to %s:%s: its record could not be committed (%s); "
                        "intercepting it", host, port, type(exc).__name__)
            return
        log.info("passing the tunnel of %s to %s:%s through uninspected (passthrough_hosts)",
                 agent, host, port)
        data.ignore_connection = True

    def _passthrough(self, runtime: Runtime) -> PassthroughHosts:
        patterns = runtime.settings.passthrough_hosts
        if self._hosts is None or self._hosts[0] is not patterns:
            self._hosts = (patterns, PassthroughHosts(patterns))
        return self._hosts[1]
