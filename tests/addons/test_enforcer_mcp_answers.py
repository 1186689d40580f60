"""The enforcer reading an MCP server's answers: whole answers checked within their cap (off the event
loop when large, encoded or carrying a tool list, on it when small, plain and without one), event
streams passed on through a capped rewriter that honours mitmproxy's stream contract, and the decision
recorded on both paths.

A real Runtime (bundled policies, real cedarpy, real SQLite record) under mitmproxy's test helpers.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from addon_support import AGENT, TOKEN_SHA256, fire, make_flow, record_rows
from mitmproxy import http
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHeadersHook, HttpResponseHook
from mitmproxy.test import taddons

import addons.enforcer
from addons.enforcer import Enforcer
from proxy.calls.mcp.answers import READ_ON_LOOP_BYTES
from proxy.calls.mcp.sse import MAX_ANSWER_DEPTH
from proxy.runtime import Runtime
from proxy.settings.config import AgentCredential
from tests.support.runtime import started_runtime

MCP_URL = "http://mcp.github.example/mcp"
EVENT_CAP, ANSWER_CAP = 4096, 2 * READ_ON_LOOP_BYTES
TOOLS = {"jsonrpc": "2.0", "id": 1,
         "result": {"tools": [{"name": "search_issues"}, {"name": "not_in_manifest"}]}}
FILTERED = {**TOOLS, "result": {"tools": [{"name": "search_issues"}]}}
RESULT = {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "3 issues"}]}}
UPSTREAM_ANSWER = "urn:cedargate:problem:upstream-answer"


@pytest.fixture
def runtime_settings() -> dict[str, Any]:
    return {"agents": {AGENT: AgentCredential(token_sha256=TOKEN_SHA256)},
            "max_mcp_event_bytes": EVENT_CAP, "max_mcp_answer_bytes": ANSWER_CAP}


def tools_list_flow() -> http.HTTPFlow:
    return mcp_flow({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})


def tools_call_flow() -> http.HTTPFlow:
    return mcp_flow({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                     "params": {"name": "search_issues", "arguments": {"query": "flaky test"}}})


def mcp_flow(message: dict) -> http.HTTPFlow:
    body = json.dumps(message).encode()
    flow = make_flow("POST", MCP_URL, content=body, headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream"})
    flow.metadata["cedargate.agent"] = AGENT
    return flow


def answered(flow: http.HTTPFlow, body: bytes, media: str, coding: str | None = None) -> None:
    headers = {"Content-Type": media}
    if coding:
        headers["Content-Encoding"] = coding
    flow.response = http.Response.make(200, b"", headers)
    flow.response.raw_content = body


def recorded(runtime: Runtime) -> list[dict]:
    assert runtime.recorder.flush(), "the record did not catch up"
    return record_rows(runtime.settings.state_dir / "cedargate.db")


def test_a_whole_answer_is_checked_off_the_event_loop(runtime, monkeypatch):
    loop_went_on = threading.Event()
    checked_in = []
    check = addons.enforcer.check_answer

    def blocking_check(*args, **kwargs):
        checked_in.append(threading.get_ident())
        # Returns only once a coroutine on the event loop has run: never, were it run on the loop itself.
        if not loop_went_on.wait(10):
            raise AssertionError("the event loop did not run while the answer was checked")
        return check(*args, **kwargs)

    monkeypatch.setattr(addons.enforcer, "check_answer", blocking_check)
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = tools_list_flow()
        fire(tctx, enforcer, HttpRequestHook(flow))
        assert flow.response is None
        answered(flow, gzip.compress(json.dumps(TOOLS).encode()), "application/json", "gzip")

        async def other_flows() -> None:
            await asyncio.sleep(0)
            loop_went_on.set()

        async def both() -> None:
            answer = tctx.master.addons.invoke_addon(enforcer, HttpResponseHook(flow))
            await asyncio.gather(answer, other_flows())

        tctx.master.event_loop.run_until_complete(both())
    assert checked_in and checked_in[0] != threading.get_ident()
    assert flow.response.status_code == 200 and "content-encoding" not in flow.response.headers
    assert json.loads(flow.response.content) == FILTERED
    [row] = recorded(runtime)
    assert (row["decision"], row["upstream_status"]) == ("allow", 200)


def checked_on(runtime, monkeypatch, body: bytes, coding: str | None = None,
               request: Callable[[], http.HTTPFlow] = tools_list_flow) -> tuple[bool, http.HTTPFlow]:
    """Whether the answer `body` to `request` was checked on the event loop's thread, and the flow as the
    agent gets it."""
    threads = []
    check = addons.enforcer.check_answer

    def recording_check(*args, **kwargs):
        threads.append(threading.get_ident())
        return check(*args, **kwargs)

    monkeypatch.setattr(addons.enforcer, "check_answer", recording_check)
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = request()
        fire(tctx, enforcer, HttpRequestHook(flow))
        assert flow.response is None, "the request was not forwarded"
        answered(flow, body, "application/json", coding)
        fire(tctx, enforcer, HttpResponseHook(flow))
    assert len(threads) == 1
    return threads[0] == threading.get_ident(), flow


def padded(answer: dict, size: int) -> bytes:
    """`answer` as JSON text of exactly `size` bytes (blanks after it, which JSON allows)."""
    text = json.dumps(answer).encode()
    return text + b" " * (size - len(text))


def test_a_small_plain_tool_result_is_checked_on_the_event_loop(runtime, monkeypatch):
    body = padded(RESULT, READ_ON_LOOP_BYTES)
    on_loop, flow = checked_on(runtime, monkeypatch, body, request=tools_call_flow)
    assert on_loop
    assert flow.response.status_code == 200 and flow.response.content == body  # as the server sent it


def many_tools(count: int) -> dict:
    return {"jsonrpc": "2.0", "id": 1,
            "result": {"tools": [{"name": f"not_in_manifest_{i}"} for i in range(count)]
                       + [{"name": "search_issues"}]}}


@pytest.mark.parametrize("escape", [False, True])
def test_a_small_plain_tool_list_is_filtered_off_the_event_loop(runtime, monkeypatch, escape):
    # Review finding 1: filtering asks the policy once per name, and thousands fit in 64 KiB.
    text = json.dumps(many_tools(1500)).encode()
    if escape:  # a key spelt with an escape is the same key to every JSON reader
        text = text.replace(b'"tools"', b'"\\u0074ools"')
    assert len(text) <= READ_ON_LOOP_BYTES
    on_loop, flow = checked_on(runtime, monkeypatch, text)
    assert not on_loop
    assert json.loads(flow.response.content) == FILTERED  # only the tool the manifest lists


@pytest.mark.parametrize("request_flow", [tools_list_flow, tools_call_flow])
def test_a_tool_list_is_filtered_off_the_event_loop_whatever_it_answers(runtime, monkeypatch, request_flow):
    # Every result carrying a tool list is filtered (`filter_tool_list`), so every one goes to the thread.
    on_loop, flow = checked_on(runtime, monkeypatch, json.dumps(TOOLS).encode(), request=request_flow)
    assert not on_loop
    assert json.loads(flow.response.content) == FILTERED


@pytest.mark.parametrize("body, coding", [
    (padded(RESULT, READ_ON_LOOP_BYTES + 1), None),  # one byte more
    (gzip.compress(json.dumps(RESULT).encode()), "gzip"),  # small, but what is read is a decoder's output
])
def test_a_larger_or_encoded_answer_is_checked_off_the_event_loop(runtime, monkeypatch, body, coding):
    on_loop, flow = checked_on(runtime, monkeypatch, body, coding, request=tools_call_flow)
    assert not on_loop
    assert json.loads(flow.response.content) == RESULT


def nested_result(depth: int) -> bytes:
    """A tool result whose JSON nests arrays and objects `depth` levels deep: the message, its result and
    structuredContent, then lists. Written as text: json.dumps itself stops short of some depths."""
    rows = b"[" * (depth - 3) + b"]" * (depth - 3)
    return json.dumps({**RESULT, "result": {**RESULT["result"], "structuredContent": {"rows": "ROWS"}}}
                      ).encode().replace(b'"ROWS"', rows)


@pytest.mark.parametrize("on_loop", [True, False])
@pytest.mark.parametrize("depth", [
    MAX_ANSWER_DEPTH, MAX_ANSWER_DEPTH + 1,
    sys.getrecursionlimit() - 40,  # past the parser's own stack limit on the loop, not in a thread (before)
])
def test_an_answer_nesting_past_the_limit_is_refused_wherever_it_is_checked(runtime, monkeypatch, on_loop, depth):
    # Review finding 4: json.loads stops at the stack left to it, which differs on and off the event loop.
    text = nested_result(depth)
    body = text if on_loop else text + b" " * (READ_ON_LOOP_BYTES + 1 - len(text))
    checked_on_loop, flow = checked_on(runtime, monkeypatch, body, request=tools_call_flow)
    assert checked_on_loop == on_loop
    if depth <= MAX_ANSWER_DEPTH:
        assert flow.response.status_code == 200 and flow.response.content == body
    else:
        assert flow.response.status_code == 502
        assert json.loads(flow.response.content)["type"] == UPSTREAM_ANSWER


@pytest.mark.parametrize("size", [2048, READ_ON_LOOP_BYTES + 2])
def test_a_plain_answer_past_the_cap_gets_a_502_problem_wherever_it_is_checked(
        policy_dir, tmp_path, runtime_settings, monkeypatch, size):
    settings = {**runtime_settings, "max_mcp_answer_bytes": size - 1}
    with started_runtime(policy_dir, tmp_path / "state", **settings) as runtime:
        on_loop, flow = checked_on(runtime, monkeypatch, padded(RESULT, size), request=tools_call_flow)
    assert on_loop == (size <= READ_ON_LOOP_BYTES)
    assert flow.response.status_code == 502
    problem = json.loads(flow.response.content)
    assert problem["type"] == UPSTREAM_ANSWER
    assert f"larger than {size - 1} bytes" in problem["detail"]


def test_a_gzip_bomb_gets_a_502_problem_and_the_call_is_recorded(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = tools_list_flow()
        fire(tctx, enforcer, HttpRequestHook(flow))
        answered(flow, gzip.compress(b" " * (ANSWER_CAP * 64)), "application/json", "gzip")
        fire(tctx, enforcer, HttpResponseHook(flow))
    assert flow.response.status_code == 502
    assert flow.response.headers["Content-Type"] == "application/problem+json"
    problem = json.loads(flow.response.content)
    assert problem["type"] == UPSTREAM_ANSWER
    assert f"larger than {ANSWER_CAP} bytes once its gzip coding is decoded" in problem["detail"]
    assert "max_mcp_answer_bytes" in problem["detail"]
    [row] = recorded(runtime)
    assert (row["decision"], row["upstream_status"]) == ("allow", 200)  # what the server said


def test_an_event_stream_is_passed_through_a_capped_rewriter_and_recorded_when_it_starts(runtime):
    enforcer = Enforcer(runtime)
    with taddons.context(enforcer) as tctx:
        flow = tools_list_flow()
        fire(tctx, enforcer, HttpRequestHook(flow))
        answered(flow, b"", "text/event-stream")
        fire(tctx, enforcer, HttpResponseHeadersHook(flow))
        [row] = recorded(runtime)  # the stream may stay open for the session: recorded now
        assert (row["decision"], row["upstream_status"]) == ("allow", 200)
        stream = flow.response.stream
        event = b"data: " + json.dumps(TOOLS).encode() + b"\r\n\r\n"
        assert stream(event[:-1]) == []  # no empty piece: it would end an HTTP/1.1 body
        [sent] = stream(event[-1:])
        assert json.loads(sent.split(b"data: ", 1)[1]) == FILTERED
        refused = b"".join(stream(b"data: " + b"A" * EVENT_CAP))
        assert b"AAAA" not in refused
        error = json.loads(refused.split(b"data: ", 1)[1])
        assert error["id"] is None and error["error"]["data"]["type"] == UPSTREAM_ANSWER
        assert stream(b"\n\n") == [] and stream(b"") == []
        fire(tctx, enforcer, HttpResponseHook(flow))
    assert len(recorded(runtime)) == 1
