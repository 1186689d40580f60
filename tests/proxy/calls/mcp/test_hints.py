"""An MCP server's tool annotations as `context.hints`: kept from the tool lists that pass through, only
for tools the manifest does not classify, and able to add caution but never to take it away."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from proxy_support import POLICIES, make_call, rpc, tool_call

from proxy.calls.mapping import MappingOptions, map_call
from proxy.calls.mcp.answers import check_answer
from proxy.calls.mcp.hints import ToolHints
from proxy.cedar.context import HINT_DEFAULTS, tool_hints
from proxy.cedar.engine import Engine, Evaluation, stricter
from proxy.cedar.manifest import load_manifest, schema_text
from proxy.cedar.policy import PolicyInfo
from proxy.decision.gate import Gate, Outcome

URL = "http://tools.example/mcp"
MANIFEST = {"hosts": [{"host": "tools.example", "mcp": [{
    "path": "/mcp", "server": "tools", "unknown_tools": "policy",
    "tools": {"delete_everything": {"severity": "critical", "reversible": False}},
}]}]}
POLICIES_ON_HINTS = """
@id("tools-sessions")
permit (principal in Team::"ops", action == Action::"mcp_rpc", resource == McpServer::"tools");

@id("tools")
permit (principal in Team::"ops", action == Action::"call_tool", resource in McpServer::"tools")
when { context.severity != "critical" };

// A malicious server would like this one: it lets a call through on the server's word alone.
@id("read-only-anything")
permit (principal, action == Action::"call_tool", resource in McpServer::"tools")
when { context has hints && context.hints.readOnlyHint };

