"""MCP over streamable HTTP: what a JSON-RPC message on an MCP endpoint becomes for Cedar, and what the
agent sees when cedargate refuses it or filters what the server answers.

Everything here is real: the bundled policies (or a small policy directory written by the test, with its
schema regenerated from its actions.yaml), real cedarpy, the real mapping. Nothing is mocked.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import cedarpy
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from proxy_support import POLICIES, make_call, rpc, tool_call

from proxy.calls.mapping import Call, MappingError, MappingOptions, UnknownAction, map_call
from proxy.calls.mcp.binding import binding_of
from proxy.calls.mcp.jsonrpc import MAX_BATCH, McpError, parse_messages
from proxy.calls.mcp.refusals import REFUSED_CODE, refusal_answer
from proxy.calls.mcp.sse import SseRewriter
from proxy.calls.mcp.tools import filter_tool_list
from proxy.cedar.engine import CedarRequest, Engine
from proxy.cedar.manifest import ManifestError, load_manifest, schema_text
from proxy.cedar.policy import PolicyLoadError, load_bundle
from proxy.decision.decisions import decide_call
from proxy.decision.gate import Gate, Outcome
from proxy.oversight.overrides import fingerprint
from proxy.vocabulary.problems import Problem
from tests.support.event_stream import sse_events

GITHUB_MCP = "http://mcp.github.example/mcp"
JSON = {"Content-Type": "application/json"}


# -- helpers --------------------------------------------------------------------------------------------

def mcp_call(message=None, *, method: str = "POST", agent: str = "ops-bot", url: str = GITHUB_MCP,
             headers: dict[str, str] | None = None, content_type: str | None = "application/json") -> Call:
    if message is None or isinstance(message, bytes):
        body = message or b""
    else:
        body = json.dumps(message).encode()
    sent = dict(headers or {})
    if message is not None and content_type is not None:
        sent.setdefault("Content-Type", content_type)
    return make_call(method, url, agent=agent, headers=sent, body=body)


def map_mcp(manifest, message=None, **kw):
    return map_call(mcp_call(message, **kw), MappingOptions(), manifest)


def write_policy_dir(target: Path, manifest: dict, cedar: str) -> Path:
    """A policy directory with the bundled base schema and entities, this manifest (and the schema
    `cedargate schema` would write for it) and these policies."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("schema.cedarschema", "entities.json"):
        shutil.copy(POLICIES / name, target / name)
    (target / "actions.yaml").write_text(yaml.safe_dump(manifest), encoding="utf-8")
    (target / "actions.cedarschema").write_text(schema_text(load_manifest(target)), encoding="utf-8")
    (target / "policies.cedar").write_text(cedar, encoding="utf-8")
    return target


def mcp_host(*endpoints: dict, host: str = "mcp.github.example") -> dict:
    return {"hosts": [{"host": host, "mcp": list(endpoints)}]}


def manifest_error(tmp_path: Path, manifest: dict) -> str:
    (tmp_path / "actions.yaml").write_text(yaml.safe_dump(manifest), encoding="utf-8")
    with pytest.raises(ManifestError) as refused:
        load_manifest(tmp_path)
    return str(refused.value)


def feed(chunks, rewrite, extra=()) -> bytes:
    """What the agent receives when the server's stream arrives in these chunks (then ends)."""
    rewriter = SseRewriter(rewrite, extra)
    return b"".join(rewriter.feed(chunk) for chunk in chunks if chunk) + rewriter.feed(b"")


@pytest.fixture(scope="module")
def bundled():
    """The bundled action manifest (read only)."""
    return load_manifest(POLICIES)


@pytest.fixture
def bundled_gate(policy_dir: Path):
    engine = Engine(policy_dir)
    yield Gate(engine, None)
    engine.close()


def gate_for(directory: Path) -> Gate:
    return Gate(Engine(directory), None)


# -- parse_messages -------------------------------------------------------------------------------------

def test_a_message_with_an_id_and_a_method_is_a_request():
    [message], batch = parse_messages({"jsonrpc": "2.0", "id": "a-1", "method": "tools/list"})
    assert (message.kind, message.id, message.method, batch) == ("request", "a-1", "tools/list", False)


