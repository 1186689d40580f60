"""Client limits on the proxy: request size caps, header-read and idle timeouts, unauthenticated connections.

One agent (or anyone who can reach the port) must not stall the proxy for everyone. This addon
- has mitmproxy build cedargate's HTTP reader and stream (`addons.limited_http`), which refuse a request
  head over `max_header_bytes` (431) and a body over `max_request_body_bytes` (413) before buffering it;
- reports every client connection to a `proxy.calls.connections.ConnectionGuard`, which closes a connection that
  sends no complete request head in `header_read_timeout` (silent or slowloris clients), one idle for
  `idle_timeout` after an answer, and the oldest unauthenticated connection once more than
  `max_unauthenticated_connections` are open;
- counts the proxy's upstream connections on the process's `proxy.calls.capacity.Capacity`: they take files
  as agents' connections do, so the ceiling on connections (`max_proxy_connections`, applied where agents'
  connections are accepted, `proxy.cli.listeners`) counts both.

A connection counts as authenticated once AgentAuth accepted its credentials (on a CONNECT, or on a plain
request), so this addon must come after AgentAuth (and, to see tunnels relayed unread, after any addon
that decides them: last). A request in progress (held, streaming, waiting on the
upstream) has no deadline; mitmproxy's own inactivity timeout (10 min) still applies to tunnels relayed
unread (`passthrough_hosts`).
"""

from __future__ import annotations

import logging

from mitmproxy import connection, ctx, http, tls
from mitmproxy.proxy import layer, layers, server_hooks

from addons import limited_http
from addons.agent_auth import AGENT
from addons.options import add_options, settings_from_options
from proxy.calls.capacity import Capacity
from proxy.calls.connections import ConnectionGuard, default_connection_cap, open_file_limit
from proxy.settings.config import Settings

log = logging.getLogger(__name__)

TUNNEL = "relayed tunnel"  # stands for the one "request" of a connection relayed as raw bytes


class ClientLimits:
    def __init__(self, settings: Settings | None = None, open_files: int | None = None,
                 capacity: Capacity | None = None) -> None:
        self._given = settings is not None
        self.settings = settings
        self.open_files = open_files
        self.capacity = capacity
        self.guard: ConnectionGuard[connection.Client] | None = None

    def load(self, loader) -> None:
        add_options(loader)
        defaults = Settings.model_fields
        # Set from cedargate's settings (max_header_bytes, max_request_body_bytes in cedargate_config), for
        # the HTTP layers of `addons.limited_http`, which see options but no addon.
        loader.add_option("cedargate_max_header_bytes", int, defaults["max_header_bytes"].default,
                          "Largest request head read, in bytes; longer ones get 431. Set from "
                          "max_header_bytes in cedargate_config: set it there.")
        loader.add_option("cedargate_max_request_body_bytes", int,
                          defaults["max_request_body_bytes"].default,
                          "Largest request body accepted, in bytes; larger ones get 413 before they are "
                          "buffered. Set from max_request_body_bytes in cedargate_config: set it there.")
        limited_http.install()

    def configure(self, updated: set[str]) -> None:
        # Settings given to the constructor are never None (`_given`); otherwise they come from the options.
        if self.settings is None or (not self._given and "cedargate_config" in updated):
            self.settings = settings_from_options()
        elif self.guard is not None:
            return
        settings = self.settings
        cap = settings.max_unauthenticated_connections or default_connection_cap(
            self.open_files or open_file_limit())
        if self.guard is not None and self.guard.max_unproven != cap:
            log.warning("max_unauthenticated_connections applies to connections opened from now on")
        self.guard = ConnectionGuard(
            "proxy", header_timeout=settings.header_read_timeout, idle_timeout=settings.idle_timeout,
            max_unproven=cap, close=_close_client,
        )
        ctx.options.update(cedargate_max_header_bytes=settings.max_header_bytes,
                           cedargate_max_request_body_bytes=settings.max_request_body_bytes)

    # mitmproxy calls `configure` before any other hook, so `guard` is set by then; without it, a hook
    # has nothing to report to.
    def client_connected(self, client: connection.Client) -> None:
        if self.guard is not None:
            self.guard.opened(client)

    def client_disconnected(self, client: connection.Client) -> None:
        if self.guard is not None:
            self.guard.closed(client)

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if self.capacity is not None:
            self.capacity.upstream_opened()

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if self.capacity is not None:
            self.capacity.upstream_closed()

    # A tunnel relayed as raw bytes (passthrough_hosts) has no requests to wait for. mitmproxy relays one
    # when an addon picks a TCP layer for it, or has a TLS handshake ignored: seen here, as this addon
    # comes after cedargate's others.
    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if self.guard is not None and isinstance(nextlayer.layer, (layers.TCPLayer, layers.UDPLayer)):
            self.guard.request_started(nextlayer.context.client, TUNNEL)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if self.guard is not None and data.ignore_connection:
            self.guard.request_started(data.context.client, TUNNEL)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if self.guard is not None and flow.metadata.get(AGENT):
            self.guard.proven(flow.client_conn)
            # The tunnel's first request must come as promptly as a new connection's.
            self.guard.await_request(flow.client_conn)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Only an authenticated request stops the clock: an unauthenticated client gets 407 and no more time.
        if self.guard is not None and flow.metadata.get(AGENT):
            self.guard.proven(flow.client_conn)
            self.guard.request_started(flow.client_conn, flow.id)

    def response(self, flow: http.HTTPFlow) -> None:
        if self.guard is not None:
            self.guard.request_finished(flow.client_conn, flow.id)

    def error(self, flow: http.HTTPFlow) -> None:
        if self.guard is not None:
            self.guard.request_finished(flow.client_conn, flow.id)


def _close_client(client: connection.Client, why: str) -> None:
    """Close a client connection as if the client had: mitmproxy's handler then ends it as usual.

    Not by cancelling the handler's task, as mitmproxy's inactivity timeout does: a task cancelled before
    its first step never runs the code that closes the socket, and a burst of new connections evicts
    connections whose tasks have not started yet.
    """
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = proxyserver.connections.get(client.id) if proxyserver else None
    io = handler.transports.get(client) if handler else None
    if io is None or io.writer is None:
        return  # already gone
    log.debug("closing %s: %s", client.peername, why)
    io.writer.close()
