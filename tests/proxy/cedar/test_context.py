"""The one description of the Cedar context (`proxy.cedar.context`) against the schema files policies are
validated with, and against what the mapping really sends."""

from __future__ import annotations

import json
import re

import pytest
from proxy_support import POLICIES, make_call

from proxy.calls.mapping import MappingOptions, map_call
from proxy.cedar import context
from proxy.cedar.context import (
    CALL_TOOL,
    MCP_RPC,
    METHOD_ACTIONS,
    METHOD_CONTEXT,
    READ_METHODS,
    RESERVED,
    ROUTE_CONTEXT,
    Attribute,
    decimal,
    decimal_of_float,
)
from proxy.cedar.manifest import FIELD_TYPES, load_manifest

# -- a reader for the part of the Cedar schema syntax cedargate's schema files use ------------------------

_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[A-Za-z_]\w*(?:::[A-Za-z_]\w*)*|[{}\[\]<>:;,?=]')


def _tokens(text: str) -> list[str]:
    text = re.sub(r"//[^\n]*", "", text)
    tokens = _TOKEN.findall(text)
    assert "".join(tokens) == re.sub(r"\s+", "", text), "the schema has syntax this reader does not know"
    return tokens


class SchemaReader:
    """Entity, type and action declarations; a record type is {name: (type, required)}."""

    def __init__(self, text: str) -> None:
        self.tokens, self.at = _tokens(text), 0
        self.types: dict[str, object] = {}
        self.actions: dict[str, dict] = {}  # name -> {"groups": [...], "context": type or None}
        while self.at < len(self.tokens):
            self.declaration()

    def take(self, expected: str | None = None) -> str:
        token = self.tokens[self.at]
        assert expected is None or token == expected, f"expected {expected!r}, read {token!r}"
        self.at += 1
        return token

    def peek(self) -> str:
        return self.tokens[self.at]

    def names(self) -> list[str]:
        found = [self.take().strip('"')]
        while self.peek() == ",":
            self.take(",")
            found.append(self.take().strip('"'))
        return found

    def declaration(self) -> None:
        keyword = self.take()
        if keyword == "type":
            name = self.take()
            self.take("=")
            self.types[name] = self.type_expr()
        elif keyword == "entity":
            self.names()
            if self.peek() == "in":
                self.take("in")
                self.list_of_names()
            if self.peek() == "{":
                self.type_expr()
        elif keyword == "action":
            names = self.names()
            groups = []
            if self.peek() == "in":
                self.take("in")
                groups = self.list_of_names()
            applies: dict[str, object] = {}
            if self.peek() == "appliesTo":
                self.take("appliesTo")
                self.take("{")
                while self.peek() != "}":
                    key = self.take()
                    self.take(":")
                    applies[key] = self.list_of_names() if self.peek() == "[" else self.type_expr()
                    if self.peek() == ",":
                        self.take(",")
                self.take("}")
            for name in names:
                self.actions[name] = {"groups": groups, "context": applies.get("context")}
        else:
            raise AssertionError(f"unknown declaration {keyword!r}")
        self.take(";")

    def list_of_names(self) -> list[str]:
        self.take("[")
        found = [] if self.peek() == "]" else self.names()
        self.take("]")
        return found

    def type_expr(self) -> object:
        if self.peek() != "{":
            name = self.take()
            if name == "Set":
                self.take("<")
                inner = self.type_expr()
                self.take(">")
                return ("Set", inner)
            return name
        self.take("{")
        record: dict[str, tuple[object, bool]] = {}
        while self.peek() != "}":
            name = self.take().strip('"')
            required = True
            if self.peek() == "?":
                self.take("?")
                required = False
            self.take(":")
            record[name] = (self.type_expr(), required)
            if self.peek() == ",":
                self.take(",")
        self.take("}")
        return record

    def context_of(self, action: str) -> dict:
        found = self.actions[action]["context"]
        return self.types[found] if isinstance(found, str) else found


def described(attributes: tuple[Attribute, ...]) -> dict[str, tuple[str, bool]]:
    return {a.name: (a.type, a.required) for a in attributes if a.declared}


# -- the description against the schema files ------------------------------------------------------------

def test_the_http_actions_of_schema_cedarschema_have_the_described_context():
    schema = SchemaReader((POLICIES / "schema.cedarschema").read_text(encoding="utf-8"))
    http_actions = {name for name, action in schema.actions.items() if action["context"] is not None}
    assert http_actions == set(METHOD_ACTIONS.values())
    for method, action in METHOD_ACTIONS.items():
        assert schema.context_of(action) == described(METHOD_CONTEXT), action
        assert schema.actions[action]["groups"] == ["read" if method in READ_METHODS else "write"]


