"""Upstream deadlines as mitmproxy runs them: hooks fired on the master's event loop, and the upstream
connection's I/O task (what mitmproxy's connection handler holds for it) cancelled when a wait runs out.

mitmproxy's proxyserver is the real addon; the connection handler in it is a stand-in holding one real
asyncio task per upstream connection, as mitmproxy's does (tests/e2e/test_boundary_upstream.py runs
the real thing end to end).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from addon_support import make_flow
from mitmproxy import connection, http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy.server import ConnectionIO
from mitmproxy.test import taddons

from addons.upstream_deadline import DEADLINE_MISSED, READ_TIMEOUT_MESSAGE, UpstreamDeadlines
from proxy.decision.upstream import CONNECT_TIMEOUT_MESSAGE
from proxy.settings.config import Settings

QUICK = Settings(upstream_connect_timeout=0.05, upstream_read_timeout=0.05)


class Upstream:
    """One upstream connection of the agent's connection, with the I/O task mitmproxy would run for it."""

    def __init__(self, proxyserver: Proxyserver, flow: http.HTTPFlow, server: connection.Server) -> None:
        self.task = asyncio.get_running_loop().create_task(asyncio.sleep(30))
        handler = proxyserver.connections.setdefault(flow.client_conn.id, SimpleNamespace(transports={}))
        handler.transports[server] = ConnectionIO(handler=self.task)

    async def outcome(self, within: float = 5.0) -> str | None:
        """The cancel message, once the task ended; None if it is still running after `within` seconds."""
        await asyncio.wait([self.task], timeout=within)
        if not self.task.done():
            self.task.cancel()  # the test is over; leave no task behind
            return None
        try:
            self.task.result()
        except asyncio.CancelledError as exc:
            return exc.args[0] if exc.args else ""
        return "finished"


def run(tctx, coroutine):
    return tctx.master.event_loop.run_until_complete(coroutine)


async def hook(tctx, addon, name: str, flow: http.HTTPFlow) -> None:
    from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHeadersHook, HttpResponseHook

    event = {"request": HttpRequestHook, "responseheaders": HttpResponseHeadersHook,
             "response": HttpResponseHook}[name](flow)
    await tctx.master.addons.invoke_addon(addon, event)


@pytest.fixture
def deadlines():
    addon = UpstreamDeadlines(QUICK)
    proxyserver = Proxyserver()
    with taddons.context(addon, proxyserver) as tctx:
        yield tctx, addon, proxyserver


def test_call_sent_but_unanswered_has_its_connection_ended_and_is_marked(deadlines):
    tctx, addon, proxyserver = deadlines
    flow = make_flow("POST", "http://localhost:9000/v1/instances/i-1/stop")  # its connection is up

    async def scenario():
        upstream = Upstream(proxyserver, flow, flow.server_conn)
        await hook(tctx, addon, "request", flow)
        return await upstream.outcome()

    assert run(tctx, scenario()) == READ_TIMEOUT_MESSAGE
    assert flow.metadata[DEADLINE_MISSED] == "read"


def test_connection_not_made_in_time_is_abandoned_before_the_call_is_sent(deadlines):
    tctx, addon, proxyserver = deadlines
    flow = make_flow("GET", "http://localhost:9000/v1/instances")
    flow.server_conn.timestamp_tcp_setup = flow.server_conn.timestamp_tls_setup = None  # nothing open yet
    connecting = connection.Server(address=("localhost", 9000), timestamp_start=1.0)  # in the OS's connect

    async def scenario():
        upstream = Upstream(proxyserver, flow, connecting)
        await hook(tctx, addon, "request", flow)
        return await upstream.outcome()

    assert run(tctx, scenario()) == CONNECT_TIMEOUT_MESSAGE
    assert flow.metadata[DEADLINE_MISSED] == "connect"


def test_streamed_answer_is_not_bounded_once_its_headers_came(deadlines):
    tctx, addon, proxyserver = deadlines
    flow = make_flow("GET", "http://localhost:9000/mcp")

    async def scenario():
        upstream = Upstream(proxyserver, flow, flow.server_conn)
        await hook(tctx, addon, "request", flow)
        flow.response = http.Response.make(200, b"", {"Content-Type": "text/event-stream"})
        flow.response.stream = lambda chunk: chunk  # as the enforcer streams an MCP event stream
        await hook(tctx, addon, "responseheaders", flow)
        return await upstream.outcome(within=0.3)  # several read timeouts

    assert run(tctx, scenario()) is None
    assert DEADLINE_MISSED not in flow.metadata


def test_buffered_answer_must_be_whole_in_time_after_its_headers(deadlines):
    tctx, addon, proxyserver = deadlines
    flow = make_flow("GET", "http://localhost:9000/v1/instances")

    async def scenario():
        upstream = Upstream(proxyserver, flow, flow.server_conn)
        await hook(tctx, addon, "request", flow)
        flow.response = http.Response.make(200, b"", {"Content-Type": "application/json"})
        await hook(tctx, addon, "responseheaders", flow)
        return await upstream.outcome()

    assert run(tctx, scenario()) == READ_TIMEOUT_MESSAGE


def test_answered_or_refused_calls_are_left_alone(deadlines):
    tctx, addon, proxyserver = deadlines
    answered = make_flow("GET", "http://localhost:9000/v1/instances")
    refused = make_flow("DELETE", "http://localhost:9000/v1/volumes/v-1")
    refused.response = http.Response.make(403)  # the enforcer's refusal: nothing goes upstream

    async def scenario():
        upstreams = [Upstream(proxyserver, flow, flow.server_conn) for flow in (answered, refused)]
        await hook(tctx, addon, "request", answered)
        await hook(tctx, addon, "request", refused)
        await hook(tctx, addon, "responseheaders", refused)  # mitmproxy runs it for an addon's answer too
        answered.response = http.Response.make(200, b"{}")
        await hook(tctx, addon, "responseheaders", answered)
        await hook(tctx, addon, "response", answered)
        return [await upstream.outcome(within=0.3) for upstream in upstreams]

    assert run(tctx, scenario()) == [None, None]
