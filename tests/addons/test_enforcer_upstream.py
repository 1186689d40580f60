"""A forwarded call whose upstream failed it, as the enforcer's hooks see it: the agent's answer is
problem+json naming the decision and what failed, and the decision row keeps the failure kind.

The flows are mitmproxy's test flows; whether the call was sent is its server connection's state, as in
the running proxy (the enforcer reads nothing else for it).
"""

from __future__ import annotations

import json

from addon_support import AGENT, fire, make_flow, record_rows
from mitmproxy import http
from mitmproxy.proxy.layers.http import HttpErrorHook, HttpRequestHook, HttpResponseHook, HttpStream, _http1
from mitmproxy.test import taddons, tflow

from addons import error_pages
from addons.enforcer import Enforcer
from addons.upstream_deadline import DEADLINE_MISSED
from proxy.decision.upstream import OWN_API_MESSAGE
from proxy.runtime import Runtime

DEV_STOP = "http://localhost:9000/v1/instances/i-0abc/stop"  # allowed: localhost is a dev host


def forwarded(tctx, enforcer: Enforcer, url: str = DEV_STOP, *, sent: bool) -> http.HTTPFlow:
    flow = make_flow("POST", url)
    flow.metadata["cedargate.agent"] = AGENT
    if not sent:  # mitmproxy had not opened the upstream connection yet
        flow.server_conn.timestamp_tcp_setup = flow.server_conn.timestamp_tls_setup = None
    fire(tctx, enforcer, HttpRequestHook(flow))
    assert flow.response is None  # allowed, so mitmproxy forwards it
    return flow


def fails(tctx, enforcer: Enforcer, flow: http.HTTPFlow, message: str) -> None:
    flow.error = tflow.terr(message)
    fire(tctx, enforcer, HttpErrorHook(flow))


def rows(runtime: Runtime) -> list[dict]:
    assert runtime.recorder.flush()
    return record_rows(runtime.settings.state_dir / "cedargate.db")


def problem_of(flow: http.HTTPFlow) -> dict:
    assert flow.response.headers["Content-Type"] == "application/problem+json"
    problem = json.loads(flow.response.content)
    assert problem["decision_id"] == flow.response.headers["X-Cedargate-Decision"]
    return problem


def test_refused_connection_is_answered_and_recorded(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = forwarded(tctx, enforcer, sent=False)
        fails(tctx, enforcer, flow, "[Errno 111] Connect call failed ('127.0.0.1', 9000)")
    assert flow.response.status_code == 502
    problem = problem_of(flow)
    assert problem["type"] == "urn:cedargate:problem:upstream-unreachable" and problem["executed"] == "no"
    [row] = rows(runtime)
    assert row["decision_id"] == problem["decision_id"]
    assert (row["decision"], row["upstream_status"]) == ("allow", None)
    assert json.loads(row["errors"]) == [
        "upstream connect-refused: [Errno 111] Connect call failed ('127.0.0.1', 9000) (call not sent)"]


def test_connection_lost_after_sending_says_the_call_may_have_run(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = forwarded(tctx, enforcer, sent=True)
        fails(tctx, enforcer, flow, "server closed connection")
    problem = problem_of(flow)
    assert problem["type"] == "urn:cedargate:problem:upstream-reset" and problem["executed"] == "maybe"
    assert json.loads(rows(runtime)[0]["errors"]) == ["upstream reset: server closed connection (call sent)"]


def test_deadline_missed_is_a_504_timeout(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = forwarded(tctx, enforcer, sent=True)
        flow.metadata[DEADLINE_MISSED] = "read"
        fails(tctx, enforcer, flow, "server closed connection")
    assert flow.response.status_code == 504
    problem = problem_of(flow)
    assert problem["type"] == "urn:cedargate:problem:upstream-timeout"
    assert problem["upstream_failure"] == "read-timeout"
    assert f"within {runtime.settings.upstream_read_timeout:g} s" in problem["detail"]


def test_answer_read_until_the_connection_cedargate_closed_is_not_passed_on(runtime):
    # An answer without a length ends when the connection does: cut at the deadline, it looks whole.
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = forwarded(tctx, enforcer, sent=True)
        flow.metadata[DEADLINE_MISSED] = "read"
        flow.response = http.Response.make(200, b'{"items": [', {"Content-Type": "application/json"})
        fire(tctx, enforcer, HttpResponseHook(flow))
    assert flow.response.status_code == 504
    [row] = rows(runtime)
    assert row["upstream_status"] is None
    assert json.loads(row["errors"])[0].startswith("upstream read-timeout: ")


def test_agent_that_went_away_is_recorded_and_not_answered(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = forwarded(tctx, enforcer, sent=True)
        fails(tctx, enforcer, flow, "Client disconnected.")
    assert flow.response is None
    assert json.loads(rows(runtime)[0]["errors"]) == ["client-closed: Client disconnected."]


def test_name_resolving_to_cedargates_own_api_is_refused_with_403(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = forwarded(tctx, enforcer, sent=False)
        fails(tctx, enforcer, flow, f"Connection killed: {OWN_API_MESSAGE}")
    assert flow.response.status_code == 403
    assert problem_of(flow)["type"] == "urn:cedargate:problem:proxy-api"


def test_error_after_a_refusal_changes_nothing(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = make_flow("DELETE", "http://localhost:9000/v1/instances/i-1")  # no permit: refused
        flow.metadata["cedargate.agent"] = AGENT
        fire(tctx, enforcer, HttpRequestHook(flow))
        refusal = flow.response
        fails(tctx, enforcer, flow, "Client disconnected.")
    assert flow.response is refusal and refusal.status_code == 403
    assert [json.loads(r["errors"]) for r in rows(runtime)] == [[]]


def test_loading_the_enforcer_puts_cedargates_answers_in_mitmproxys_error_pages(runtime):
    with taddons.context(Enforcer(runtime)):
        pass
    assert getattr(HttpStream.handle_event, "cedargate", False)
    assert _http1.make_error_response is error_pages.error_response_bytes
