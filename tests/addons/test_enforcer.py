"""The enforcer as mitmproxy runs it: each flow decided by the real core, refused or passed, recorded once.

Driven with mitmproxy's own test helpers (`taddons.context`, `tflow`) around a real `Runtime`: the
bundled policies, real cedarpy and a real SQLite record read back from its file. Hooks are called the way
mitmproxy's addon manager calls them (awaited when async), on the master's event loop.

Denials an operator's policy marks escalatable may be held for a human; tests that hit one send
`Prefer: wait=0` (RFC 7240) so the refusal comes at once, and hard denials use calls no policy permits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from addon_support import AGENT, TOKEN, TOKEN_SHA256, basic, fire, make_flow, record_rows
from mitmproxy import eventsequence, exceptions, http
from mitmproxy.proxy.layers.http import HttpErrorHook, HttpRequestHook, HttpResponseHook
from mitmproxy.test import taddons, tflow, tutils

from addons.agent_auth import AgentAuth
from addons.enforcer import Enforcer, header_values
from proxy.runtime import Runtime

DEV = "http://localhost:9000"  # Host::"localhost" is tagged dev in the bundled entities
PROD = "http://127.0.0.1:9000"  # Host::"127.0.0.1" is production-critical
NO_WAIT = {"Prefer": "wait=0"}

def agent_flow(method: str, url: str, **kwargs) -> http.HTTPFlow:
    """A flow as it reaches the enforcer after AgentAuth accepted the agent's credential."""
    flow = make_flow(method, url, **kwargs)
    flow.metadata["cedargate.agent"] = AGENT
    return flow


def request(tctx, enforcer: Enforcer, flow: http.HTTPFlow) -> None:
    fire(tctx, enforcer, HttpRequestHook(flow))


def upstream_answers(tctx, enforcer: Enforcer, flow: http.HTTPFlow, status: int) -> None:
    flow.response = tutils.tresp(status_code=status)
    fire(tctx, enforcer, HttpResponseHook(flow))


def upstream_fails(tctx, enforcer: Enforcer, flow: http.HTTPFlow, message: str) -> None:
    flow.error = tflow.terr(message)
    fire(tctx, enforcer, HttpErrorHook(flow))


def rows(runtime: Runtime) -> list[dict]:
    assert runtime.recorder.flush(), "the record did not catch up"
    return record_rows(runtime.settings.state_dir / "cedargate.db")


def problem_of(response: http.Response) -> dict:
    assert response.headers["Content-Type"] == "application/problem+json"
    return json.loads(response.content)


def run_through_mitmproxy(
    tctx: taddons.context, flow: http.HTTPFlow, upstream: http.Response | None = None
) -> None:
    """Every hook of the flow, on every addon, with mitmproxy's own error handling (a failing hook is logged).

    If no addon answered the request, `upstream` is what the upstream answers to the forwarded call.
    """
    for event in eventsequence.iterate(flow):
        tctx.master.event_loop.run_until_complete(tctx.master.addons.trigger_event(event))
        if isinstance(event, HttpRequestHook) and flow.response is None and upstream is not None:
            flow.response = upstream


