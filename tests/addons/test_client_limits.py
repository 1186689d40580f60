"""ClientLimits as mitmproxy runs it: settings into the HTTP layer's options, hooks into the guard.

Driven with mitmproxy's test helpers; what a client observes (431, 413, closed connections) is tested
through the real proxy in tests/e2e/test_boundary_limits.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from addon_support import AGENT, make_flow
from mitmproxy import tls
from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.test import taddons, tflow

from addons.agent_auth import AGENT as AGENT_KEY
from addons.client_limits import ClientLimits
from addons.limited_http import LimitedHttp1Server, LimitedHttp2Server, LimitedHttpStream, _head_within
from proxy.settings.config import Settings

URL = "http://localhost:9000/v1/instances"


def on_loop(tctx, call):
    """Run a hook as mitmproxy does: on its event loop (the guard's timers need one)."""

    async def run():
        return call()

    return tctx.master.event_loop.run_until_complete(run())


def test_settings_become_the_http_layers_options_and_the_guards_limits():
    limits = ClientLimits(Settings(max_header_bytes=2048, max_request_body_bytes=4096, max_body_bytes=1024,
                                   header_read_timeout=3,
                                   idle_timeout=7, max_unauthenticated_connections=5))
    with taddons.context(limits) as tctx:
        tctx.configure(limits)
        options = tctx.options
        assert (options.cedargate_max_header_bytes, options.cedargate_max_request_body_bytes) == (2048, 4096)
        guard = limits.guard
        assert (guard.header_timeout, guard.idle_timeout, guard.max_unproven) == (3, 7, 5)
    assert (http_layers.Http1Server, http_layers.Http2Server, http_layers.HttpStream) == (
        LimitedHttp1Server, LimitedHttp2Server, LimitedHttpStream)


def test_the_default_cap_is_derived_from_the_open_files():
    limits = ClientLimits(Settings(), open_files=400)
    with taddons.context(limits) as tctx:
        tctx.configure(limits)
        assert limits.guard.max_unproven == 100


def test_under_stock_mitmproxy_the_limits_come_from_cedargates_config(tmp_path: Path):
    config = tmp_path / "cedargate.yaml"
    config.write_text(yaml.safe_dump({"max_request_body_bytes": 123456,
                                      "max_unauthenticated_connections": 9}))
    limits = ClientLimits()
    with taddons.context(limits) as tctx:
        tctx.configure(limits, cedargate_config=str(config))
        assert tctx.options.cedargate_max_request_body_bytes == 123456
        assert limits.guard.max_unproven == 9


def test_only_an_authenticated_request_counts_the_connection_as_authenticated():
    limits = ClientLimits(Settings(max_unauthenticated_connections=5))
    with taddons.context(limits) as tctx:
        tctx.configure(limits)
        client = tflow.tclient_conn()
        on_loop(tctx, lambda: limits.client_connected(client))
        assert limits.guard.unproven_idle == 1

        anonymous = make_flow("GET", URL, client_conn=client)
        on_loop(tctx, lambda: limits.requestheaders(anonymous))
        assert limits.guard.unproven_idle == 1  # answered 407; its clock runs on

        flow = make_flow("GET", URL, client_conn=client)
        flow.metadata[AGENT_KEY] = AGENT
        on_loop(tctx, lambda: limits.requestheaders(flow))
        on_loop(tctx, lambda: limits.response(flow))
        assert limits.guard.unproven_idle == 0  # authenticated for good, idle or not
        on_loop(tctx, lambda: limits.client_disconnected(client))
        assert len(limits.guard) == 0


def test_a_tunnel_relayed_unread_is_not_closed_for_sending_no_request():
    limits = ClientLimits(Settings(max_unauthenticated_connections=5))
    with taddons.context(limits) as tctx:
        tctx.configure(limits)
        client = tflow.tclient_conn()
        on_loop(tctx, lambda: limits.client_connected(client))
        nextlayer = layer.NextLayer(Context(client, tctx.options))
        nextlayer.layer = layers.TCPLayer(nextlayer.context, ignore=True)
        on_loop(tctx, lambda: limits.next_layer(nextlayer))
        assert limits.guard.unproven_idle == 0  # a relay in progress for as long as it lasts


def test_a_tls_handshake_ignored_for_relaying_is_not_closed_either():
    limits = ClientLimits(Settings(max_unauthenticated_connections=5))
    with taddons.context(limits) as tctx:
        tctx.configure(limits)
        client = tflow.tclient_conn()
        on_loop(tctx, lambda: limits.client_connected(client))
        hello = tls.ClientHelloData(Context(client, tctx.options), client_hello=None)  # type: ignore[arg-type]
        on_loop(tctx, lambda: limits.tls_clienthello(hello))
        assert limits.guard.unproven_idle == 1  # intercepted: a request is still awaited
        hello.ignore_connection = True
        on_loop(tctx, lambda: limits.tls_clienthello(hello))
        assert limits.guard.unproven_idle == 0


@pytest.mark.parametrize(
    ("data", "limit", "within"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 64, True),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" + b"x" * 1000, 64, True),  # a body may follow
        (b"GET / HTTP/1.1\nHost: a\n\n", 64, True),
        (b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 100 + b"\r\n\r\n", 64, False),
        (b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 100, 64, False),  # no end in sight
        (b"\r\n" * 100 + b"GET / HTTP/1.1\r\n\r\n", 64, False),  # blank lines count too
        (b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 64, True),
    ],
)
def test_the_head_must_end_within_the_limit(data: bytes, limit: int, within: bool):
    assert _head_within(data, limit) is within
