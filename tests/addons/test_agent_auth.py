"""AgentAuth as mitmproxy runs it: proxy credentials in, an agent id (or a 407) out.

Driven with mitmproxy's own test helpers (`taddons.context`, `tflow`), the way mitmproxy tests its
proxyauth addon, against a real `AgentDirectory`.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml
from addon_support import AGENT, TOKEN, TOKEN_SHA256, basic, make_flow
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow, tutils

from addons.agent_auth import AgentAuth, take_credentials
from proxy.settings.agents import AgentDirectory
from proxy.settings.config import AgentCredential

URL = "http://localhost:9000/v1/instances"


@pytest.fixture
def auth() -> AgentAuth:
    return AgentAuth(AgentDirectory({AGENT: AgentCredential(token_sha256=TOKEN_SHA256)}))


def connect_flow(client_conn, proxy_authorization: str | None) -> http.HTTPFlow:
    """A CONNECT request in authority form, as an HTTPS client sends it to the proxy."""
    headers = http.Headers(host="localhost:8443")
    if proxy_authorization is not None:
        headers["Proxy-Authorization"] = proxy_authorization
    request = tutils.treq(
        method=b"CONNECT", scheme=b"", host="localhost", port=8443, authority=b"localhost:8443", path=b"",
        headers=headers, content=b"",
    )
    return tflow.tflow(client_conn=client_conn, req=request)


def assert_proxy_auth_required(flow: http.HTTPFlow, which: str) -> None:
    response = flow.response
    assert response is not None, "the request was not refused"
    assert response.status_code == 407
    assert response.headers["Proxy-Authenticate"] == 'Basic realm="cedargate"'
    assert response.headers["Content-Type"] == "application/problem+json"
    problem = json.loads(response.content)
    assert problem["type"] == "urn:cedargate:problem:proxy-auth-required"
    assert problem["status"] == 407
    assert problem["detail"].startswith(f"{which} proxy credentials")
    assert "http://AGENT_ID:TOKEN@" in problem["detail"]
    assert "cedargate.agent" not in flow.metadata


def test_valid_credential_names_the_agent_and_is_not_forwarded(auth):
    with taddons.context(auth):
        flow = make_flow("GET", URL, headers={"Proxy-Authorization": basic(AGENT, TOKEN), "Accept": "*/*"})
        auth.requestheaders(flow)
    assert flow.response is None
    assert flow.metadata["cedargate.agent"] == AGENT
    assert "Proxy-Authorization" not in flow.request.headers
    assert flow.request.headers["Accept"] == "*/*"


def test_scheme_name_is_case_insensitive(auth):
    encoded = base64.b64encode(f"{AGENT}:{TOKEN}".encode()).decode()
    with taddons.context(auth):
        flow = make_flow("GET", URL, headers={"Proxy-Authorization": f"basic {encoded}"})
        auth.requestheaders(flow)
    assert flow.response is None
    assert flow.metadata["cedargate.agent"] == AGENT


def test_no_credentials_get_407(auth):
    with taddons.context(auth):
        flow = make_flow("GET", URL)
        auth.requestheaders(flow)
    assert_proxy_auth_required(flow, "missing")


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(basic(AGENT, "not-the-token"), id="wrong-token"),
        pytest.param(basic("intruder", TOKEN), id="unknown-agent"),
        pytest.param(basic(AGENT, ""), id="empty-token"),
        pytest.param(basic(AGENT.upper(), TOKEN), id="agent-id-is-case-sensitive"),
    ],
)
def test_wrong_credentials_get_407_and_are_not_forwarded(auth, header):
    with taddons.context(auth):
        flow = make_flow("GET", URL, headers={"Proxy-Authorization": header})
        auth.requestheaders(flow)
    assert_proxy_auth_required(flow, "invalid")
    assert "Proxy-Authorization" not in flow.request.headers


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("Basic !!!not-base64!!!", id="not-base64"),
        pytest.param("Basic \u00e9\u00e9", id="non-ascii-base64"),
        pytest.param("Basic " + base64.b64encode(f"{AGENT}{TOKEN}".encode()).decode(), id="no-colon"),
        pytest.param("Basic " + base64.b64encode(f":{TOKEN}".encode()).decode(), id="empty-agent"),
        pytest.param("Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(), id="not-utf8"),
        pytest.param(f"Bearer {TOKEN}", id="wrong-scheme"),
        pytest.param("Basic", id="scheme-only"),
        pytest.param("", id="empty"),
    ],
)
def test_malformed_credentials_get_407(auth, header):
    with taddons.context(auth):
        flow = make_flow("GET", URL, headers={"Proxy-Authorization": header})
        auth.requestheaders(flow)
    assert_proxy_auth_required(flow, "missing")
    assert "Proxy-Authorization" not in flow.request.headers


def test_a_connect_with_a_malformed_credential_is_refused_not_tunnelled(auth):
    # mitmproxy answers 200 to a CONNECT whose hook raised; the credential must never get that far.
    with taddons.context(auth):
        client = tflow.tclient_conn()
        connect = connect_flow(client, "Basic \u00e9\u00e9")
        auth.http_connect(connect)
    assert connect.response is not None and connect.response.status_code == 407
    assert client not in auth.authenticated


def test_connect_authenticates_the_client_connection_for_its_tunnelled_requests(auth):
    with taddons.context(auth):
        client = tflow.tclient_conn()
        connect = connect_flow(client, basic(AGENT, TOKEN))
        auth.http_connect(connect)
        assert connect.response is None
        assert "Proxy-Authorization" not in connect.request.headers

        tunnelled = [
            make_flow("GET", "https://localhost:8443/v1/instances", client_conn=client) for _ in range(2)
        ]
        for flow in tunnelled:
            auth.requestheaders(flow)
    for flow in tunnelled:
        assert flow.response is None
        assert flow.metadata["cedargate.agent"] == AGENT


def test_a_tunnel_does_not_authenticate_other_connections(auth):
    with taddons.context(auth):
        auth.http_connect(connect_flow(tflow.tclient_conn(), basic(AGENT, TOKEN)))
        stranger = make_flow("GET", "https://localhost:8443/v1/instances", client_conn=tflow.tclient_conn())
        auth.requestheaders(stranger)
    assert_proxy_auth_required(stranger, "missing")


def test_refused_connect_leaves_the_connection_unauthenticated(auth):
    with taddons.context(auth):
        client = tflow.tclient_conn()
        connect = connect_flow(client, basic(AGENT, "wrong"))
        auth.http_connect(connect)
        later = make_flow("GET", "https://localhost:8443/v1/instances", client_conn=client)
        auth.requestheaders(later)
    assert_proxy_auth_required(connect, "invalid")
    assert_proxy_auth_required(later, "missing")


def test_tunnelled_request_keeps_the_tunnel_agent_and_drops_a_credential_sent_inside(auth):
    with taddons.context(auth):
        client = tflow.tclient_conn()
        auth.http_connect(connect_flow(client, basic(AGENT, TOKEN)))
        flow = make_flow(
            "GET", "https://localhost:8443/v1/instances", client_conn=client,
            headers={"Proxy-Authorization": basic("someone-else", "whatever")},
        )
        auth.requestheaders(flow)
    assert flow.response is None
    assert flow.metadata["cedargate.agent"] == AGENT
    assert "Proxy-Authorization" not in flow.request.headers


@pytest.mark.parametrize("second", ["Proxy-Authorization", "proxy-authorization", "PROXY-AUTHORIZATION"])
def test_a_repeated_credential_is_read_joined_and_no_copy_goes_upstream(auth, second):
    """Two credential fields in any case are one value to the proxy (joined, so not a valid credential):
    refused, and neither is left on the request."""
    with taddons.context(auth):
        request = http.Request.make("GET", URL, b"", [
            (b"Host", b"localhost:9000"), (b"Proxy-Authorization", basic(AGENT, TOKEN).encode()),
            (b"Accept", b"*/*"), (second.encode(), basic(AGENT, TOKEN).encode())])
        flow = tflow.tflow(req=request)
        auth.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 407
    assert [name for name, _ in flow.request.headers.fields if name.lower() == b"proxy-authorization"] == []
    assert flow.request.headers.get_all("Accept") == ["*/*"]


@pytest.mark.parametrize("fields", [
    [],
    [(b"Accept", b"*/*")],
    [(b"proxy-authorization", b"Basic eA==")],
    [(b"Proxy-Authorization", b"a"), (b"X", b"\xff\xfe"), (b"PROXY-AUTHORIZATION", b"b\xe9")],
    [(b"Proxy-Authorization-X", b"a"), (b"Proxy-Authorizatio", b"b")],
])
def test_take_credentials_is_headers_pop(fields):
    """`take_credentials` gives and leaves what `Headers.pop("Proxy-Authorization", "")` does."""
    mine, theirs = http.Headers(list(fields)), http.Headers(list(fields))
    assert take_credentials(mine) == theirs.pop("Proxy-Authorization", "")
    assert mine.fields == theirs.fields


def test_plain_http_request_does_not_authenticate_its_connection(auth):
    """Only a CONNECT opens an authenticated tunnel; each plain proxy request must carry credentials."""
    with taddons.context(auth):
        client = tflow.tclient_conn()
        first = make_flow(
            "GET", URL, client_conn=client, headers={"Proxy-Authorization": basic(AGENT, TOKEN)}
        )
        auth.requestheaders(first)
        second = make_flow("GET", URL, client_conn=client)
        auth.requestheaders(second)
    assert first.metadata["cedargate.agent"] == AGENT
    assert_proxy_auth_required(second, "missing")


def test_flow_already_answered_is_left_alone(auth):
    with taddons.context(auth):
        flow = make_flow("GET", URL, resp=tutils.tresp(status_code=204))
        auth.requestheaders(flow)
    assert flow.response.status_code == 204


def test_stock_mitmproxy_reads_agents_from_the_cedargate_config(tmp_path: Path):
    config = tmp_path / "cedargate.yaml"
    config.write_text(yaml.safe_dump({"agents": {AGENT: {"token_sha256": TOKEN_SHA256}}}))
    auth = AgentAuth()
    with taddons.context(auth) as tctx:
        tctx.configure(auth, cedargate_config=str(config))
        good = make_flow("GET", URL, headers={"Proxy-Authorization": basic(AGENT, TOKEN)})
        bad = make_flow("GET", URL, headers={"Proxy-Authorization": basic(AGENT, "nope")})
        auth.requestheaders(good)
        auth.requestheaders(bad)
    assert good.metadata["cedargate.agent"] == AGENT
    assert_proxy_auth_required(bad, "invalid")


def test_stock_mitmproxy_refuses_a_bad_config_file(tmp_path: Path):
    config = tmp_path / "cedargate.yaml"
    config.write_text(yaml.safe_dump({"agents": {AGENT: {"token_sha256": "not-a-hash"}}}))
    auth = AgentAuth()
    with taddons.context(auth) as tctx:
        with pytest.raises(exceptions.OptionsError, match=r"agents\.ops-bot\.token_sha256"):
            tctx.configure(auth, cedargate_config=str(config))