def test_allowed_call_gets_no_response_so_mitmproxy_forwards_it(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = agent_flow("GET", f"{PROD}/v1/instances?zone=a", headers={"Accept": "application/json"})
        request(tctx, enforcer, flow)
    assert flow.response is None
    assert flow.request.url == f"{PROD}/v1/instances?zone=a"
    assert flow.request.headers["Accept"] == "application/json"


def http2_flow(method: str, url: str, body: bytes, length: str | None) -> http.HTTPFlow:
    """An HTTP/2 request as mitmproxy reads it: the body apart from a content-length the agent may omit."""
    flow = agent_flow(method, url, content=body)
    flow.request.http_version = "HTTP/2.0"
    flow.request.authority = flow.request.headers.pop("Host")
    del flow.request.headers["content-length"]
    if length is not None:
        flow.request.headers["content-length"] = length
    return flow


def test_an_http2_body_without_a_length_is_forwarded_with_its_length(runtime):
    # mitmproxy would pass the headers on to an HTTP/1.1 upstream as they came: without a length, the
    # upstream reads no body, and the body as the next request on the connection.
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        smuggled = b"DELETE /v1/volumes/v-1 HTTP/1.1\r\n\r\n"
        flow = http2_flow("POST", f"{DEV}/v1/instances/i-0abc/stop", smuggled, None)
        request(tctx, enforcer, flow)
    assert flow.response is None
    assert flow.request.headers["content-length"] == str(len(flow.request.raw_content))


@pytest.mark.parametrize("length", ["3", "0", "+34", "34, 34"])
def test_an_http2_length_that_is_not_the_bodys_is_refused(runtime, length):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        body = b'{"reason": "stuck", "force": 1}'
        flow = http2_flow("POST", f"{DEV}/v1/instances/i-0abc/stop", body, length)
        request(tctx, enforcer, flow)
    assert flow.response is not None, f"forwarded with content-length {length} to an upstream reading by it"
    assert flow.response.status_code == 400
    assert "is not the length of the body sent" in problem_of(flow.response)["detail"]


def test_an_http2_header_with_a_line_break_is_refused(runtime):
    # mitmproxy writes HTTP/2 fields to an HTTP/1.1 upstream as they came: the line break would start a
    # header of the agent's choosing there, here a Host naming the production host.
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = http2_flow("POST", f"{DEV}/v1/instances/i-0abc/stop", b"", None)
        flow.request.headers["x-note"] = "stuck\r\nHost: 127.0.0.1:9000"
        request(tctx, enforcer, flow)
    assert flow.response is not None, "forwarded a header that is two at an HTTP/1.1 upstream"
    assert flow.response.status_code == 400
    assert "send each header on one line" in problem_of(flow.response)["detail"]


def test_allowed_call_is_recorded_once_with_the_upstream_status(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = agent_flow("POST", f"{DEV}/v1/instances/i-0abc/stop")
        request(tctx, enforcer, flow)
        assert flow.response is None
        upstream_answers(tctx, enforcer, flow, 202)
    [row] = rows(runtime)
    assert row["decision"] == "allow"
    assert row["upstream_status"] == 202
    assert (row["agent"], row["method"], row["host"], row["port"], row["path"]) == (
        AGENT, "POST", "localhost", 9000, "/v1/instances/i-0abc/stop",
    )
    assert json.loads(row["determining_policies"]) == ["ops-stop-instance"]
    assert row["policy_revision"] == runtime.engine.status.revision


def test_allowed_call_whose_upstream_failed_is_recorded_once_without_status(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = agent_flow("GET", f"{DEV}/v1/instances")
        request(tctx, enforcer, flow)
        upstream_fails(tctx, enforcer, flow, "server disconnected")
    [row] = rows(runtime)
    assert row["decision"] == "allow"
    assert row["upstream_status"] is None
    assert row["path"] == "/v1/instances"


def test_error_after_the_response_does_not_record_the_call_twice(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = agent_flow("GET", f"{DEV}/v1/instances")
        request(tctx, enforcer, flow)
        upstream_answers(tctx, enforcer, flow, 200)
        upstream_fails(tctx, enforcer, flow, "client disconnected")
    [row] = rows(runtime)
    assert row["upstream_status"] == 200


def test_denied_call_gets_403_problem_json_and_is_recorded_once(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = agent_flow("DELETE", f"{DEV}/v1/instances/i-1")
        run_through_mitmproxy(tctx, flow)  # request, then the response hook for the refusal itself
    response = flow.response
    assert response.status_code == 403
    problem = problem_of(response)
    assert response.headers["X-Cedargate-Decision"] == problem["decision_id"]
    assert problem["type"] == "urn:cedargate:problem:no-permit"
    assert problem["status"] == 403
    assert problem["detail"] == (
        f"no policy permits {AGENT} to DELETE {DEV}/v1/instances/i-1 (default deny)"
    )
    assert problem["agent"] == AGENT
    [row] = rows(runtime)
    assert row["decision_id"] == problem["decision_id"]
    assert row["decision"] == "deny"
    assert row["upstream_status"] is None


def test_call_a_forbid_matches_is_refused_naming_the_policy_and_recorded_once(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = agent_flow("DELETE", f"{DEV}/v1/volumes/vol-1", headers=NO_WAIT)
        run_through_mitmproxy(tctx, flow)
    assert flow.response.status_code == 403
    problem = problem_of(flow.response)
    assert [p["id"] for p in problem["policies"]] == ["no-volume-deletion"]
    assert problem["policies"][0]["reason"] == "Deleting a volume destroys its data for good."
    [row] = rows(runtime)
    assert row["decision_id"] == flow.response.headers["X-Cedargate-Decision"]
    assert row["upstream_status"] is None


def test_call_is_decided_on_the_address_mitmproxy_connects_to_not_the_host_header(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = agent_flow(
            "POST", f"{PROD}/v1/instances/i-1/stop", headers={"Host": "localhost:9000", **NO_WAIT}
        )
        request(tctx, enforcer, flow)
    assert flow.response.status_code == 403
    assert [p["id"] for p in problem_of(flow.response)["policies"]] == ["protect-production-instances"]


def test_host_header_naming_another_host_is_refused(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = agent_flow("POST", f"{DEV}/v1/instances/i-1/stop", headers=NO_WAIT)
        # make_flow sends Host as the URL names it; an agent's own Host header arrives as it sent it.
        flow.request.headers["Host"] = "cloud.prod.example"
        request(tctx, enforcer, flow)
    assert flow.response is not None, "forwarded to an upstream that routes on Host: cloud.prod.example"
    assert flow.response.status_code == 400
    assert b"cloud.prod.example" in flow.response.content


def test_request_naming_no_host_goes_upstream_naming_the_host_it_was_decided_for(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = agent_flow("GET", f"{DEV}/v1/instances")
        del flow.request.headers["Host"]  # HTTP/1.0 style: an upstream would answer from its default site
        request(tctx, enforcer, flow)
    assert flow.response is None
    assert flow.request.headers.get_all("Host") == ["localhost:9000"]


@pytest.mark.parametrize("host", ["", " ", ":9000"])
def test_request_naming_an_empty_host_is_refused(runtime, host):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = agent_flow("GET", f"{DEV}/v1/instances")
        flow.request.headers["Host"] = host
        request(tctx, enforcer, flow)
    assert flow.response is not None, "forwarded without naming the host it was decided for"
    assert flow.response.status_code == 400
    assert problem_of(flow.response)["type"] == "urn:cedargate:problem:mapping-error"


def test_flow_without_an_agent_is_refused(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = make_flow("GET", f"{DEV}/v1/instances")
        request(tctx, enforcer, flow)
    assert flow.response.status_code == 407
    assert rows(runtime) == []


def test_flow_without_an_agent_gets_the_same_407_as_from_agent_auth(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = make_flow("GET", f"{DEV}/v1/instances")
        request(tctx, enforcer, flow)
    assert flow.response.headers.get("Proxy-Authenticate") == 'Basic realm="cedargate"'
    assert problem_of(flow.response)["type"] == "urn:cedargate:problem:proxy-auth-required"


def test_unauthenticated_call_never_reaches_the_gate(runtime):
    """AgentAuth and the enforcer in mitmproxy's order: a bad credential is a 407, not a decision."""
    auth, enforcer = AgentAuth(runtime.agents), Enforcer(runtime)
    with taddons.context(auth, enforcer) as tctx:
        refused = make_flow("GET", f"{DEV}/v1/instances", headers={"Proxy-Authorization": basic(AGENT, "x")})
        allowed = make_flow(
            "GET", f"{DEV}/v1/instances", headers={"Proxy-Authorization": basic(AGENT, TOKEN)}
        )
        run_through_mitmproxy(tctx, refused, upstream=tutils.tresp(status_code=200))
        run_through_mitmproxy(tctx, allowed, upstream=tutils.tresp(status_code=200))
    assert refused.response.status_code == 407
    assert allowed.response.status_code == 200
    [row] = rows(runtime)
    assert (row["method"], row["decision"], row["upstream_status"]) == ("GET", "allow", 200)


def test_flow_already_answered_or_failed_is_not_decided(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        answered = agent_flow("DELETE", f"{DEV}/v1/instances/i-1", resp=tutils.tresp(status_code=204))
        failed = agent_flow("DELETE", f"{DEV}/v1/instances/i-1", err=True)
        request(tctx, enforcer, answered)
        request(tctx, enforcer, failed)
    assert answered.response.status_code == 204
    assert failed.response is None
    assert rows(runtime) == []


@pytest.mark.parametrize("path", ["//v1/volumes/vol-1", "//[x/v1/volumes/vol-1"])
def test_path_with_an_empty_first_segment_is_refused_as_not_normal(runtime, path):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = agent_flow("DELETE", f"{DEV}/placeholder", headers=NO_WAIT)
        flow.request.path = path
        run_through_mitmproxy(tctx, flow)
    assert flow.response is not None, f"DELETE {path} would be forwarded upstream"
    assert flow.response.status_code == 400
    problem = problem_of(flow.response)
    assert problem["type"] == "urn:cedargate:problem:mapping-error"
    assert "empty segment" in problem["detail"]
    [row] = rows(runtime)
    assert row["path"] == path


# Under stock mitmproxy (`mitmdump -s addons/enforcer.py`) the enforcer builds its own runtime from options.
# Each of these tests runs in an empty working directory, so the defaults (./policies, ./.cedargate) that
# mitmproxy falls back to when it rolls refused options back can never pick up the repository's own.


def stock_context(enforcer: Enforcer) -> taddons.context:
    # mitmproxy reads every attribute of an addon as it registers it: an unconfigured one must allow that.
    return taddons.context(enforcer)


@pytest.fixture
def stock_config(tmp_path: Path, monkeypatch) -> Path:
    """A cedargate.yaml with the agent and a state dir of the test's own, the working directory emptied."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    config = tmp_path / "cedargate.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "stock-state"),
        "policy_reload_interval": 0,
        "agents": {AGENT: {"token_sha256": TOKEN_SHA256}},
    }))
    return config


@pytest.fixture
def broken_policy_dir(tmp_path: Path, policy_dir: Path) -> Path:
    broken = tmp_path / "broken-policies"
    broken.mkdir()
    (broken / "schema.cedarschema").write_text((policy_dir / "schema.cedarschema").read_text())
    (broken / "ops.cedar").write_text('@id("half") permit (principal, action, resource')
    return broken


def test_stock_mitmproxy_options_build_a_runtime(tmp_path, policy_dir, stock_config):
    enforcer = Enforcer()
    with stock_context(enforcer) as tctx:
        tctx.configure(enforcer, cedargate_policy_dir=str(policy_dir), cedargate_config=str(stock_config))
        try:
            assert enforcer.runtime is not None
            assert enforcer.runtime.engine.policy_dir == policy_dir
            flow = agent_flow("DELETE", f"{DEV}/v1/instances/i-1")
            run_through_mitmproxy(tctx, flow)
            assert flow.response.status_code == 403
            assert enforcer.runtime.recorder.flush()
        finally:
            enforcer.done()
    assert [r["decision"] for r in record_rows(tmp_path / "stock-state" / "cedargate.db")] == ["deny"]


def test_stock_mitmproxy_refuses_a_bad_policy_dir(tmp_path, stock_config):
    enforcer = Enforcer()
    with stock_context(enforcer) as tctx:
        with pytest.raises(
            exceptions.OptionsError, match=r"^cedargate cannot start: policy directory \S+ does not exist"
        ):
            tctx.configure(
                enforcer, cedargate_policy_dir=str(tmp_path / "no-such-policies"), cedargate_config=str(stock_config)
            )
    assert enforcer.runtime is None


def test_stock_mitmproxy_keeps_the_running_policies_when_given_a_broken_set(
    policy_dir, broken_policy_dir, stock_config
):
    enforcer = Enforcer()
    with stock_context(enforcer) as tctx:
        tctx.configure(enforcer, cedargate_policy_dir=str(policy_dir), cedargate_config=str(stock_config))
        try:
            with pytest.raises(exceptions.OptionsError, match=r"^cedargate cannot start: .*ops\.cedar"):
                tctx.configure(enforcer, cedargate_policy_dir=str(broken_policy_dir))
            assert tctx.options.cedargate_policy_dir == str(policy_dir)
            denied = agent_flow("DELETE", f"{DEV}/v1/instances/i-1")
            allowed = agent_flow("GET", f"{DEV}/v1/instances")
            request(tctx, enforcer, denied)
            request(tctx, enforcer, allowed)
            assert denied.response.status_code == 403
            assert allowed.response is None
        finally:
            enforcer.done()


# The same configure() contract, exercised without registering an unconfigured Enforcer (which the bug above
# prevents): AgentAuth declares the options, and configure() is called as mitmproxy calls it.


def test_configure_builds_a_runtime_from_the_options(tmp_path, policy_dir, stock_config):
    enforcer = Enforcer()
    with taddons.context(AgentAuth()) as tctx:
        tctx.options.update(cedargate_policy_dir=str(policy_dir), cedargate_config=str(stock_config))
        enforcer.configure({"cedargate_policy_dir", "cedargate_config"})
        try:
            denied = agent_flow("DELETE", f"{DEV}/v1/instances/i-1")
            allowed = agent_flow("GET", f"{DEV}/v1/instances")
            request(tctx, enforcer, denied)
            request(tctx, enforcer, allowed)
            assert denied.response.status_code == 403
            assert allowed.response is None
            assert enforcer.runtime.settings.state_dir == tmp_path / "stock-state"
        finally:
            enforcer.done()


def test_configure_refuses_a_broken_policy_set_and_keeps_the_running_one(
    policy_dir, broken_policy_dir, stock_config
):
    enforcer = Enforcer()
    with taddons.context(AgentAuth()) as tctx:
        tctx.options.update(cedargate_policy_dir=str(policy_dir), cedargate_config=str(stock_config))
        enforcer.configure({"cedargate_policy_dir", "cedargate_config"})
        running = enforcer.runtime
        try:
            tctx.options.update(cedargate_policy_dir=str(broken_policy_dir))
            with pytest.raises(exceptions.OptionsError, match=r"^cedargate cannot start: .*ops\.cedar"):
                enforcer.configure({"cedargate_policy_dir"})
            assert enforcer.runtime is running
            flow = agent_flow("DELETE", f"{DEV}/v1/instances/i-1")
            request(tctx, enforcer, flow)
            assert flow.response.status_code == 403
        finally:
            enforcer.done()


def test_configure_refuses_a_missing_policy_dir_naming_it(tmp_path, stock_config):
    enforcer = Enforcer()
    missing = tmp_path / "no-such-policies"
    with taddons.context(AgentAuth()) as tctx:
        tctx.options.update(cedargate_policy_dir=str(missing), cedargate_config=str(stock_config))
        with pytest.raises(exceptions.OptionsError) as refused:
            enforcer.configure({"cedargate_policy_dir", "cedargate_config"})
    assert str(refused.value) == (
        f"cedargate cannot start: policy directory {missing} does not exist or is not a directory"
    )
    assert enforcer.runtime is None


def test_standalone_the_enforcer_runs_its_own_cores_expiry_until_done(runtime: Runtime):
    """Under stock mitmdump the enforcer builds its own core, so it starts that core's jobs when mitmproxy
    runs and stops them when it is done; a core handed to it is started by its composer (`cedargate
    run`)."""
    import asyncio
    import uuid

    from proxy.calls.mapping import Call
    from proxy.cedar.escalation import Escalation, Requirement

    requirement = Requirement("protect-production-instances", ("engineering-manager",), 1)
    due, _ = runtime.workflow.open(
        Call(agent=AGENT, method="POST", scheme="http", host="127.0.0.1", port=9000,
             path="/v1/instances/i-1/stop"),
        decision_id=str(uuid.uuid4()), escalation=Escalation((requirement,), 0),
        policies=[{"id": requirement.policy_id, "reason": None, "annotations": {}}],
        cedar_request={"principal": f'Agent::"{AGENT}"', "action": 'Action::"post"',
                       "resource": 'Host::"127.0.0.1"', "context": {}},
        revision="rev-1", justification=None,
    )
    handed = Enforcer(runtime)
    own = Enforcer()
    own.runtime = runtime  # as its `configure` builds one from mitmproxy's options
    with taddons.context(own) as tctx:
        for name, kind, default in (("connection_strategy", str, "eager"), ("rawtcp", bool, True)):
            if name not in tctx.options:  # the proxy server's options, which `running` sets
                tctx.options.add_option(name, kind, default, "")

        async def run_until_expired() -> None:
            handed.running()
            assert not runtime.jobs.running
            own.running()
            async with asyncio.timeout(10):
                while runtime.overrides.get(due.id).status != "expired":
                    await asyncio.sleep(0.05)

        tctx.master.event_loop.run_until_complete(run_until_expired())
        assert runtime.jobs.running
        own.done()
        assert not runtime.jobs.running


@pytest.mark.parametrize("fields", [
    [],
    [(b"Prefer", b"wait=0")],
    [(b"prefer", b"wait=5"), (b"Accept", b"*/*"), (b"PREFER", b"respond-async")],
    [(b"X-Agent-Justification", b"ticket \xc3\xa9 \xff"), (b"Prefer-X", b"wait=1")],
])
def test_header_values_reads_as_headers_get(fields):
    """What the enforcer reads of Prefer and X-Agent-Justification is what `Headers.get` gives."""
    headers = http.Headers(list(fields))
    assert header_values(headers, b"prefer", b"x-agent-justification") == [
        headers.get("Prefer"), headers.get("X-Agent-Justification")]
