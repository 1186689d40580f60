"""The enforcer inside CONNECT tunnels: what names the host a call goes to, and what it sends upstream.

Flows are built as mitmproxy builds them in a tunnel (transparent mode under the CONNECT): `host` and
`port` are the CONNECT's, the server address is known before the call is decided, an HTTP/1
absolute-form target keeps its authority, and the client's TLS server name is on the client connection.
"""

from __future__ import annotations

import json

from addon_support import AGENT, fire, make_flow
from mitmproxy import http
from mitmproxy.net.http.http1 import assemble_request_head
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import taddons

from addons.enforcer import Enforcer, call_of

STOP = "/v1/instances/i-1/stop"


def tunnelled(method: str, target: str, *, connect=("localhost", 9000), headers=None,
              http_version: str = "HTTP/1.1", server_name: str | None = None) -> http.HTTPFlow:
    """A request sent in a tunnel to `connect`, `target` in origin-form (a path) or absolute-form (a URL)."""
    path = target if target.startswith("/") else "/" + target.split("://", 1)[1].split("/", 1)[1]
    flow = make_flow(method, f"http://{connect[0]}:{connect[1]}{path}", headers=headers or {})
    if not any(name.lower() == "host" for name in headers or {}):
        del flow.request.headers["Host"]  # make_flow adds one; these tests say when the client sent it
    flow.request.http_version = http_version
    if not target.startswith("/"):  # absolute-form: mitmproxy keeps the target's authority...
        flow.request.authority = target.split("://", 1)[1].split("/", 1)[0]
    # ...and takes host and port from the CONNECT.
    flow.request.data.host, flow.request.data.port = connect
    flow.server_conn.address = connect
    flow.client_conn.tls = server_name is not None
    flow.client_conn.sni = server_name
    flow.metadata["cedargate.agent"] = AGENT
    return flow


def decide(runtime, flow: http.HTTPFlow) -> None:
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        fire(tctx, enforcer, HttpRequestHook(flow))


def test_an_absolute_form_target_naming_another_host_than_the_tunnel_is_refused(runtime):
    flow = tunnelled("POST", f"http://127.0.0.1:9000{STOP}", headers={"Host": "localhost:9000"})
    decide(runtime, flow)
    assert flow.response.status_code == 400
    problem = json.loads(flow.response.content)
    assert problem["type"] == "urn:cedargate:problem:mapping-error"
    assert "'127.0.0.1:9000'" in problem["detail"] and "'localhost:9000'" in problem["detail"]


def test_an_absolute_form_target_naming_the_tunnel_goes_upstream_in_origin_form(runtime):
    flow = tunnelled("POST", f"http://localhost:9000{STOP}", headers={"Host": "localhost:9000"})
    decide(runtime, flow)
    assert flow.response is None  # allowed: mitmproxy forwards it
    assert assemble_request_head(flow.request).startswith(f"POST {STOP} HTTP/1.1\r\nHost: localhost:9000\r\n".encode())


def test_a_host_less_request_gets_the_host_it_was_decided_for(runtime):
    flow = tunnelled("POST", STOP, http_version="HTTP/1.0")
    decide(runtime, flow)
    assert flow.response is None
    assert assemble_request_head(flow.request).startswith(f"POST {STOP} HTTP/1.0\r\nHost: localhost:9000\r\n".encode())


def test_an_http2_request_without_authority_gets_the_one_it_was_decided_for(runtime):
    flow = tunnelled("GET", "/v1/instances", http_version="HTTP/2.0", server_name="localhost")
    decide(runtime, flow)
    assert flow.response is None
    assert flow.request.authority == "localhost:9000"


def test_a_server_name_naming_another_host_than_the_tunnel_is_refused_as_misdirected(runtime):
    flow = tunnelled("GET", "/v1/instances", headers={"Host": "localhost:9000"}, server_name="prod.internal")
    decide(runtime, flow)
    assert flow.response.status_code == 421
    assert "prod.internal" in json.loads(flow.response.content)["detail"]


def test_the_server_name_of_tls_to_the_proxy_itself_is_not_the_calls(runtime):
    """A client speaking TLS to the proxy (a secure web proxy) names the proxy in its SNI."""
    flow = make_flow("GET", "http://localhost:9000/v1/instances")
    flow.server_conn.address = None  # outside a tunnel mitmproxy has no server address before deciding
    flow.client_conn.tls, flow.client_conn.sni = True, "proxy.internal"
    assert call_of(flow, AGENT).server_name is None
    assert call_of(tunnelled("GET", "/v1/instances", server_name="localhost"), AGENT).server_name == "localhost"