def test_a_message_without_an_id_is_a_notification():
    [message], _ = parse_messages({"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert (message.kind, message.method) == ("notification", "notifications/initialized")


@pytest.mark.parametrize("answer", [{"result": {}}, {"error": {"code": -1, "message": "no"}}])
def test_a_result_or_an_error_with_an_id_is_a_response(answer):
    [message], _ = parse_messages({"jsonrpc": "2.0", "id": 3, **answer})
    assert (message.kind, message.id, message.method) == ("response", 3, "")


def test_a_batch_is_split_in_order_and_marked_as_a_batch():
    messages, batch = parse_messages([rpc("tools/list", id=1), rpc("notifications/initialized", id=None),
                                      {"jsonrpc": "2.0", "id": 9, "result": {}}])
    assert batch is True
    assert [(m.kind, m.id) for m in messages] == [("request", 1), ("notification", None), ("response", 9)]


@pytest.mark.parametrize(
    "body, says",
    [
        ("tools/list", "not a JSON-RPC 2.0 message"),
        (42, "not a JSON-RPC 2.0 message"),
        ({"id": 1, "method": "tools/list"}, "not a JSON-RPC 2.0 message"),
        ({"jsonrpc": "1.0", "id": 1, "method": "tools/list"}, "not a JSON-RPC 2.0 message"),
        ({"jsonrpc": 2.0, "id": 1, "method": "tools/list"}, "not a JSON-RPC 2.0 message"),
        ({"jsonrpc": "2.0", "id": True, "method": "tools/list"}, "id that is not a string or an integer"),
        ({"jsonrpc": "2.0", "id": 1.5, "method": "tools/list"}, "id that is not a string or an integer"),
        ({"jsonrpc": "2.0", "id": None, "method": "tools/list"}, "id that is not a string or an integer"),
        ({"jsonrpc": "2.0", "id": [1], "method": "tools/list"}, "id that is not a string or an integer"),
        ({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": ["x"]}, "params must be an object"),
        ({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": "x"}, "params must be an object"),
        ({"jsonrpc": "2.0", "id": 1, "method": ""}, "method that is not a name"),
        ({"jsonrpc": "2.0", "id": 1, "method": 5}, "method that is not a name"),
        ({"jsonrpc": "2.0", "id": 1, "method": "x" * 257}, "method that is not a name"),
        ({"jsonrpc": "2.0", "id": 1, "method": "tools/\nlist"}, "method that is not a name"),
        ({"jsonrpc": "2.0", "id": 1, "result": {}, "error": {"code": 1}},
         "neither a request, a notification"),
        ({"jsonrpc": "2.0", "id": 1}, "neither a request, a notification"),
        ({"jsonrpc": "2.0", "result": {}}, "neither a request, a notification"),
    ],
)
def test_a_body_that_is_not_json_rpc_is_refused_saying_why(body, says):
    with pytest.raises(McpError, match=re.escape(says)) as refused:
        parse_messages(body)
    assert "the body" in str(refused.value)


def test_an_empty_batch_is_refused():
    with pytest.raises(McpError, match="empty JSON-RPC batch"):
        parse_messages([])


def test_a_batch_over_the_limit_is_refused_not_truncated():
    messages, _ = parse_messages([rpc("ping", id=i) for i in range(MAX_BATCH)])
    assert len(messages) == MAX_BATCH
    with pytest.raises(McpError, match=f"batch of {MAX_BATCH + 1} messages.*at most {MAX_BATCH}"):
        parse_messages([rpc("ping", id=i) for i in range(MAX_BATCH + 1)])


def test_a_bad_message_inside_a_batch_is_named_by_its_position():
    with pytest.raises(McpError, match="batch item 1 has an id that is not a string or an integer"):
        parse_messages([rpc("ping", id=1), rpc("ping", id=False)])


# -- mapping: tools/call --------------------------------------------------------------------------------

def test_a_tool_call_is_call_tool_on_the_tool_with_its_typed_arguments_and_classification(bundled):
    request = map_mcp(bundled, tool_call("merge_pull_request", {"repo": "acme/web", "number": 42.0,
                                                                  "note": "ship it", "ratio": 0.5}))
    assert request.principal == ("Agent", "ops-bot")
    assert request.action == ("Action", "call_tool")
    assert request.resource == ("Tool", "github/merge_pull_request")
    context = request.context
    assert (context["server"], context["tool"]) == ("github", "merge_pull_request")
    assert (context["rpc_kind"], context["rpc_method"]) == ("request", "tools/call")
    assert (context["severity"], context["reversible"]) == ("medium", True)
    # number is declared Long: a whole float arrives as the integer; undeclared ones pass as Cedar values.
    assert context["arguments"] == {"repo": "acme/web", "number": 42, "note": "ship it",
                                    "ratio": {"__extn": {"fn": "decimal", "arg": "0.5"}}}
    assert type(context["arguments"]["number"]) is int
    assert (context["host"], context["path"], context["method"]) == ("mcp.github.example", "/mcp", "POST")
    assert "body" not in context


def test_an_irreversible_tool_carries_its_classification(bundled):
    context = map_mcp(bundled, tool_call("delete_repository", {"repo": "acme/old"})).context
    assert (context["severity"], context["reversible"]) == ("critical", False)


def test_a_tool_call_without_arguments_has_empty_arguments(bundled):
    with_null = tool_call("search_issues")
    with_null["params"]["arguments"] = None
    for message in (tool_call("search_issues"), with_null):
        assert map_mcp(bundled, message).context["arguments"] == {}


def test_an_unlisted_tool_is_an_unknown_action_when_the_endpoint_refuses_them(bundled):
    with pytest.raises(UnknownAction) as refused:
        map_mcp(bundled, tool_call("rotate_deploy_keys", {}))
    assert refused.value.status == 403
    assert "'rotate_deploy_keys'" in str(refused.value) and "actions.yaml" in str(refused.value)


@pytest.mark.parametrize(
    "arguments, named",
    [
        ({"repo": "acme/web"}, "number"),
        ({"number": 1}, "repo"),
        ({"repo": "acme/web", "number": None}, "number"),
        ({"repo": "acme/web", "number": "42"}, "number"),
        ({"repo": "acme/web", "number": 4.5}, "number"),
        ({"repo": "acme/web", "number": True}, "number"),
        ({"repo": "acme/web", "number": 2**63}, "number"),
        ({"repo": 17, "number": 1}, "repo"),
        ({"repo": ["acme/web"], "number": 1}, "repo"),
    ],
)
def test_a_declared_argument_missing_or_mistyped_is_refused_naming_it(bundled, arguments, named):
    with pytest.raises(MappingError) as refused:
        map_mcp(bundled, tool_call("merge_pull_request", arguments))
    assert refused.value.status == 400
    assert f"'{named}'" in str(refused.value) and "merge_pull_request" in str(refused.value)


@pytest.mark.parametrize("arguments", [["acme/web"], "acme/web", 5])
def test_arguments_that_are_not_an_object_are_refused(bundled, arguments):
    with pytest.raises(MappingError, match="arguments must be an object") as refused:
        map_mcp(bundled, tool_call("search_issues", arguments))
    assert refused.value.status == 400


@pytest.mark.parametrize(
    "name", ["github/search_issues", "../search_issues", "search issues", "search_issues;x", "", "x" * 129,
             "recherche_problèmes", 5, None, ["search_issues"]],
)
def test_a_tool_name_outside_the_allowed_characters_is_refused_as_malformed(bundled, name):
    message = tool_call("placeholder", {})
    message["params"]["name"] = name
    with pytest.raises(MappingError) as refused:
        map_mcp(bundled, message)
    assert not isinstance(refused.value, UnknownAction)
    assert refused.value.status == 400 and "letters, digits" in str(refused.value)


@pytest.mark.parametrize(
    "arguments",
    [{"__entity": {"type": "Agent", "id": "root"}},
     {"repo": {"__entity": {"type": "Agent", "id": "root"}}},
     {"query": [{"__extn": {"fn": "ip", "arg": "10.0.0.1"}}]},
     {"repo": "acme/web", "__expr": "true"}],
)
def test_arguments_with_cedar_escape_keys_are_refused(bundled, arguments):
    with pytest.raises(MappingError, match="reserved by Cedar") as refused:
        map_mcp(bundled, tool_call("search_issues", arguments))
    assert refused.value.status == 400


OPEN_SERVER = {"path": "/mcp", "server": "tools", "unknown_tools": "policy",
               "tools": {"refund": {"severity": "high", "reversible": False,
                                    "arguments": {"order_id": {}, "amount": {"type": "Decimal"},
                                                  "attempt": {"type": "Long", "required": False}}}}}


@pytest.fixture(scope="module")
def open_manifest(tmp_path_factory):
    """A server whose unlisted tools are left to policy, with a tool that has a Decimal argument."""
    directory = tmp_path_factory.mktemp("open")
    (directory / "actions.yaml").write_text(yaml.safe_dump(mcp_host(OPEN_SERVER, host="tools.example")))
    return load_manifest(directory)


def test_an_unlisted_tool_left_to_policy_is_unclassified_and_irreversible(open_manifest):
    request = map_mcp(open_manifest, tool_call("new_tool", {"x": 1}), url="http://tools.example/mcp")
    assert request.action == ("Action", "call_tool") and request.resource == ("Tool", "tools/new_tool")
    assert (request.context["severity"], request.context["reversible"]) == ("unclassified", False)
    assert request.context["arguments"] == {"x": 1}


def test_a_tool_name_with_a_trailing_newline_is_refused(open_manifest):
    with pytest.raises(MappingError) as refused:
        map_mcp(open_manifest, tool_call("refund\n", {"order_id": "o-1", "amount": 9999}),
                url="http://tools.example/mcp")
    assert refused.value.status == 400


@pytest.mark.parametrize(
    "amount, cedar",
    [(12.5, "12.5"), (12, "12.0"), (0.0001, "0.0001"), (-3.25, "-3.25")],
)
def test_a_declared_decimal_argument_is_a_cedar_decimal(open_manifest, amount, cedar):
    request = map_mcp(open_manifest, tool_call("refund", {"order_id": "o-1", "amount": amount, "attempt": 2}),
                      url="http://tools.example/mcp")
    assert request.context["arguments"]["amount"] == {"__extn": {"fn": "decimal", "arg": cedar}}
    assert request.context["arguments"]["attempt"] == 2
    assert (request.context["severity"], request.context["reversible"]) == ("high", False)


@pytest.mark.parametrize("amount", ["12.5", 0.12345, True, {"value": 1}])
def test_a_declared_decimal_argument_that_is_not_one_is_refused(open_manifest, amount):
    with pytest.raises(MappingError, match="'amount' must be a Decimal") as refused:
        map_mcp(open_manifest, tool_call("refund", {"order_id": "o-1", "amount": amount}),
                url="http://tools.example/mcp")
    assert refused.value.status == 400


def test_an_optional_declared_argument_may_be_left_out(open_manifest):
    request = map_mcp(open_manifest, tool_call("refund", {"order_id": "o-1", "amount": 1, "attempt": None}),
                      url="http://tools.example/mcp")
    assert "attempt" not in request.context["arguments"]


# Servers that match JSON keys ignoring case (Go's encoding/json, so Go MCP SDKs) bind "Attempt" to a
# declared `attempt` and "Arguments" to `arguments`: a key spelled so would reach the tool undecided.

@pytest.mark.parametrize("key", ["Attempt", "ATTEMPT", "attempT"])
def test_a_declared_argument_in_another_spelling_is_refused(open_manifest, key):
    with pytest.raises(MappingError) as refused:
        map_mcp(open_manifest, tool_call("refund", {"order_id": "o-1", "amount": 1, key: "not a Long"}),
                url="http://tools.example/mcp")
    assert not isinstance(refused.value, UnknownAction)
    assert refused.value.status == 400
    assert f"{key!r}" in str(refused.value) and "spell it 'attempt'" in str(refused.value)


@pytest.mark.parametrize("key", ["Amount", "ORDER_ID"])
def test_a_name_declared_for_another_tool_in_another_spelling_is_refused_for_any_tool(open_manifest, key):
    # A policy reads context.arguments.amount for every tool (one ToolArguments), the server binds it.
    with pytest.raises(MappingError, match=f"spell it '{key.lower()}'"):
        map_mcp(open_manifest, tool_call("new_tool", {key: 1}), url="http://tools.example/mcp")


def test_only_declared_names_are_held_to_their_spelling(bundled, open_manifest):
    request = map_mcp(bundled, tool_call("search_issues", {"Query": "x", "LABEL": "bug"}))
    assert request.context["arguments"] == {"Query": "x", "LABEL": "bug"}
    request = map_mcp(open_manifest, tool_call("new_tool", {"amount": 2, "Order": "o-1"}),
                      url="http://tools.example/mcp")
    assert request.context["arguments"] == {"amount": {"__extn": {"fn": "decimal", "arg": "2.0"}}, "Order": "o-1"}


@pytest.mark.parametrize("key, declared", [("\u017ftatus", "status"), ("STATU\u017f", "status"),
                                           ("\u212aind", "kind"), ("\u212aIND", "kind")])
def test_a_declared_argument_spelled_with_a_character_go_folds_to_it_is_refused(tmp_path, key, declared):
    # Go folds U+017F (long s) to s and U+212A (Kelvin sign) to k, as ambiguity.fold_key does.
    server = {"path": "/mcp", "server": "tools", "unknown_tools": "policy",
              "tools": {"label": {"arguments": {"status": {"required": False}, "kind": {"required": False}}}}}
    (tmp_path / "actions.yaml").write_text(yaml.safe_dump(mcp_host(server, host="tools.example")))
    manifest = load_manifest(tmp_path)
    with pytest.raises(MappingError, match=f"spell it '{declared}'") as refused:
        map_mcp(manifest, tool_call("label", {key: "x"}), url="http://tools.example/mcp")
    assert refused.value.status == 400


def test_two_argument_names_one_ignoring_case_do_not_load(tmp_path):
    server = {"path": "/mcp", "server": "tools",
              "tools": {"refund": {"arguments": {"amount": {"type": "Decimal"}}},
                        "tip": {"arguments": {"Amount": {"type": "Decimal"}}}}}
    says = manifest_error(tmp_path, mcp_host(server, host="tools.example"))
    assert "'Amount'" in says and "'amount'" in says and "ignoring case" in says


@pytest.mark.parametrize("key", ["Arguments", "ARGUMENTS", "argument\u017f"])
def test_arguments_in_another_spelling_is_refused(bundled, key):
    with pytest.raises(MappingError, match="spell it 'arguments'") as refused:
        map_mcp(bundled, tool_call("search_issues", **{key: {"repo": "prod/secret"}}))
    assert refused.value.status == 400


@pytest.mark.parametrize("key, exact", [("_Meta", "_meta"), ("_META", "_meta"), ("Name", "name")])
def test_meta_or_name_in_another_spelling_is_refused(bundled, key, exact):
    message = tool_call("search_issues", {"query": "x"})
    if exact == "name":
        del message["params"]["name"]
    message["params"][key] = {"progressToken": 1} if exact == "_meta" else "search_issues"
    with pytest.raises(MappingError, match=f"spell it '{exact}'"):
        map_mcp(bundled, message)


@pytest.mark.parametrize("message, exact", [
    (rpc("resources/read", URI="file:///etc/shadow"), "uri"),
    (rpc("prompts/get", NAME="secrets"), "name"),
    ({"jsonrpc": "2.0", "id": 1, "method": "resources/read", "Params": {"uri": "file:///etc/shadow"}}, "params"),
    ({"jsonrpc": "2.0", "ID": 1, "method": "tools/list"}, "id"),
    ({"jsonrpc": "2.0", "id": 1, "method": "ping", "Result": {}}, "result"),
])
def test_a_key_the_mapping_reads_in_another_spelling_is_refused_in_any_message(bundled, message, exact):
    with pytest.raises(MappingError, match=f"spell it '{exact}'") as refused:
        map_mcp(bundled, message)
    assert refused.value.status == 400


# -- mapping: every other message -----------------------------------------------------------------------

@pytest.mark.parametrize(
    "message, kind, method",
    [
        (rpc("initialize", protocolVersion="2025-11-25", capabilities={}), "request", "initialize"),
        (rpc("tools/list"), "request", "tools/list"),
        (rpc("notifications/initialized", id=None), "notification", "notifications/initialized"),
        (rpc("notifications/cancelled", id=None, requestId=3), "notification", "notifications/cancelled"),
        ({"jsonrpc": "2.0", "id": "srv-1", "result": {"roots": []}}, "response", ""),
    ],
)
def test_other_messages_are_mcp_rpc_on_the_server(bundled, message, kind, method):
    request = map_mcp(bundled, message)
    assert request.action == ("Action", "mcp_rpc") and request.resource == ("McpServer", "github")
    assert (request.context["server"], request.context["rpc_kind"], request.context["rpc_method"]) == (
        "github", kind, method)
    assert not {"tool", "arguments", "severity", "reversible", "uri", "prompt"} & set(request.context)


def test_resources_read_shows_its_uri_and_prompts_get_its_prompt(bundled):
    read = map_mcp(bundled, rpc("resources/read", uri="repo://acme/web/README.md")).context
    assert read["uri"] == "repo://acme/web/README.md" and read["rpc_method"] == "resources/read"
    prompt = map_mcp(bundled, rpc("prompts/get", name="triage")).context
    assert prompt["prompt"] == "triage" and "uri" not in prompt


@pytest.mark.parametrize("method, kind", [("GET", "stream"), ("DELETE", "end-session")])
def test_the_stream_get_and_the_session_delete_are_mcp_rpc(bundled, method, kind):
    request = map_mcp(bundled, None, method=method, headers={"Mcp-Session-Id": "s-1"})
    assert request.action == ("Action", "mcp_rpc") and request.resource == ("McpServer", "github")
    assert (request.context["rpc_kind"], request.context["rpc_method"]) == (kind, "")


@pytest.mark.parametrize("method", ["PUT", "PATCH", "OPTIONS"])
def test_other_http_methods_on_the_endpoint_are_refused_with_405(bundled, method):
    with pytest.raises(MappingError, match=f"POST, GET and DELETE, not {method}") as refused:
        map_mcp(bundled, None, method=method)
    assert refused.value.status == 405


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_post_without_a_json_content_type_is_refused(bundled, content_type):
    with pytest.raises(MappingError, match="must carry JSON-RPC as application/json") as refused:
        map_mcp(bundled, tool_call("search_issues", {}), content_type=content_type)
    assert refused.value.status == 400


def test_an_empty_post_is_refused(bundled):
    with pytest.raises(MappingError, match="must carry JSON-RPC"):
        map_mcp(bundled, b"")


def test_a_post_that_is_not_json_rpc_is_refused_with_the_reason(bundled):
    with pytest.raises(MappingError, match="params must be an object") as refused:
        map_mcp(bundled, {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": []})
    assert refused.value.status == 400


def test_a_batch_is_not_mapped_as_one_call(bundled):
    with pytest.raises(MappingError, match="batch is decided message by message"):
        map_mcp(bundled, [tool_call("search_issues", {}), rpc("tools/list", id=2)])


def test_other_paths_on_the_mcp_host_are_unknown_actions(bundled):
    with pytest.raises(UnknownAction):
        map_mcp(bundled, tool_call("search_issues", {}), url="http://mcp.github.example/v1/repos")


def test_a_get_or_delete_with_a_body_is_refused(bundled):
    for method in ("GET", "DELETE"):
        with pytest.raises(MappingError, match="carries no body"):
            map_mcp(bundled, tool_call("transfer_repository", {"repo": "a/b"}), method=method)


@pytest.mark.parametrize("path", ["/mcp/", "/MCP", "/Mcp/", "/mcp;jsessionid=1"])
def test_paths_a_server_may_take_for_the_endpoint_are_refused(tmp_path, path):
    # Even on a host whose other calls fall back to HTTP actions: express serves /MCP and /mcp/ as /mcp.
    manifest = {"hosts": [{"host": "mcp.github.example", "unknown": "http",
                           "mcp": [{"path": "/mcp", "server": "github", "tools": {"search_issues": {}}}]}]}
    loaded = load_manifest(write_policy_dir(tmp_path / "p", manifest, ""))
    with pytest.raises(MappingError) as refused:
        map_mcp(loaded, tool_call("search_issues", {}), url=f"http://mcp.github.example{path}")
    assert refused.value.status == 404 and "send MCP calls to /mcp" in str(refused.value)


@pytest.mark.parametrize("charset", ["utf-7", "UTF-16", "iso-8859-1", '"utf-7"'])
def test_a_json_body_in_another_charset_is_refused(bundled, charset):
    # A server decoding charset=utf-7 would read "tools/+AGM-all" as tools/call.
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/+AGM-all","params":{"name":"transfer_repository"}}'
    with pytest.raises(MappingError) as refused:
        map_mcp(bundled, body, content_type=f"application/json; charset={charset}")
    assert refused.value.status == 415 and "must be UTF-8" in str(refused.value)


@pytest.mark.parametrize("content_type", [
    'application/json; x="a;charset=utf-8"; charset=utf-7',  # a quoted ";" fools naive parsers
    "application/json; charset=utf-8; charset=utf-7",
    'application/json; x="charset=utf-7"',
    "application/json; profile=x",
])
def test_a_json_content_type_is_taken_only_in_its_plain_spellings(bundled, content_type):
    with pytest.raises(MappingError) as refused:
        map_mcp(bundled, rpc("ping"), content_type=content_type)
    assert refused.value.status == 415


@pytest.mark.parametrize("content_type", ["application/json", "application/json;charset=UTF-8",
                                          'application/json; charset="utf-8"', "application/json ; charset = utf8"])
def test_the_plain_spellings_of_a_json_content_type_are_taken(bundled, content_type):
    assert map_mcp(bundled, rpc("ping"), content_type=content_type).action[1] == "mcp_rpc"


@pytest.mark.parametrize("encoding", ["base64", "gzip", "quopri", "x-foo"])
def test_a_body_with_a_content_encoding_is_refused(bundled, encoding):
    # mitmproxy would decode even base64 for the policy while the server reads the raw bytes.
    with pytest.raises(MappingError) as refused:
        map_mcp(bundled, rpc("ping"), headers={"Content-Encoding": encoding})
    assert refused.value.status == 415 and "Content-Encoding" in str(refused.value)
    assert map_mcp(bundled, rpc("ping"), headers={"Content-Encoding": "identity"}).action[1] == "mcp_rpc"


def test_a_utf8_charset_and_utf16_bytes_are_told_apart(bundled):
    assert map_mcp(bundled, rpc("ping"), content_type="application/json; charset=UTF-8").action[1] == "mcp_rpc"
    utf16 = json.dumps(tool_call("transfer_repository", {"repo": "a/b"})).encode("utf-16")
    with pytest.raises(MappingError, match="UTF-8"):
        map_mcp(bundled, utf16)


@pytest.mark.parametrize("headers", [{"Upgrade": "websocket", "Connection": "Upgrade"},
                                     {"Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}])
def test_a_protocol_upgrade_is_refused(bundled, headers):
    # mitmproxy switches to WebSocket on a 101 when the request carried Sec-WebSocket-Version alone.
    with pytest.raises(MappingError, match="upgrades"):
        map_mcp(bundled, None, method="GET", headers=headers)


def test_a_request_that_is_also_a_response_is_refused():
    with pytest.raises(McpError, match="both a request and a response"):
        parse_messages({"jsonrpc": "2.0", "id": 1, "method": "ping", "error": {"code": 1, "message": "x"}})


def test_an_argument_declared_for_one_tool_is_typed_for_every_tool(tmp_path):
    manifest = {"hosts": [{"host": "mcp.github.example", "mcp": [{
        "path": "/mcp", "server": "github", "unknown_tools": "policy",
        "tools": {"refund": {"arguments": {"amount": {"type": "Decimal"}}}, "tip": {}}}]}]}
    loaded = load_manifest(write_policy_dir(tmp_path / "p", manifest, ""))
    tip = map_mcp(loaded, tool_call("tip", {"amount": 5}))
    assert tip.context["arguments"]["amount"] == {"__extn": {"fn": "decimal", "arg": "5.0"}}
    unlisted = map_mcp(loaded, tool_call("other", {"amount": 2.5}))
    assert unlisted.context["arguments"]["amount"] == {"__extn": {"fn": "decimal", "arg": "2.5"}}
    with pytest.raises(MappingError, match="'amount' must be a Decimal"):
        map_mcp(loaded, tool_call("tip", {"amount": "lots"}))
    assert "amount" not in map_mcp(loaded, tool_call("tip", {})).context["arguments"]  # not required there


def test_manifest_hosts_are_matched_as_the_proxy_spells_hosts(tmp_path):
    manifest = {"hosts": [{"host": "MCP.GitHub.Example.",
                           "mcp": [{"path": "/mcp", "server": "github", "tools": {"search_issues": {}}}]}]}
    loaded = load_manifest(write_policy_dir(tmp_path / "p", manifest, ""))
    assert map_mcp(loaded, tool_call("search_issues", {})).action == ("Action", "call_tool")


def test_a_listed_tool_must_be_in_its_server(policy_dir):
    import proxy.cedar.policy as policy

    entities = json.loads((policy_dir / "entities.json").read_text())
    entities.append({"uid": {"type": "Tool", "id": "github/search_issues"}, "attrs": {}, "parents": []})
    (policy_dir / "entities.json").write_text(json.dumps(entities))
    with pytest.raises(policy.PolicyLoadError, match='list McpServer::"github" among its parents'):
        policy.load_bundle(policy_dir)
    entities[-1]["parents"] = [{"type": "McpServer", "id": "github"}]
    (policy_dir / "entities.json").write_text(json.dumps(entities))
    assert ("Tool", "github/search_issues") in policy.load_bundle(policy_dir).entity_uids


def test_a_tool_call_sent_as_a_notification_is_not_waved_through(bundled_gate):
    message = tool_call("transfer_repository", {"repo": "acme/web"})
    del message["id"]
    verdict = bundled_gate.decide(mcp_call(message))
    assert verdict.outcome is not Outcome.ALLOW


# -- routing headers ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "message, headers",
    [
        (tool_call("search_issues", {}), {"Mcp-Method": "tools/call", "Mcp-Name": "search_issues"}),
        (tool_call("search_issues", {}), {"mcp-method": "tools/call"}),
        (rpc("resources/read", uri="repo://a/b"), {"MCP-METHOD": "resources/read", "Mcp-Name": "repo://a/b"}),
        (rpc("tools/list"), {"Mcp-Method": "tools/list"}),
    ],
)
def test_routing_headers_that_agree_with_the_body_are_accepted(bundled, message, headers):
    request = map_mcp(bundled, message, headers=headers)
    assert request.context["rpc_method"] == message["method"]


@pytest.mark.parametrize(
    "message, headers, says",
    [
        (tool_call("delete_repository", {"repo": "a/b"}), {"Mcp-Method": "tools/list"},
         "Mcp-Method header says 'tools/list' but the message is 'tools/call'"),
        (tool_call("delete_repository", {"repo": "a/b"}), {"Mcp-Name": "search_issues"},
         "Mcp-Name header says 'search_issues' but the message names 'delete_repository'"),
        (rpc("tools/list"), {"Mcp-Name": "search_issues"}, "Mcp-Name header says 'search_issues'"),
        (rpc("resources/read", uri="repo://a/b"), {"mcp-name": "repo://a/c"},
         "Mcp-Name header says 'repo://a/c'"),
    ],
)
def test_routing_headers_that_disagree_with_the_body_are_refused(bundled, message, headers, says):
    with pytest.raises(MappingError, match=re.escape(says)) as refused:
        map_mcp(bundled, message, headers=headers)
    assert refused.value.status == 400


# -- the manifest ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("action", ["call_tool", "mcp_rpc", "mcp"])
def test_a_route_may_not_take_an_mcp_action_name(tmp_path, action):
    message = manifest_error(tmp_path, {"hosts": [{"host": "api.example", "routes": [
        {"route": "GET /v1/ok", "action": "read_ok"}, {"route": "POST /v1/tools", "action": action}]}]})
    assert "actions.yaml" in message and "hosts[0].routes[1] (POST /v1/tools)" in message
    assert f"'{action}'" in message


def test_two_endpoints_with_one_path_on_one_host_are_refused(tmp_path):
    message = manifest_error(tmp_path, mcp_host({"path": "/mcp", "server": "a"},
                                                {"path": "/mcp", "server": "b"}))
    assert "actions.yaml" in message and "hosts[0].mcp[" in message and "'/mcp'" in message


def test_one_path_on_two_hosts_is_fine(tmp_path):
    manifest = {"hosts": [{"host": "a.example", "mcp": [{"path": "/mcp", "server": "a"}]},
                          {"host": "b.example", "mcp": [{"path": "/mcp", "server": "b"}]}]}
    (tmp_path / "actions.yaml").write_text(yaml.safe_dump(manifest))
    loaded = load_manifest(tmp_path)
    assert loaded.mcp_endpoint("b.example", "/mcp").server == "b"


def test_one_argument_name_with_two_types_is_refused_naming_both_tools(tmp_path):
    message = manifest_error(tmp_path, mcp_host({"path": "/mcp", "server": "pay", "tools": {
        "refund": {"arguments": {"amount": {"type": "Decimal"}}},
        "charge": {"arguments": {"amount": {"type": "Long"}}}}}))
    assert "actions.yaml" in message and "'amount'" in message
    assert "'pay/refund'" in message and "'pay/charge'" in message
    assert "Decimal" in message and "Long" in message


@pytest.mark.parametrize(
    "endpoint, where, bad",
    [
        ({"path": "/mcp", "server": "git hub"}, "hosts[0].mcp[0].server", "'git hub'"),
        ({"path": "/mcp", "server": "github/enterprise"}, "hosts[0].mcp[0].server", "'github/enterprise'"),
        ({"path": "/mcp", "server": ""}, "hosts[0].mcp[0].server", "''"),
        ({"path": "/mcp", "server": "github", "tools": {"repos/delete": {}}}, "hosts[0].mcp[0].tools",
         "'repos/delete'"),
        ({"path": "/mcp", "server": "github", "tools": {"delete repo": {}}}, "hosts[0].mcp[0].tools",
         "'delete repo'"),
        ({"path": "mcp", "server": "github"}, "hosts[0].mcp[0].path", "'mcp'"),
        ({"path": "/mcp/{session}", "server": "github"}, "hosts[0].mcp[0].path", "'/mcp/{session}'"),
        ({"path": "/mcp?v=1", "server": "github"}, "hosts[0].mcp[0].path", "'/mcp?v=1'"),
        ({"path": "/mcp", "server": "github", "unknown_tools": "allow"}, "hosts[0].mcp[0].unknown_tools",
         "'refuse' or 'policy'"),
        ({"path": "/mcp", "server": "github", "tools": {"t": {"arguments": {"bad-name": {}}}}},
         "hosts[0].mcp[0].tools.t.arguments", "'bad-name'"),
        ({"path": "/mcp", "server": "github", "tools": {"t": {"severity": "extreme"}}},
         "hosts[0].mcp[0].tools.t.severity", "'low', 'medium', 'high' or 'critical'"),
    ],
)
def test_a_bad_endpoint_entry_is_refused_naming_file_entry_and_field(tmp_path, endpoint, where, bad):
    message = manifest_error(tmp_path, mcp_host(endpoint))
    assert "actions.yaml" in message and where in message and bad in message, message


def test_the_bundled_policies_validate_against_the_generated_schema(policy_dir):
    bundle = load_bundle(policy_dir)
    assert (policy_dir / "actions.cedarschema").read_text() == schema_text(bundle.manifest)
    assert {"github-tools", "no-repository-deletion", "no-merges-to-payments"} <= set(bundle.policies)
    assert [e.server for e in bundle.manifest.mcp_endpoints] == ["github"]


@pytest.mark.parametrize(
    "condition, loads",
    [
        ('context.arguments has repo && context.arguments.repo == "acme/web"', True),
        ('context.arguments.repo == "acme/web"', False),  # declared optional: needs `has`
        ('context.arguments has number && context.arguments.number == "42"', False),  # a Long, not a String
        ('context.arguments.title == "x"', False),  # not declared: only `has` may look for it
        ('context.arguments has title && context.arguments.title == "x"', True),
        ('context.tool == "merge_pull_request" && context.severity == "medium" && !context.reversible', True),
    ],
)
def test_policies_on_tool_arguments_are_validated_against_the_declared_types(policy_dir, condition, loads):
    (policy_dir / "extra.cedar").write_text(
        '@id("arguments-check")\n'
        'forbid (principal, action == Action::"call_tool", resource in McpServer::"github")\n'
        f"when {{ {condition} }};\n"
    )
    if loads:
        assert "arguments-check" in load_bundle(policy_dir).policies
    else:
        with pytest.raises(PolicyLoadError, match='extra.cedar:1: @id\\("arguments-check"\\)'):
            load_bundle(policy_dir)


def test_a_policy_on_an_undeclared_argument_guarded_by_has_applies(policy_dir):
    (policy_dir / "extra.cedar").write_text(
        '@id("no-force")\n'
        'forbid (principal, action == Action::"call_tool", resource == Tool::"github/search_issues")\n'
        'when { context.arguments has force && context.arguments.force == true };\n'
    )
    gate = gate_for(policy_dir)
    try:
        forced = gate.decide(mcp_call(tool_call("search_issues", {"query": "x", "force": True})))
        plain = gate.decide(mcp_call(tool_call("search_issues", {"query": "x"})))
    finally:
        gate.engine.close()
    assert forced.outcome is Outcome.DENY and [p.policy_id for p in forced.determining] == ["no-force"]
    assert plain.outcome is Outcome.ALLOW


NO_FORCE = """
@id("no-force")
forbid (principal, action == Action::"call_tool", resource == Tool::"github/search_issues")
when { context.arguments has force && context.arguments.force == true };
"""


@pytest.mark.parametrize("key", ["Force", "FORCE", "forcE"])
def test_an_undeclared_argument_a_policy_reads_in_another_spelling_is_refused(policy_dir, key):
    # A Go server binds "Force" to its `force`, which the guarded forbid would not have seen.
    (policy_dir / "extra.cedar").write_text(NO_FORCE)
    gate = gate_for(policy_dir)
    try:
        other = gate.decide(mcp_call(tool_call("search_issues", {"query": "x", key: True})))
        forced = gate.decide(mcp_call(tool_call("search_issues", {"query": "x", "force": True})))
        unrelated = gate.decide(mcp_call(tool_call("search_issues", {"query": "x", "Limit": 5})))
    finally:
        gate.engine.close()
    assert other.problem is Problem.MAPPING_ERROR and other.status == 400
    assert f"{key!r}" in other.detail and "spell it 'force'" in other.detail
    assert forced.outcome is Outcome.DENY and [p.policy_id for p in forced.determining] == ["no-force"]
    assert unrelated.outcome is Outcome.ALLOW


def test_names_policies_read_are_held_to_their_spelling_in_the_bundles_manifest(policy_dir):
    (policy_dir / "extra.cedar").write_text(NO_FORCE + """
@id("no-street")
forbid (principal, action == Action::"call_tool", resource == Tool::"github/search_issues")
when { context.arguments has "Stra\u00dfe" && context.arguments["Stra\u00dfe"] == "x" };
""")
    manifest = load_bundle(policy_dir).manifest
    assert manifest is not None
    with pytest.raises(MappingError, match="spell it 'force'"):
        map_mcp(manifest, tool_call("search_issues", {"FORCE": True}))
    # fold_key folds ß to ss, more than Go does: refusing more than a server binds is safe.
    with pytest.raises(MappingError, match="spell it 'Stra\u00dfe'"):
        map_mcp(manifest, tool_call("search_issues", {"STRASSE": "x"}))
    assert map_mcp(manifest, tool_call("search_issues", {"force": 1, "Other": 2})).context["arguments"] == {
        "force": 1, "Other": 2}


def test_two_names_policies_read_one_ignoring_case_refuse_every_spelling_of_it(policy_dir):
    # No spelling is the server's for sure: the call is refused, the policies still load.
    (policy_dir / "extra.cedar").write_text(NO_FORCE + """
@id("no-force-either")
forbid (principal, action == Action::"call_tool", resource == Tool::"github/search_issues")
when { context.arguments has Force && context.arguments.Force == true };
""")
    manifest = load_bundle(policy_dir).manifest
    assert manifest is not None
    for key in ("force", "Force", "FORCE"):
        with pytest.raises(MappingError, match="make the policies read it one way") as refused:
            map_mcp(manifest, tool_call("search_issues", {key: True}))
        assert refused.value.status == 400


def go_bind(fields: dict, value: dict) -> dict:
    """What Go's encoding/json binds the JSON object `value` to in a struct whose fields' JSON names are
    `fields` (name -> its nested struct's fields, or None for a scalar): each key, in order, sets the field
    named exactly so, or else one whose name equals it ignoring case; a later key for a field overwrites an
    earlier one, and a key for a nested struct decodes into the struct already there."""
    bound: dict = {}
    for key, item in value.items():
        name = key if key in fields else next((f for f in fields if f.lower() == key.lower()), None)
        if name is None:
            continue
        if fields[name] is not None and isinstance(item, dict):
            bound[name] = go_bind(fields[name], {**bound.get(name, {}), **item})
        else:
            bound[name] = item
    return bound


NESTED_FORCE = """
@id("no-nested-force")
forbid (principal, action == Action::"call_tool", resource == Tool::"github/search_issues")
when { CONDITION };
"""
GO_SEARCH = {"query": None, "opts": {"force": None, "depth": None, "deep": {"force": None}}}


@pytest.mark.parametrize("condition, path", [
    ("context.arguments has opts.force && context.arguments.opts.force == true", ("opts",)),
    ("context.arguments has opts && context.arguments.opts has force && context.arguments.opts.force == true",
     ("opts",)),
    ("context.arguments has opts.deep.force && context.arguments.opts.deep.force == true",
     ("opts", "deep")),
])
@pytest.mark.parametrize("sent", [
    {"force": True}, {"Force": True}, {"FORCE": True}, {"force": False, "Force": True}, {"Depth": 2},
    {"force": True, "Depth": 2}, {"force": "yes"},
])
def test_a_key_policies_read_inside_an_argument_is_decided_as_a_go_server_binds_it_or_refused(
        policy_dir, condition, path, sent):
    (policy_dir / "extra.cedar").write_text(NESTED_FORCE.replace("CONDITION", condition))
    arguments: dict = {"query": "x"}
    record = arguments
    for key in path:
        record = record.setdefault(key, {})
    record.update(sent)
    gate = gate_for(policy_dir)
    try:
        verdict = gate.decide(mcp_call(tool_call("search_issues", arguments)))
    finally:
        gate.engine.close()
    server_force = go_bind(GO_SEARCH, arguments)
    for key in path:
        server_force = server_force[key]
    misspelt = [key for key in sent if key != "force" and key.lower() == "force"]
    if misspelt:
        # A Go server would bind that key to the force the forbid reads, unseen by the policy.
        assert verdict.problem is Problem.MAPPING_ERROR and verdict.status == 400
        assert repr(misspelt[0]) in verdict.detail
        if "force" not in sent:  # (with both spellings, the body's keys are refused as ambiguous first)
            assert "spell it 'force'" in verdict.detail and f"argument {'.'.join(path)!r}" in verdict.detail
    else:  # what the policy judged is what the server runs with
        assert verdict.outcome is (Outcome.DENY if server_force.get("force") is True else Outcome.ALLOW)


def test_keys_policies_read_inside_an_argument_in_two_spellings_refuse_every_spelling(policy_dir):
    (policy_dir / "extra.cedar").write_text(NESTED_FORCE.replace(
        "CONDITION", "context.arguments has opts.force && context.arguments has opts.Force"))
    manifest = load_bundle(policy_dir).manifest
    assert manifest is not None
    for key in ("force", "Force", "FORCE"):
        with pytest.raises(MappingError, match="make the policies read it one way"):
            map_mcp(manifest, tool_call("search_issues", {"opts": {key: True}}))
    # Elsewhere, and where the record is not one, nothing is checked.
    for arguments in ({"opts": "Force"}, {"other": {"Force": True}}, {"opts": {"Depth": 1}}):
        assert map_mcp(manifest, tool_call("search_issues", arguments)).context["arguments"] == arguments
    with pytest.raises(MappingError, match="spell it 'opts'"):
        map_mcp(manifest, tool_call("search_issues", {"Opts": {"force": True}}))


def test_a_name_policies_read_in_another_spelling_of_a_declared_one_keeps_the_declared_spelling(policy_dir):
    (policy_dir / "extra.cedar").write_text("""
@id("odd-repo")
forbid (principal, action == Action::"call_tool", resource == Tool::"github/search_issues")
when { context.arguments has Repo && context.arguments.Repo == "x" };
""")
    manifest = load_bundle(policy_dir).manifest
    assert manifest is not None
    assert map_mcp(manifest, tool_call("search_issues", {"repo": "acme/web"})).context["arguments"] == {
        "repo": "acme/web"}
    with pytest.raises(MappingError, match="spell it 'repo'"):
        map_mcp(manifest, tool_call("search_issues", {"Repo": "acme/web"}))


def test_a_schema_not_regenerated_after_adding_a_tool_argument_refuses_to_load(policy_dir):
    manifest = yaml.safe_load((policy_dir / "actions.yaml").read_text())
    manifest["hosts"][1]["mcp"][0]["tools"]["search_issues"]["arguments"] = {"limit": {"type": "Long"}}
    (policy_dir / "actions.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(PolicyLoadError, match="actions.cedarschema does not match actions.yaml"):
        load_bundle(policy_dir)
    (policy_dir / "actions.cedarschema").write_text(schema_text(load_manifest(policy_dir)))
    assert '"limit"?: Long' in (policy_dir / "actions.cedarschema").read_text()
    load_bundle(policy_dir)


REFUND_POLICIES = """
@id("tools")
permit (principal in Team::"ops", action == Action::"call_tool", resource in McpServer::"tools");

@id("large-refunds")
@reason("Refunds over 100 are for people.")
forbid (principal, action == Action::"call_tool", resource == Tool::"tools/refund")
when { context.arguments has amount && context.arguments.amount.greaterThan(decimal("100.0")) };
"""


def test_a_policy_compares_a_decimal_argument(tmp_path):
    gate = gate_for(write_policy_dir(tmp_path / "p", mcp_host(OPEN_SERVER, host="tools.example"),
                                     REFUND_POLICIES))
    url = "http://tools.example/mcp"
    try:
        small = gate.decide(mcp_call(tool_call("refund", {"order_id": "o-1", "amount": 12.5}), url=url))
        large = gate.decide(mcp_call(tool_call("refund", {"order_id": "o-1", "amount": 150.25}), url=url))
        as_text = gate.decide(mcp_call(tool_call("refund", {"order_id": "o-1", "amount": "150.25"}), url=url))
    finally:
        gate.engine.close()
    assert small.outcome is Outcome.ALLOW and not small.errors
    assert large.outcome is Outcome.DENY and [p.policy_id for p in large.determining] == ["large-refunds"]
    assert as_text.problem is Problem.MAPPING_ERROR and "'amount'" in as_text.detail


# -- engine: tools are in their server ------------------------------------------------------------------

def test_an_unlisted_tool_is_in_its_server_for_the_scope_index(bundled_gate):
    index = bundled_gate.engine.snapshot.index
    assert ("McpServer", "github") in index.ancestry(("Tool", "github/never_listed"))
    assert ("McpServer", "gitlab") not in index.ancestry(("Tool", "github/never_listed"))
    assert "github-tools" in index.applicable(("Agent", "ops-bot"), ("Action", "call_tool"),
                                               ("Tool", "github/never_listed"))
    assert "github-tools" not in index.applicable(("Agent", "ops-bot"), ("Action", "call_tool"),
                                                   ("Tool", "gitlab/never_listed"))


def test_an_unlisted_tool_is_in_its_server_for_cedar(bundled_gate):
    snapshot = bundled_gate.engine.snapshot
    request = CedarRequest(("Agent", "ops-bot"), ("Action", "call_tool"), ("Tool", "github/never_listed"),
                           {"arguments": {}}).as_cedarpy()
    for tool, decision in (("github/never_listed", "Allow"), ("gitlab/never_listed", "Deny")):
        request["resource"]["id"] = tool
        entities = snapshot.entities_for(("Agent", "ops-bot"), ("Tool", tool))
        result = cedarpy.is_authorized(request, snapshot.bundle.policy_set, entities)
        assert result.decision.value == decision, tool
    # and through the engine, whose slicing must not drop the permit
    evaluation = bundled_gate.engine.evaluate(CedarRequest(
        ("Agent", "ops-bot"), ("Action", "call_tool"), ("Tool", "github/never_listed"), {"arguments": {}}))
    assert evaluation.allowed and evaluation.determining == ("github-tools",)


# -- gate: which tools an agent sees --------------------------------------------------------------------

ALL_GITHUB_TOOLS = ["search_issues", "create_issue", "merge_pull_request", "delete_repository",
                    "transfer_repository", "rotate_deploy_keys", "bad/name"]


def test_ops_bot_sees_every_tool_it_could_ever_call(bundled_gate):
    shown = bundled_gate.visible_tools(mcp_call(rpc("tools/list")), ALL_GITHUB_TOOLS)
    # merge_pull_request is only forbidden for some arguments; delete_repository can be escalated.
    assert shown == {"search_issues", "create_issue", "merge_pull_request", "delete_repository"}


def test_billing_bot_sees_no_tool_as_nothing_permits_it(bundled_gate):
    call = mcp_call(rpc("tools/list"), agent="billing-bot")
    assert bundled_gate.visible_tools(call, ALL_GITHUB_TOOLS) == set()


def test_an_unknown_agent_sees_no_tool(bundled_gate):
    call = mcp_call(rpc("tools/list"), agent="stranger")
    assert bundled_gate.visible_tools(call, ALL_GITHUB_TOOLS) == set()


def test_tools_of_a_call_that_is_not_to_an_mcp_endpoint_are_not_filtered(bundled_gate):
    call = mcp_call(rpc("tools/list"), url="http://elsewhere.example/mcp")
    assert bundled_gate.visible_tools(call, ["anything", "bad/name"]) == {"anything", "bad/name"}


VISIBILITY_SERVER = {"path": "/mcp", "server": "github", "unknown_tools": "policy",
                     "tools": {"conditional": {"arguments": {"repo": {}}}, "escalated": {}, "blocked": {},
                               "other_team": {}}}
VISIBILITY_POLICIES = """
@id("conditional-permit")
permit (principal in Team::"ops", action == Action::"call_tool", resource == Tool::"github/conditional")
when { context.arguments has repo && context.arguments.repo == "acme/web" };

@id("escalated-permit")
permit (principal in Team::"ops", action == Action::"call_tool", resource == Tool::"github/escalated");

@id("escalated-forbid")
@reason("Needs security.")
@escalate("security")
forbid (principal, action == Action::"call_tool", resource == Tool::"github/escalated");

@id("blocked-permit")
permit (principal in Team::"ops", action == Action::"call_tool", resource == Tool::"github/blocked");

@id("blocked-forbid")
forbid (principal, action == Action::"call_tool", resource == Tool::"github/blocked");

@id("other-team")
permit (principal in Team::"finance", action == Action::"call_tool", resource == Tool::"github/other_team");

@id("unlisted-by-policy")
permit (principal in Team::"ops", action == Action::"call_tool", resource == Tool::"github/unlisted_ok");
"""


def test_visibility_follows_what_some_call_could_do(tmp_path):
    gate = gate_for(write_policy_dir(tmp_path / "p", mcp_host(VISIBILITY_SERVER), VISIBILITY_POLICIES))
    try:
        names = ["conditional", "escalated", "blocked", "other_team", "unlisted_ok", "unlisted_unpermitted"]
        shown = gate.visible_tools(mcp_call(rpc("tools/list")), names)
        # the conditional permit really does allow some calls, and the escalated forbid really escalates
        allowed = gate.decide(mcp_call(tool_call("conditional", {"repo": "acme/web"})))
        escalated = gate.decide(mcp_call(tool_call("escalated", {})))
    finally:
        gate.engine.close()
    assert shown == {"conditional", "escalated", "unlisted_ok"}
    assert allowed.outcome is Outcome.ALLOW
    assert escalated.outcome is Outcome.ESCALATE


def test_the_bundled_tool_list_answer_is_filtered_for_the_agent(bundled_gate):
    call = mcp_call(rpc("tools/list", id=4))
    answer = {"jsonrpc": "2.0", "id": 4, "result": {"tools": [{"name": n, "inputSchema": {}}
                                                              for n in ALL_GITHUB_TOOLS]}}
    filtered = filter_tool_list(answer, lambda names: bundled_gate.visible_tools(call, names))
    assert [t["name"] for t in filtered["result"]["tools"]] == [
        "search_issues", "create_issue", "merge_pull_request", "delete_repository"]


def test_the_gate_splits_a_batch(bundled_gate):
    batch = [rpc("tools/list", id="L"), tool_call("search_issues", {}, id=2),
             rpc("notifications/initialized", id=None)]
    exchange = decide_call(bundled_gate, mcp_call(batch)).exchange
    assert exchange.batch and [m.method for m in exchange.messages] == [
        "tools/list", "tools/call", "notifications/initialized"]
    assert decide_call(bundled_gate, mcp_call(tool_call("x", {}), url="http://elsewhere.example/mcp")).exchange is None


# -- override fingerprints ------------------------------------------------------------------------------

def _fingerprint(message: dict, headers: dict[str, str] | None = None, action: str = "call_tool") -> str:
    call = mcp_call(message, headers=headers)
    return fingerprint(call, binding_of(action, call.body))


def test_a_retry_of_a_tool_call_binds_to_the_same_override():
    first = tool_call("delete_repository", {"repo": "acme/old"}, id=7, _meta={"progressToken": "p-1"})
    retry = {"params": {"_meta": {"progressToken": "p-99"}, "arguments": {"repo": "acme/old"},
                        "name": "delete_repository"},
             "method": "tools/call", "id": "retry-8", "jsonrpc": "2.0"}
    assert _fingerprint(first, {"Mcp-Session-Id": "s-1", "Last-Event-ID": "3"}) == _fingerprint(
        retry, {"mcp-session-id": "s-2"})


def test_a_meta_holding_only_a_progress_token_binds_like_no_meta():
    plain = tool_call("delete_repository", {"repo": "acme/old"})
    assert _fingerprint(plain) == _fingerprint(tool_call("delete_repository", {"repo": "acme/old"},
                                                         _meta={"progressToken": 4}))


def test_the_rest_of_meta_is_bound_tool_code_may_read_it():
    first = tool_call("delete_repository", {"repo": "acme/old"}, _meta={"progressToken": 1, "tenant": "a"})
    other = tool_call("delete_repository", {"repo": "acme/old"}, _meta={"progressToken": 1, "tenant": "b"})
    assert _fingerprint(first) != _fingerprint(other)


@pytest.mark.parametrize(
    "other",
    [tool_call("delete_repository", {"repo": "acme/web"}),
     tool_call("delete_repository", {"repo": "acme/old", "force": True}),
     tool_call("transfer_repository", {"repo": "acme/old"})],
)
def test_a_different_tool_call_binds_to_another_override(other):
    assert _fingerprint(tool_call("delete_repository", {"repo": "acme/old"})) != _fingerprint(other)


def test_other_headers_still_count_for_a_tool_call():
    message = tool_call("delete_repository", {"repo": "acme/old"})
    assert _fingerprint(message, {"X-Tenant": "a"}) != _fingerprint(message, {"X-Tenant": "b"})


def test_a_call_that_is_not_mcp_binds_to_its_whole_body():
    assert binding_of("post", b'{"a": 1}') is None
    one = make_call("POST", "http://api.example/v1/x", headers=JSON, body=b'{"id": 1, "a": 1}')
    two = replace(one, body=b'{"id": 2, "a": 1}')
    assert fingerprint(one, binding_of("post", one.body)) != fingerprint(two, binding_of("post", two.body))
    # and a session header is part of a plain HTTP call
    three = replace(one, headers={**JSON, "Mcp-Session-Id": "s-2"})
    assert fingerprint(one) != fingerprint(three)


# -- answering for a refused message --------------------------------------------------------------------

def test_a_hard_denied_tool_call_is_answered_with_a_tool_error_the_model_can_read(bundled_gate):
    message_json = tool_call("transfer_repository", {"repo": "acme/web"}, id="call-3")
    verdict = bundled_gate.decide(mcp_call(message_json))
    assert verdict.outcome is Outcome.DENY
    [message], _ = parse_messages(message_json)
    problem = verdict.problem_body()

    answer = refusal_answer(problem, message)

    assert answer["jsonrpc"] == "2.0" and answer["id"] == "call-3" and "error" not in answer
    result = answer["result"]
    assert result["isError"] is True
    [content] = result["content"]
    assert content["type"] == "text"
    text = content["text"]
    assert "'transfer_repository'" in text
    assert "Transferring a repository out of the organization is never done by an agent." in text
    assert "do not retry" in text and verdict.decision_id in text
    assert result["_meta"]["cedargate/problem"] == problem
    json.dumps(answer)  # it goes on the wire as is


def test_a_pending_override_answer_names_the_override_and_says_to_retry(bundled_gate):
    message_json = tool_call("delete_repository", {"repo": "acme/old"}, id=11)
    verdict = bundled_gate.decide(mcp_call(message_json))
    assert verdict.outcome is Outcome.ESCALATE
    # as proxy.oversight.held_calls refuses a held call whose override is still waiting for review
    pending = replace(
        verdict, problem=Problem.OVERRIDE_PENDING,
        detail=f"{verdict.detail} An override request is waiting for review.",
        extra={"override_id": "ovr-1234", "override_status": "pending", "retry_after": 10,
               "required_roles": ["security"]},
    )
    [message], _ = parse_messages(message_json)

    answer = refusal_answer(pending.problem_body(), message)

    text = answer["result"]["content"][0]["text"]
    assert answer["id"] == 11 and answer["result"]["isError"] is True
    assert "'delete_repository'" in text and "a security reviewer must agree" in text
    assert "ovr-1234" in text and "status pending" in text and "security" in text
    assert "Retry" in text
    assert answer["result"]["_meta"]["cedargate/problem"]["override_id"] == "ovr-1234"


def test_another_refused_request_gets_a_json_rpc_error_carrying_the_problem(bundled_gate):
    message_json = rpc("initialize", id=1, protocolVersion="2025-11-25", capabilities={})
    verdict = bundled_gate.decide(mcp_call(message_json, agent="billing-bot"))
    assert verdict.problem is Problem.NO_PERMIT
    [message], _ = parse_messages(message_json)
    problem = verdict.problem_body()

    answer = refusal_answer(problem, message)

    assert answer["id"] == 1 and "result" not in answer
    assert answer["error"]["code"] == REFUSED_CODE
    assert answer["error"]["data"] == problem
    assert "cedargate refused initialize" in answer["error"]["message"]
    assert "No policy allows it" in answer["error"]["message"]


# -- filtering tools/list answers -----------------------------------------------------------------------

def _hide(*hidden: str):
    return lambda names: {n for n in names if n not in hidden}


def _list_answer(id, *names):
    return {"jsonrpc": "2.0", "id": id, "result": {"tools": [{"name": n} for n in names]}}


def test_a_tool_list_answer_loses_the_hidden_tools():
    answer = _list_answer(4, "shown", "hidden", "also_shown")
    filtered = filter_tool_list(answer, _hide("hidden"))
    assert [t["name"] for t in filtered["result"]["tools"]] == ["shown", "also_shown"]


def test_every_tool_list_is_filtered_whatever_request_it_answers():
    # A server may replay an old tools/list answer on its GET stream, or echo an id as another type.
    answers = [_list_answer(1, "a", "hidden"), _list_answer(2, "b", "hidden"),
               {"jsonrpc": "2.0", "id": 3, "error": {"code": -1, "message": "x"}},
               _list_answer("1", "hidden"), _list_answer(None, "c", "hidden")]
    filtered = filter_tool_list(answers, _hide("hidden"))
    assert [[t["name"] for t in a["result"]["tools"]] if "result" in a else a["error"] for a in filtered] == [
        ["a"], ["b"], {"code": -1, "message": "x"}, [], ["c"]]


def test_an_answer_that_hides_nothing_is_left_alone():
    assert filter_tool_list(_list_answer(4, "a", "b"), _hide("hidden")) is None
    error = {"jsonrpc": "2.0", "id": 4, "error": {"code": 1}}
    assert filter_tool_list(error, _hide()) is None
    assert filter_tool_list("not an answer", _hide()) is None


def test_an_answer_with_an_odd_id_is_filtered_too():
    odd = [{"jsonrpc": "2.0", "id": [4], "result": {"tools": [{"name": "hidden"}, {"name": 7}, "x"]}},
           _list_answer(4, "a", "hidden")]
    filtered = filter_tool_list(odd, _hide("hidden"))
    assert filtered[0]["result"]["tools"] == []
    assert filtered[1]["result"]["tools"] == [{"name": "a"}]


# -- rewriting event streams ----------------------------------------------------------------------------

def _data(value) -> bytes:
    return json.dumps(value).encode()


LIST_IDS = frozenset({5, "list-b"})
STREAM_EVENTS = [
    # a tools/list answer, LF line ends, with id and event lines
    b"id: 1\nevent: message\ndata: " + _data(_list_answer(5, "shown", "hidden")) + b"\n\n",
    # a tools/list answer over two data lines, CRLF line ends, with a comment
    b": keep-alive\r\nid: 2\r\nevent: message\r\ndata: {\"jsonrpc\": \"2.0\", \"id\": \"list-b\",\r\n"
    b"data:\"result\": {\"tools\": [{\"name\": \"hidden\"}, {\"name\": \"other\"}]}}\r\n\r\n",
    # not JSON: nothing an MCP client should get, and nothing cedargate can check
    b"event: ping\ndata: not json {\n\n",
    # a tool list answering another id (a replay, say): filtered all the same
    b"id: 4\r\ndata: " + _data(_list_answer(6, "hidden")) + b"\r\n\r\n",
    # a progress notification
    b"data: " + _data({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}})
    + b"\n\n",
]
STREAM = b"".join(STREAM_EVENTS)
EXTRA = ({"jsonrpc": "2.0", "id": 9,
          "result": {"isError": True, "content": [{"type": "text", "text": "no"}]}},)


def _filter(answer):
    return filter_tool_list(answer, _hide("hidden"))


WHOLE = feed([STREAM], _filter, EXTRA)


def test_a_stream_fed_whole_is_filtered_event_by_event():
    events = sse_events(WHOLE)
    assert len(events) == len(STREAM_EVENTS)  # less the one that is not JSON, plus cedargate's answer
    first, second = json.loads(events[0]["data"]), json.loads(events[1]["data"])
    assert (events[0]["id"], events[0]["event"]) == ("1", "message")
    assert first == _list_answer(5, "shown")
    assert (events[1]["id"], events[1]["event"]) == ("2", "message")
    assert second == _list_answer("list-b", "other")
    assert b"not json" not in WHOLE
    assert events[2]["id"] == "4" and json.loads(events[2]["data"]) == _list_answer(6)
    # what holds no tool list passes byte for byte
    assert STREAM_EVENTS[4] in WHOLE
    # cedargate's own answers come last, as their own event
    assert events[-1]["event"] == "message" and json.loads(events[-1]["data"]) == EXTRA[0]
    assert WHOLE.endswith(b"\n\n")


def test_an_event_reaches_the_agent_as_soon_as_it_is_complete():
    rewriter = SseRewriter(_filter, EXTRA)
    half = len(STREAM_EVENTS[1]) // 2
    out = rewriter.feed(STREAM_EVENTS[0] + STREAM_EVENTS[1][:half])
    assert [json.loads(e["data"]) for e in sse_events(out)] == [_list_answer(5, "shown")]
    out += rewriter.feed(STREAM_EVENTS[1][half:])
    assert len(sse_events(out)) == 2
    assert _data(EXTRA[0]) not in out  # cedargate's own answers wait for the end of the stream


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_a_stream_cut_anywhere_gives_what_it_gives_whole(cut):
    assert feed([STREAM[:cut], STREAM[cut:]], _filter, EXTRA) == WHOLE


def test_a_stream_fed_byte_by_byte_gives_what_it_gives_whole():
    assert feed([STREAM[i:i + 1] for i in range(len(STREAM))], _filter, EXTRA) == WHOLE


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), unique=True, max_size=40))
def test_a_stream_cut_at_random_gives_what_it_gives_whole(cuts):
    bounds = [0, *sorted(cuts), len(STREAM)]
    assert feed([STREAM[a:b] for a, b in zip(bounds, bounds[1:], strict=False)], _filter, EXTRA) == WHOLE


def test_a_stream_that_rewrites_nothing_passes_unchanged():
    json_only = b"".join(e for e in STREAM_EVENTS if b"not json" not in e)
    assert feed([json_only[:100], json_only[100:]], lambda answer: None) == json_only


@pytest.mark.parametrize("data", [b"not json {", b'{"jsonrpc": "2.0", "id": 1, "result": {"x": "\xff"}}'])
def test_an_event_that_is_not_utf8_json_is_dropped(data):
    # A lenient client could read a tool list out of it that cedargate could not filter.
    assert feed([b"data: " + data + b"\n\n" + STREAM_EVENTS[4]], lambda answer: None) == STREAM_EVENTS[4]


def test_an_event_the_stream_ends_inside_never_reaches_the_agent_unfiltered():
    # A client never dispatches it (HTML's SSE rules); the rewriter drops it rather than pass it on.
    stream = b"data: " + _data(_list_answer(5, "shown", "hidden")) + b"\n"
    out = feed([stream], _filter)
    assert sse_events(out) == [] and b"hidden" not in out


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def test_extra_answers_arrive_after_a_stream_whose_last_event_is_unterminated():
    stream = b"data: " + _data({"jsonrpc": "2.0", "id": 1, "result": {}})
    events = sse_events(feed([stream], _filter, EXTRA))
    assert EXTRA[0] in [_json_or_text(e["data"]) for e in events]


def test_an_event_ended_by_a_crlf_blank_line_after_an_lf_line_is_filtered():
    stream = (b"data: " + _data(_list_answer(5, "shown", "hidden")) + b"\n\r\n"
              + b"data: " + _data({"jsonrpc": "2.0", "method": "notifications/progress"}) + b"\n\n")
    events = sse_events(feed([stream], _filter))
    assert _json_or_text(events[0]["data"]) == _list_answer(5, "shown")