def test_the_generated_schema_has_the_described_context_for_every_kind_of_action():
    manifest = load_manifest(POLICIES)
    schema = SchemaReader((POLICIES / "actions.cedarschema").read_text(encoding="utf-8"))
    assert schema.context_of("call_tool") == described(CALL_TOOL)
    assert schema.context_of("mcp_rpc") == described(MCP_RPC)
    assert manifest.actions  # the bundled manifest has routes, so the next loop checks something
    for name, route in manifest.actions.items():
        fields = {n: (FIELD_TYPES[f.type], f.required) for n, f in route.fields.items()}
        assert schema.context_of(name) == {**described(ROUTE_CONTEXT), **fields}, name


def test_the_schema_reader_reads_what_it_is_given():
    schema = SchemaReader('type T = { a: Long, "b-c"?: Set<String> };\n'
                          "action x in [g] appliesTo { principal: [A], resource: [B], context: T };")
    assert schema.context_of("x") == {"a": ("Long", True), "b-c": (("Set", "String"), False)}
    with pytest.raises(AssertionError):
        SchemaReader("action x appliesTo { context: { a: Long } } ;;")


def test_a_manifest_field_may_not_take_a_described_name():
    assert RESERVED == {a.name for a in ROUTE_CONTEXT}
    assert {"scheme", "host", "port", "method", "path", "query", "headers", "body", "agent", "time", "local",
            "severity", "reversible"} == RESERVED


# -- the description against what the mapping sends ------------------------------------------------------

def names(attributes: tuple[Attribute, ...], required_only: bool = False) -> set[str]:
    return {a.name for a in attributes if a.required or not required_only}


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(POLICIES)


def test_an_http_call_sends_the_described_context(manifest):
    call = make_call("POST", "http://api.example.com/v1/things?x=1", body=b'{"amount": 2.5}',
                     headers={"Content-Type": "application/json", "X-Agent-Confidence": "0.9"})
    request = map_call(call, MappingOptions(), manifest)
    assert request.action == ("Action", "post")
    assert names(METHOD_CONTEXT) == set(request.context)  # every attribute, the optional ones sent too
    bare = map_call(make_call("GET", "http://api.example.com/"), MappingOptions(), manifest)
    assert set(bare.context) == names(METHOD_CONTEXT, required_only=True)


def test_a_route_sends_the_described_context_and_its_fields(manifest):
    call = make_call("POST", "https://api.payments.example/v1/refunds/o-1", headers={
        "Content-Type": "application/json"}, body=b'{"amount": 12.5, "currency": "EUR"}')
    request = map_call(call, MappingOptions(), manifest)
    route = manifest.actions[request.action[1]]
    assert set(request.context) == names(ROUTE_CONTEXT) - {"agent"} | set(route.fields)


def _mcp(message: dict):
    call = make_call("POST", "http://mcp.github.example/mcp", body=json.dumps(message).encode(),
                     headers={"Content-Type": "application/json"})
    return map_call(call, MappingOptions(), load_manifest(POLICIES))


def test_an_mcp_tool_call_sends_the_described_context():
    request = _mcp({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                    "params": {"name": "search_issues", "arguments": {"q": "x"}}})
    assert request.action == ("Action", "call_tool")
    assert set(request.context) == names(CALL_TOOL, required_only=True)


def test_an_mcp_message_sends_the_described_context():
    request = _mcp({"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": "repo://x"}})
    assert request.action == ("Action", "mcp_rpc")
    assert set(request.context) == names(MCP_RPC, required_only=True) | {"uri"}
    assert set(request.context) <= names(MCP_RPC)


# -- decimals and methods ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value, text", [(2.0, "2.0"), (2.5, "2.5"), (-0.0, "-0.0"), (100.0, "100.0"),
                                         (3.1415, "3.1415"), (1e20, None), (0.12345, None),
                                         (float("nan"), None)])
def test_a_float_is_a_decimal_when_cedar_can_hold_it(value, text):
    assert decimal_of_float(value) == (None if text is None else decimal(text))


def test_decimal_text_gets_a_fractional_digit():
    assert decimal("7") == {"__extn": {"fn": "decimal", "arg": "7.0"}}
    assert decimal("0.25") == {"__extn": {"fn": "decimal", "arg": "0.25"}}


def test_the_manifest_routes_only_the_described_methods():
    from proxy.cedar.manifest import spec as manifest_spec

    assert manifest_spec.METHODS is context.METHODS
    assert set(READ_METHODS) < set(METHOD_ACTIONS)