@id("destructive-needs-a-human")
@reason("The server says this tool may destroy data.")
@escalate("security")
forbid (principal, action == Action::"call_tool", resource in McpServer::"tools")
when { context has hints && context.hints.destructiveHint };
"""


def tools_list(*tools: dict, id: object = 1) -> dict:
    return {"jsonrpc": "2.0", "id": id, "result": {"tools": list(tools)}}


def tool(name: str, **annotations: bool) -> dict:
    listed: dict = {"name": name, "inputSchema": {"type": "object"}}
    if annotations:
        listed["annotations"] = {"title": name, **annotations}
    return listed


def call(message: dict, agent: str = "ops-bot"):
    return make_call("POST", URL, agent=agent, body=json.dumps(message).encode(),
                     headers={"Content-Type": "application/json"})


@pytest.fixture
def gate(tmp_path: Path):
    target = tmp_path / "policies"
    target.mkdir()
    for name in ("schema.cedarschema", "entities.json"):
        shutil.copy(POLICIES / name, target / name)
    (target / "actions.yaml").write_text(yaml.safe_dump(MANIFEST))
    (target / "actions.cedarschema").write_text(schema_text(load_manifest(target)))
    (target / "p.cedar").write_text(POLICIES_ON_HINTS)
    engine = Engine(target)  # validates the policies on context.hints against the generated schema
    yield Gate(engine, None)
    engine.close()


# -- reading the annotations ------------------------------------------------------------------------------

def test_absent_or_malformed_hints_are_mcp_s_cautious_defaults():
    assert tool_hints(None) == {**HINT_DEFAULTS, "listed": False}
    assert tool_hints({}) == {**HINT_DEFAULTS, "listed": True}
    assert tool_hints({"readOnlyHint": True, "destructiveHint": "no", "openWorldHint": 0}) == {
        "readOnlyHint": True, "destructiveHint": True, "idempotentHint": False, "openWorldHint": True,
        "listed": True}
    assert HINT_DEFAULTS == {"readOnlyHint": False, "destructiveHint": True, "idempotentHint": False,
                             "openWorldHint": True}


def test_hints_are_kept_per_server_from_any_tool_list_in_an_answer_or_a_batch():
    hints = ToolHints()
    seen = hints.observe("tools", [
        {"jsonrpc": "2.0", "id": 1, "result": {"content": []}},
        tools_list(tool("wipe", destructiveHint=True), tool("peek", readOnlyHint=True, destructiveHint=False),
                   tool("bare"), {"name": "bad name!"}, "not a tool", id=2),
    ])
    assert seen == 3
    assert hints.of("tools", "wipe")["destructiveHint"] is True
    assert hints.of("tools", "peek") == {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": False,
                                         "openWorldHint": True, "listed": True}
    assert hints.of("tools", "bare") == {**HINT_DEFAULTS, "listed": True}
    assert hints.of("tools", "never_listed") == hints.of("other-server", "peek") == {**HINT_DEFAULTS, "listed": False}
    hints.observe("tools", tools_list(tool("peek", readOnlyHint=False)))  # a later list replaces an earlier one
    assert hints.of("tools", "peek")["readOnlyHint"] is False


def test_memory_is_bounded_per_server_forgetting_the_least_recently_listed():
    hints = ToolHints(max_tools=3)
    hints.observe("tools", tools_list(*(tool(f"t{i}", destructiveHint=False) for i in range(10))))
    assert hints.known() == {"tools": 3}
    assert [hints.of("tools", f"t{i}")["listed"] for i in range(10)] == [False] * 7 + [True] * 3
    hints.observe("tools", tools_list(tool("t0", destructiveHint=False)))
    assert hints.of("tools", "t0")["listed"] and not hints.of("tools", "t7")["listed"]


def test_classified_tools_are_never_kept():
    hints = ToolHints()
    hints.observe("tools", tools_list(tool("delete_everything", readOnlyHint=True)), ["delete_everything"])
    assert hints.known() == {}


def test_the_mapping_gives_hints_only_to_tools_the_manifest_does_not_classify(gate):
    manifest = gate.engine.snapshot.bundle.manifest
    lying = ToolHints()
    lying.observe("tools", tools_list(tool("delete_everything", readOnlyHint=True, destructiveHint=False),
                                      tool("peek", readOnlyHint=True)))
    classified = map_call(call(tool_call("delete_everything", {})), MappingOptions(), manifest, hints=lying.of)
    assert "hints" not in classified.context and classified.context["severity"] == "critical"
    unclassified = map_call(call(tool_call("peek", {})), MappingOptions(), manifest, hints=lying.of)
    assert unclassified.context["hints"]["readOnlyHint"] is True
    never = map_call(call(tool_call("peek", {})), MappingOptions(), manifest)
    assert never.context["hints"] == {**HINT_DEFAULTS, "listed": False}
    other = map_call(call(rpc("tools/list")), MappingOptions(), manifest, hints=lying.of)
    assert "hints" not in other.context  # only a tools/call has a tool


# -- the rule: hints add caution, never remove it ---------------------------------------------------------

def test_a_tool_the_server_marks_destructive_escalates(gate):
    gate.observe_tools(call(rpc("tools/list")), tools_list(tool("wipe", readOnlyHint=False, destructiveHint=True)))
    verdict = gate.decide(call(tool_call("wipe", {})))
    assert verdict.outcome is Outcome.ESCALATE
    assert [p.policy_id for p in verdict.determining] == ["destructive-needs-a-human"]
    assert verdict.escalation is not None and verdict.escalation.roles == {"security"}


def test_a_tool_whose_list_was_never_seen_is_taken_as_destructive(gate):
    # An agent cannot dodge the policy on the hints by calling a tool it never listed.
    assert gate.decide(call(tool_call("wipe", {}))).outcome is Outcome.ESCALATE


def test_a_tool_the_server_marks_harmless_is_decided_as_policy_without_hints_says(gate):
    gate.observe_tools(call(rpc("tools/list")), tools_list(tool("peek", readOnlyHint=True, destructiveHint=False)))
    verdict = gate.decide(call(tool_call("peek", {})))
    assert verdict.outcome is Outcome.ALLOW
    assert [p.policy_id for p in verdict.determining] == ["tools"]  # the permit that holds without the hint


def test_a_server_claiming_read_only_lets_no_call_through_that_policy_alone_would_not(gate):
    # billing-bot has no permit but `read-only-anything`, which rests on the server's word alone.
    gate.observe_tools(call(rpc("tools/list")), tools_list(tool("drop_tables", readOnlyHint=True,
                                                                destructiveHint=False)))
    verdict = gate.decide(call(tool_call("drop_tables", {}), agent="billing-bot"))
    assert verdict.outcome is Outcome.DENY and verdict.problem is not None
    assert verdict.problem.value == "no-permit"


def test_a_server_marking_a_classified_tool_read_only_changes_nothing(gate):
    before = gate.decide(call(tool_call("delete_everything", {})))
    gate.observe_tools(call(rpc("tools/list")), tools_list(tool("delete_everything", readOnlyHint=True,
                                                                destructiveHint=False)))
    after = gate.decide(call(tool_call("delete_everything", {}), agent="billing-bot"))
    assert before.outcome is Outcome.DENY and after.outcome is Outcome.DENY
    assert after.request is not None and "hints" not in after.request.context
    assert gate.hints.known() == {}


def test_hints_are_read_from_an_event_stream_answer_as_from_json(gate):
    listing = call(rpc("tools/list"))
    event = b"event: message\ndata: " + json.dumps(tools_list(tool("wipe", destructiveHint=False,
                                                                   readOnlyHint=False))).encode() + b"\n\n"

    def rewrite(answer):
        gate.observe_tools(listing, answer)
        return None

    check_answer(event, "identity", "text/event-stream", 200, rewrite)
    assert gate.hints.of("tools", "wipe")["listed"] is True
    assert gate.decide(call(tool_call("wipe", {}))).outcome is Outcome.ALLOW


def test_hints_of_a_server_that_refuses_unknown_tools_are_not_kept():
    gate = Gate(Engine(POLICIES), None)  # the bundled github endpoint refuses tools it does not list
    listing = make_call("POST", "http://mcp.github.example/mcp", body=json.dumps(rpc("tools/list")).encode(),
                        headers={"Content-Type": "application/json"})
    gate.observe_tools(listing, tools_list(tool("rotate_deploy_keys", readOnlyHint=True)))
    assert gate.hints.known() == {}


# -- stricter -----------------------------------------------------------------------------------------------

def info(policy_id: str, effect: str) -> PolicyInfo:
    return PolicyInfo(policy_id=policy_id, effect=effect, file="p.cedar", line=1, annotations={})


def evaluation(decision: str, *policies: PolicyInfo, errors: tuple[str, ...] = ()) -> Evaluation:
    return Evaluation(decision, tuple(p.policy_id for p in policies), errors, "rev", policies)


@pytest.mark.parametrize("told, untold, decision, determining, errors", [
    (evaluation("Allow", info("a", "permit")), evaluation("Allow", info("b", "permit")), "Allow", ["b"], []),
    (evaluation("Allow", info("hint", "permit")), evaluation("Deny"), "Deny", [], []),
    (evaluation("Deny", info("f", "forbid")), evaluation("Allow", info("p", "permit")), "Deny", ["f"], []),
    (evaluation("Deny", info("f", "forbid")), evaluation("Deny", info("g", "forbid")), "Deny", ["f", "g"], []),
    (evaluation("Allow", info("p", "permit"), errors=("e1",)), evaluation("Deny", info("g", "forbid")),
     "Deny", ["p", "g"], ["e1"]),
])
def test_stricter_allows_only_what_both_allow(told, untold, decision, determining, errors):
    merged = stricter(told, untold)
    assert (merged.decision, list(merged.determining), list(merged.errors)) == (decision, determining, errors)
    assert [p.policy_id for p in merged.policies] == determining
    assert merged.allowed == (told.allowed and untold.allowed)
