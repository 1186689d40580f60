"""Upstream deadlines: a forwarded call whose upstream does not connect or answer in time ends, answered.

mitmproxy 11 has no upstream timeouts: a hanging upstream holds the call, and its record, open until the
agent gives up. This addon arms a timer for each call the enforcer let go (after its `request` hook, so
the time a call is held for a human is never counted):

- `upstream_connect_timeout` until the call's upstream connection is up (TCP, and TLS);
- then `upstream_read_timeout` until the answer's headers come, and again until a buffered answer is
  whole. An answer passed on as it streams (an MCP event stream) is not bounded after its headers: an
  MCP session may keep it open as long as it likes.

When a wait runs out, the flow is marked (`DEADLINE_MISSED`) and the I/O task of the upstream connection
it waits on is cancelled, as mitmproxy cancels it to close a connection itself. mitmproxy then fails the
exchange the usual way, and the enforcer's `error` hook answers 504 upstream-timeout and records it. The
flow is never killed (its agent would get no answer). An upstream HTTP/2 connection carries several
calls; ending it fails them all, each answered and recorded as a reset.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable

from mitmproxy import connection, ctx, http, tls

from addons.options import add_options, settings_from_options
from proxy.decision.upstream import CONNECT_TIMEOUT_MESSAGE
from proxy.settings.config import Settings

log = logging.getLogger(__name__)

DEADLINE_MISSED = "cedargate.deadline_missed"  # which wait ran out: "connect" or "read"
_TIMER = "cedargate.deadline_timer"
READ_TIMEOUT_MESSAGE = "cedargate: no answer from the upstream within upstream_read_timeout"
# How soon to look again at a connection that mitmproxy is between two steps of (in a hook, or queued
# behind its limit of connections to one address): cancelling it there would leave the call hanging.
_RECHECK = 0.1


class UpstreamDeadlines:
    def __init__(self, settings: Settings | None = None) -> None:
        self._given = settings is not None
        self.settings = settings
        # Upstream connections whose TLS handshake began: their I/O task is reading, safe to cancel.
        self._handshaking: weakref.WeakSet[connection.Server] = weakref.WeakSet()

    def load(self, loader) -> None:
        add_options(loader)

    def configure(self, updated: set[str]) -> None:
        if not self._given and (self.settings is None or "cedargate_config" in updated):
            self.settings = settings_from_options()

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return  # refused, or already failed: nothing goes upstream
        if self.settings is None:
            return  # not configured (mitmproxy calls `configure` before any hook): no deadline to keep
        forwarded = time.time()
        self._arm(flow, self.settings.upstream_connect_timeout, self._connect_due, forwarded)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        timer = flow.metadata.pop(_TIMER, None)
        if timer is None:
            return  # not a call sent upstream: the enforcer's own answer
        timer.cancel()
        if flow.response is None or flow.response.stream or flow.error or not flow.live:
            return  # streamed as it comes (see the module docstring), or over
        if self.settings is None:
            return  # not configured: `request` armed no timer either
        self._arm(flow, self.settings.upstream_read_timeout, self._read_due, True)

    def response(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow)

    def tls_start_server(self, data: tls.TlsData) -> None:
        if isinstance(data.conn, connection.Server):
            self._handshaking.add(data.conn)

    # The timers below are armed by `request` and `responseheaders` only once `settings` is set.
    def _connect_due(self, flow: http.HTTPFlow, forwarded: float) -> None:
        if flow.response is not None or flow.error or not flow.live or self.settings is None:
            return
        server = flow.server_conn
        if server.timestamp_tcp_setup is not None:
            # Connected: mitmproxy sent the call as soon as the connection was up.
            sent = max(forwarded, server.timestamp_tls_setup or server.timestamp_tcp_setup)
            self._arm(flow, sent + self.settings.upstream_read_timeout - time.time(), self._read_due, False)
            return
        tasks = self._connecting(flow)
        if not tasks:  # not (yet) at a step where mitmproxy can be interrupted
            self._arm(flow, _RECHECK, self._connect_due, forwarded)
            return
        log.info("no connection to %s:%s within %g s", flow.request.host, flow.request.port,
                 self.settings.upstream_connect_timeout)
        flow.metadata[DEADLINE_MISSED] = "connect"
        for task in tasks:
            task.cancel(CONNECT_TIMEOUT_MESSAGE)

    def _read_due(self, flow: http.HTTPFlow, headers_seen: bool) -> None:
        if flow.error or not flow.live or (flow.response is not None) != headers_seen:
            return  # over, or its headers just came: `responseheaders` arms the next wait
        if self.settings is None:
            return
        handler = _connection_handler(flow)
        io = handler.transports.get(flow.server_conn) if handler else None
        if io is None or io.handler is None:
            return  # the connection is already gone: mitmproxy is failing the exchange
        log.info("no answer from %s:%s within %g s", flow.request.host, flow.request.port,
                 self.settings.upstream_read_timeout)
        flow.metadata[DEADLINE_MISSED] = "read"
        io.handler.cancel(READ_TIMEOUT_MESSAGE)

    def _connecting(self, flow: http.HTTPFlow) -> list[asyncio.Task]:
        """The I/O tasks of the upstream connections the call waits for, at a step that can be cancelled."""
        handler = _connection_handler(flow)
        if handler is None:
            return []
        address = (flow.request.host, flow.request.port)
        tasks = []
        for conn, io in list(handler.transports.items()):
            if not isinstance(conn, connection.Server) or conn.address != address or conn.error:
                continue
            if io.handler is None:
                continue
            if conn.timestamp_start is not None and conn.timestamp_tcp_setup is None:
                tasks.append(io.handler)  # in the OS's connect: mitmproxy reports the cancel as a failed one
            elif conn.tls and conn.timestamp_tls_setup is None and conn in self._handshaking:
                tasks.append(io.handler)  # reading the handshake: a cancel closes the connection
        return tasks

    def _arm(self, flow: http.HTTPFlow, delay: float, due: Callable, arg: object) -> None:
        self._disarm(flow)
        flow.metadata[_TIMER] = asyncio.get_running_loop().call_later(max(delay, 0.0), due, flow, arg)

    @staticmethod
    def _disarm(flow: http.HTTPFlow) -> None:
        timer = flow.metadata.pop(_TIMER, None)
        if timer is not None:
            timer.cancel()


def _connection_handler(flow: http.HTTPFlow):
    """mitmproxy's handler of the agent's connection, which owns the I/O tasks of its upstream connections."""
    proxyserver = ctx.master.addons.get("proxyserver")
    return proxyserver.connections.get(flow.client_conn.id) if proxyserver else None
