"""One pass down, one pass up: `decide_call` reads a call once and returns its complete decision, and the
proxy and `cedargate explain` decide through it alike.

Real cedarpy on the bundled policies (with the GitHub MCP endpoint of their action manifest); the proxy
is the enforcer addon driven by mitmproxy's own test helpers around a real `Runtime`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mitmproxy import http
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import taddons, tflow
from proxy_support import make_call, rpc, tool_call

import addons.enforcer
import proxy.calls.mapping
import proxy.oversight.held_calls
from addons.enforcer import Enforcer
from proxy.calls.mapping import Call
from proxy.calls.mcp.binding import binding_of
from proxy.calls.mcp.refusals import REFUSED_CODE
from proxy.cedar.engine import Engine
from proxy.cedar.manifest import Manifest
from proxy.cli.explain import explain
from proxy.decision.decisions import Decision, decide_call
from proxy.decision.gate import Gate, Outcome, Verdict
from proxy.runtime import Runtime
from proxy.settings.config import AgentCredential, Settings
from proxy.vocabulary.problems import Problem

MCP_URL = "http://mcp.github.example/mcp"
JSON = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


# Allowed, allowed, escalated (@escalate forbid), hard-denied, a notification, and a message that is
# refused alone for its `_method` key, though the batch around it parses.
BATCH = [
    rpc("tools/list", id="L"),
    tool_call("search_issues", {"query": "bug"}, id=2),
    tool_call("delete_repository", {"repo": "acme/old"}, id=3),
    tool_call("transfer_repository", {"repo": "acme/web"}, id=4),
    rpc("notifications/initialized", id=None),
    {**rpc("ping", id=5), "_method": "DELETE"},
]


def mcp_call(message, *, method: str = "POST", agent: str = "ops-bot") -> Call:
    return make_call(method, MCP_URL, agent=agent, headers=JSON,
                     body=json.dumps(message).encode() if message else b"")


@pytest.fixture
def mcp_gate(engine: Engine) -> Gate:
    return Gate(engine, None, clock=FIXED_CLOCK)


# A verdict's Cedar request holds the time it was decided; verdicts compared must share it.
def FIXED_CLOCK() -> datetime:  # noqa: N802
    return datetime(2026, 12, 3, 9, 0, tzinfo=UTC)


def same_verdict(one: Verdict, other: Verdict) -> None:
    """Two verdicts decided alike: everything but the decision id and the time they were made."""
    assert one.call == other.call
    assert (one.outcome, one.problem, one.status, one.detail) == (other.outcome, other.problem, other.status,
                                                                   other.detail)
    assert one.request == other.request
    assert [p.policy_id for p in one.determining] == [p.policy_id for p in other.determining]
    assert [p.policy_id for p in one.beneath] == [p.policy_id for p in other.beneath]
    assert one.escalation == other.escalation
    assert (one.errors, one.revision) == (other.errors, other.revision)


# -- read once --------------------------------------------------------------------------------------------

@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    """How often a call's body is parsed as JSON, read as JSON-RPC, and its MCP endpoint looked up."""
    counts = {"parse_json": 0, "parse_messages": 0, "mcp_endpoint": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return wrapper

    mapping = proxy.calls.mapping
    monkeypatch.setattr(mapping, "parse_json", counting("parse_json", mapping.parse_json))
    monkeypatch.setattr(mapping, "parse_messages", counting("parse_messages", mapping.parse_messages))
    monkeypatch.setattr(Manifest, "mcp_endpoint", counting("mcp_endpoint", Manifest.mcp_endpoint))
    return counts


@pytest.mark.parametrize("body", [tool_call("search_issues", {"query": "x"}), BATCH],
                         ids=["message", "batch"])
def test_an_mcp_body_is_parsed_once_and_its_endpoint_looked_up_once(mcp_gate, counted, body):
    decision = decide_call(mcp_gate, mcp_call(body))
    assert len(decision.verdicts) == (len(BATCH) if body is BATCH else 1)
    assert decision.verdicts[0].outcome is Outcome.ALLOW  # it was decided, from that one parse
    assert counted == {"parse_json": 1, "parse_messages": 1, "mcp_endpoint": 1}


def test_the_proxy_parses_an_mcp_body_once(runtime, counted):
    flow = proxy_flow(mcp_call(tool_call("search_issues", {"query": "x"})))
    enforce(runtime, flow)
    assert flow.response is None  # allowed: forwarded
    assert counted == {"parse_json": 1, "parse_messages": 1, "mcp_endpoint": 1}


def test_an_escalated_mcp_call_binds_its_override_from_the_one_reading(runtime, counted, monkeypatch):
    """Holding the call reads nothing again: the override binds to the message as the decision read it,
    the same bytes as reading the body anew would give (a grant must match the retry)."""
    reread = []
    monkeypatch.setattr(proxy.oversight.held_calls, "binding_of", lambda *args: reread.append(args))
    bound = []
    open_request = runtime.workflow.open

    def opening(*args, **kwargs):
        bound.append(kwargs["binding"])
        return open_request(*args, **kwargs)

    monkeypatch.setattr(runtime.workflow, "open", opening)
    call = mcp_call(tool_call("delete_repository", {"repo": "acme/old"}))
    flow = proxy_flow(call)
    enforce(runtime, flow)
    assert flow.response is not None
    problem = json.loads(flow.response.content)["result"]["_meta"]["cedargate/problem"]
    assert problem["type"] == Problem.OVERRIDE_PENDING.uri
    assert counted == {"parse_json": 1, "parse_messages": 1, "mcp_endpoint": 1}
    assert reread == []
    assert bound == [binding_of("call_tool", call.body)]


# -- a batch is decided message by message ----------------------------------------------------------------

def test_a_batchs_verdicts_are_its_messages_decided_alone(mcp_gate):
    call = mcp_call(BATCH)
    decision = decide_call(mcp_gate, call)
    assert decision.batch and [m.raw for m in decision.exchange.messages] == BATCH
    assert [v.outcome for v in decision.verdicts] == [Outcome.ALLOW, Outcome.ALLOW, Outcome.ESCALATE,
                                                      Outcome.DENY, Outcome.ALLOW, Outcome.ERROR]
    for message, verdict in zip(decision.exchange.messages, decision.verdicts, strict=True):
        same_verdict(verdict, mcp_gate.decide(call.with_body(message.encoded())))
    assert "_method" in decision.verdicts[-1].detail
    assert decision.verdicts[2].escalation is not None  # the escalation is the message's
    assert len({v.decision_id for v in decision.verdicts}) == len(BATCH)


def test_a_batch_as_one_call_is_refused_by_the_gate(mcp_gate):
    verdict = mcp_gate.decide(mcp_call(BATCH))
    assert verdict.outcome is Outcome.ERROR and verdict.problem is Problem.MAPPING_ERROR
    assert "decided message by message" in verdict.detail


def test_a_message_too_large_alone_is_refused_alone(engine):
    # Re-encoded alone, a message takes \u escapes for what came as UTF-8: past the cap, as if sent alone.
    gate = Gate(engine, None, proxy.calls.mapping.MappingOptions(max_body_bytes=400), clock=FIXED_CLOCK)
    batch = [tool_call("search_issues", {"query": "é" * 60}, id=1), tool_call("search_issues", {}, id=2)]
    call = mcp_call(None)
    call = call.with_body(json.dumps(batch, ensure_ascii=False).encode())
    assert len(call.body) <= 400
    decision = decide_call(gate, call)
    assert [v.status for v in decision.verdicts] == [413, 200]
    for message, verdict in zip(decision.exchange.messages, decision.verdicts, strict=True):
        same_verdict(verdict, gate.decide(call.with_body(message.encoded())))


# -- what to answer ---------------------------------------------------------------------------------------

def test_a_batch_forwards_its_allowed_messages_and_answers_for_the_refused_requests(mcp_gate):
    decision = decide_call(mcp_gate, mcp_call(BATCH))
    refusals = [None if v.allowed else v for v in decision.verdicts]
    answer = decision.answer(refusals)
    assert answer.refusal is None
    assert json.loads(answer.body) == [BATCH[0], BATCH[1], BATCH[4]]
    assert answer.forwarded == (decision.verdicts[0], decision.verdicts[1], decision.verdicts[4])
    assert [m.raw for m in answer.exchange.messages] == [BATCH[0], BATCH[1], BATCH[4]]
    assert [a["id"] for a in answer.exchange.answers] == [3, 4, 5]
    assert answer.exchange.answers[0]["result"]["isError"] is True  # a tools/call: a result the model reads
    assert answer.exchange.answers[2]["error"]["code"] == REFUSED_CODE  # another request: a JSON-RPC error
    # A released escalation goes upstream with the allowed messages.
    released = decision.answer([None, None, None, refusals[3], None, refusals[5]])
    assert json.loads(released.body) == [BATCH[0], BATCH[1], BATCH[2], BATCH[4]]


def test_a_batch_forwarded_whole_keeps_the_agents_body(mcp_gate):
    batch = [rpc("tools/list", id="L"), tool_call("search_issues", {}, id=2)]
    decision = decide_call(mcp_gate, mcp_call(batch))
    answer = decision.answer([None, None])
    assert answer.body is None and answer.refusal is None and answer.exchange.answers == ()


def test_a_batch_refused_whole_is_answered_in_json_rpc_under_its_first_refusal(mcp_gate):
    batch = [tool_call("transfer_repository", {"repo": "a/b"}, id=1), rpc("notifications/x", id=None),
             rpc("ping", id=2)]
    decision = decide_call(mcp_gate, mcp_call(batch, agent="nobody"))  # whom no policy permits anything
    assert not any(v.allowed for v in decision.verdicts)
    answer = decision.answer(list(decision.verdicts))
    assert answer.refusal is decision.verdicts[0] and answer.batch and answer.forwarded == ()
    assert [a["id"] for a in answer.rpc] == [1, 2]
    only_notifications = decide_call(mcp_gate, mcp_call([rpc("notifications/x", id=None)], agent="nobody"))
    answer = only_notifications.answer(list(only_notifications.verdicts))
    assert answer.rpc == () and answer.refusal is only_notifications.verdicts[0]  # problem+json then


def test_a_refused_request_gets_a_json_rpc_answer_and_other_calls_problem_json(mcp_gate):
    decision = decide_call(mcp_gate, mcp_call(tool_call("transfer_repository", {"repo": "a/b"})))
    verdict = decision.verdicts[0]
    assert verdict.outcome is Outcome.DENY
    answer = decision.answer([verdict])
    assert answer.refusal is verdict and not answer.batch
    assert answer.rpc[0]["id"] == 7 and answer.rpc[0]["result"]["_meta"]["cedargate/problem"]["decision_id"] \
        == verdict.decision_id
    unreadable = decide_call(mcp_gate, mcp_call(None).with_body(b"[not json"))
    assert unreadable.exchange.messages == () and unreadable.verdicts[0].problem is Problem.MAPPING_ERROR
    assert unreadable.answer(list(unreadable.verdicts)).rpc == ()
    plain = decide_call(mcp_gate, make_call("DELETE", "http://localhost:9000/v1/volumes/v-1", agent="nobody"))
    assert plain.exchange is None and plain.answer(list(plain.verdicts)).rpc == ()


def test_an_allowed_mcp_call_is_forwarded_with_its_exchange(mcp_gate):
    decision = decide_call(mcp_gate, mcp_call(tool_call("search_issues", {})))
    answer = decision.answer([None])
    assert answer.forwarded == decision.verdicts and answer.body is None
    assert answer.exchange == decision.exchange and not answer.exchange.batch
    stream = decide_call(mcp_gate, mcp_call(None, method="GET"))
    assert stream.exchange is not None and stream.exchange.messages == ()  # its answer is read all the same
    http_call = decide_call(mcp_gate, make_call("GET", "http://127.0.0.1:9000/v1/instances"))
    assert http_call.exchange is None and http_call.answer([None]).exchange is None


def test_final_verdicts_must_match_the_decided_ones(mcp_gate):
    decision = decide_call(mcp_gate, mcp_call(BATCH))
    with pytest.raises(ValueError, match="final verdicts"):
        decision.answer([None])


# -- explain decides as the proxy does --------------------------------------------------------------------

@pytest.fixture
def runtime(tmp_path: Path, policy_dir: Path) -> Iterator[Runtime]:
    settings = Settings(policy_dir=policy_dir, state_dir=tmp_path / "state", policy_reload_interval=0,
                        agents={"ops-bot": AgentCredential(token_sha256="0" * 64)})
    started = Runtime.start(settings)
    yield started
    started.close()


def proxy_flow(call: Call) -> http.HTTPFlow:
    headers = {"Host": urlsplit(call.url).netloc, "Prefer": "wait=0", **call.headers}
    flow = tflow.tflow(req=http.Request.make(call.method, call.url, call.body, headers))
    flow.metadata["cedargate.agent"] = call.agent
    return flow


def enforce(runtime: Runtime, flow: http.HTTPFlow) -> None:
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        hook = tctx.master.addons.invoke_addon(enforcer, HttpRequestHook(flow))
        tctx.master.event_loop.run_until_complete(hook)


@pytest.mark.parametrize("call", [
    mcp_call(BATCH),
    mcp_call(tool_call("delete_repository", {"repo": "acme/old"})),
    mcp_call(tool_call("transfer_repository", {"repo": "acme/web"})),
    make_call("GET", "http://127.0.0.1:9000/v1/instances"),
    make_call("DELETE", "http://localhost:9000/v1/volumes/v-1"),
], ids=["batch", "escalated-tool", "denied-tool", "allowed-http", "denied-http"])
def test_explain_and_the_proxy_decide_a_call_alike(runtime, monkeypatch, call):
    decided: list[Decision] = []

    def spy(gate: Gate, seen: Call) -> Decision:
        decided.append(decide_call(gate, seen))
        return decided[-1]

    monkeypatch.setattr(addons.enforcer, "decide_call", spy)
    flow = proxy_flow(call)
    enforce(runtime, flow)
    [proxied] = decided
    assert proxied.call.body == call.body and proxied.call.url == call.url
    # At the instant the proxy decided, or a second's tick between the two would differ in context.time.
    report = explain(runtime.engine, proxied.call, runtime.gate.mapping, at=proxied.verdicts[0].at)
    parts = report["batch"] if proxied.batch else [report]
    assert len(parts) == len(proxied.verdicts)
    for part, verdict in zip(parts, proxied.verdicts, strict=True):
        assert part["decision"] == verdict.outcome.value
        assert (part["action"], part["resource"]) == (verdict.action or None, verdict.resource or None)
        assert part["context"] == (verdict.request.context if verdict.request else None)
        assert [p["id"] for p in part["policies"]] == [p.policy_id for p in verdict.determining]
        assert part["detail"] == (verdict.detail or None)
        assert part["problem"] == (verdict.problem.uri if verdict.problem else None)
    # And what the proxy did follows the decision: forwarded only if a message was allowed.
    assert (flow.response is None) == any(v.allowed for v in proxied.verdicts)


def test_a_message_released_with_changes_goes_changed_in_its_batch(mcp_gate):
    """A batch message a reviewer approved with changes is forwarded changed, the others as they came."""
    batch = [tool_call("search_issues", {"query": "bug"}, id=2), tool_call("delete_repository", {"repo": "a/b"}, id=3)]
    decision = decide_call(mcp_gate, mcp_call(batch))
    changed = {**batch[1], "params": {"name": "delete_repository", "arguments": {"repo": "a/c"}}}
    answer = decision.answer([None, None]).with_changes({decision.verdicts[1].decision_id:
                                                        json.dumps(changed).encode()})
    assert answer.body is not None and json.loads(answer.body) == [batch[0], changed]
    alone = decide_call(mcp_gate, mcp_call(batch[1]))
    body = json.dumps(changed).encode()
    assert alone.answer([None]).with_changes({alone.verdicts[0].decision_id: body}).body == body
    assert decision.answer([None, None]).with_changes({"another-decision": body}).body is None
