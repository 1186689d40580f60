"""Mapping an agent's HTTP call to a Cedar request: what policies get to see, and what is refused."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import cedarpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proxy_support import POLICIES, make_call

from proxy.calls.mapping import MAX_BODY_DEPTH, Call, MappingError, MappingOptions, map_call
from proxy.cedar.engine import Engine
from proxy.decision.gate import Gate, Outcome
from proxy.record.store import Recorder
from proxy.vocabulary.problems import Problem

JSON = {"Content-Type": "application/json"}


def _map(method: str = "GET", url: str = "http://localhost:9000/v1/instances", **kw):
    options = kw.pop("options", MappingOptions())
    return map_call(make_call(method, url, **kw), options)


def _body(value, content_type: str = "application/json", options: MappingOptions | None = None):
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    request = _map(
        "POST", headers={"Content-Type": content_type}, body=raw, options=options or MappingOptions()
    )
    return request.context.get("body", "<no body>")


@pytest.mark.parametrize(
    "method, action",
    [
        ("GET", "get"),
        ("HEAD", "head"),
        ("OPTIONS", "options"),
        ("POST", "post"),
        ("PUT", "put"),
        ("PATCH", "patch"),
        ("DELETE", "delete"),
        ("get", "get"),
        ("Delete", "delete"),
    ],
)
def test_each_method_is_its_action(method: str, action: str):
    request = _map(method)
    assert request.action == ("Action", action)
    assert request.context["method"] == method.upper()


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "PROPFIND", "BREW", ""])
def test_unknown_method_is_refused_with_405(method: str):
    with pytest.raises(MappingError) as info:
        _map(method)
    assert info.value.status == 405
    assert repr(method) in str(info.value)


def test_principal_resource_and_context_fields():
    request = map_call(make_call(
        "GET",
        "https://API.Example.COM.:8443/v1/items?limit=5&x=1",
        agent="ops-bot",
        headers={"User-Agent": "bot/1", "Accept": "application/json", "X-Trace": "t"},
    ), MappingOptions(time_zone=ZoneInfo("Europe/Berlin")), at=datetime(2026, 12, 5, 22, 59, 30, 500, UTC))
    assert request.principal == ("Agent", "ops-bot")
    assert request.resource == ("Host", "api.example.com")
    assert request.context == {
        "scheme": "https",
        "host": "api.example.com",
        "port": 8443,
        "method": "GET",
        "path": "/v1/items",
        "query": "limit=5&x=1",
        "headers": {"user-agent": "bot/1", "accept": "application/json"},
        # 22:59:30.0005 UTC on a Saturday: 23:59 in Berlin, still Saturday; the instant to the second.
        "time": {"__extn": {"fn": "datetime", "arg": "2026-12-05T22:59:30Z"}},
        "local": {"hour": 23, "minute": 59, "weekday": "saturday", "date": "2026-12-05"},
    }


def test_call_without_host_is_refused():
    with pytest.raises(MappingError) as info:
        map_call(Call("ops-bot", "GET", "http", ".", 80, "/"), MappingOptions())
    assert info.value.status == 400


def test_only_configured_headers_are_passed():
    options = MappingOptions(context_headers=("x-team",))
    request = _map(headers={"X-Team": "ops", "User-Agent": "bot"}, options=options)
    assert request.context["headers"] == {"x-team": "ops"}


def test_secret_headers_never_reach_the_context_even_if_configured():
    options = MappingOptions(
        context_headers=(
            "authorization",
            "cookie",
            "proxy-authorization",
            "set-cookie",
            "x-api-key",
            "accept",
        )
    )
    request = _map(
        headers={
            "Authorization": "Bearer s3cret",
            "Cookie": "sid=s3cret",
            "Proxy-Authorization": "Basic s3cret",
            "X-Api-Key": "s3cret",
            "Set-Cookie": "a=s3cret",
            "Accept": "*/*",
        },
        options=options,
    )
    assert request.context["headers"] == {"accept": "*/*"}
    assert "s3cret" not in json.dumps(request.context)


def test_json_body_is_in_the_context():
    body = {"name": "i-1", "count": 3, "force": True, "tags": ["a", "b"], "nested": {"deep": {"x": "y"}}}
    assert _body(body) == body


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/merge-patch+json",
        "application/vnd.api+json",
    ],
)
def test_json_media_types_are_recognised(content_type: str):
    assert _body({"a": 1}, content_type) == {"a": 1}


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "application/octet-stream",
        "",
    ],
)
def test_non_json_bodies_are_not_in_the_context(content_type: str):
    headers = {"Content-Type": content_type} if content_type else {}
    request = _map("POST", headers=headers, body=b'{"looks": "like json"}')
    assert "body" not in request.context


def test_empty_json_body_is_no_body():
    assert _body(b"") == "<no body>"


def test_floats_become_decimals_and_nulls_are_dropped():
    body = {
        "amount": 12.5,
        "whole": 2.0,
        "tiny": 0.0001,
        "neg": -3.25,
        "none": None,
        "list": [1.5, None, "x"],
        "nested": {"gone": None, "kept": 0.1},
    }
    assert _body(body) == {
        "amount": {"__extn": {"fn": "decimal", "arg": "12.5"}},
        "whole": {"__extn": {"fn": "decimal", "arg": "2.0"}},
        "tiny": {"__extn": {"fn": "decimal", "arg": "0.0001"}},
        "neg": {"__extn": {"fn": "decimal", "arg": "-3.25"}},
        "list": [{"__extn": {"fn": "decimal", "arg": "1.5"}}, "x"],
        "nested": {"kept": {"__extn": {"fn": "decimal", "arg": "0.1"}}},
    }


def test_floats_cedar_cannot_hold_as_decimal_become_strings():
    assert _body({"precise": 0.00001, "huge": 1e300}) == {"precise": "1e-05", "huge": "1e+300"}


def test_integers_outside_cedar_long_become_strings():
    body = {"max": 2**63 - 1, "min": -(2**63), "over": 2**63, "under": -(2**63) - 1}
    assert _body(body) == {"max": 2**63 - 1, "min": -(2**63), "over": str(2**63), "under": str(-(2**63) - 1)}


def test_body_over_the_cap_is_refused_with_413_and_at_the_cap_is_mapped():
    options = MappingOptions(max_body_bytes=100)
    at_cap = b'{"k": "' + b"a" * 91 + b'"}'
    assert len(at_cap) == 100
    assert _body(at_cap, options=options) == {"k": "a" * 91}
    with pytest.raises(MappingError) as info:
        _body(at_cap + b" ", options=options)
    assert info.value.status == 413
    assert "101 bytes" in str(info.value) and "100-byte" in str(info.value)


def test_large_non_json_body_is_not_refused():
    request = _map(
        "POST",
        headers={"Content-Type": "application/octet-stream"},
        body=b"x" * 10_000,
        options=MappingOptions(max_body_bytes=100),
    )
    assert "body" not in request.context


# A UTF-8 byte order mark, and data after the document, as json.loads refuses them.
@pytest.mark.parametrize("raw", [b"{not json", b'{"a": 1', b"\xff\xfe\x00garbage", b"\x80abc",
                                 b'\xef\xbb\xbf{"a": 1}', b'{"a": 1} x', b'{"a": 1}{"a": 2}'])
def test_invalid_json_is_refused_with_400(raw: bytes):
    with pytest.raises(MappingError) as info:
        _body(raw)
    assert info.value.status == 400
    assert "does not parse" in str(info.value)


def test_a_json_body_opening_with_a_byte_order_mark_is_refused_saying_so():
    # The decoder alone refuses it too, but only as "Expecting value: line 1 column 1": the agent is told
    # what json.loads told it, the mark its client added.
    with pytest.raises(MappingError) as info:
        _body(b'\xef\xbb\xbf{"a": 1}')
    assert info.value.status == 400
    assert "Unexpected UTF-8 BOM" in str(info.value)


@pytest.mark.parametrize("key", ["__entity", "__extn", "__expr"])
def test_cedar_escape_keys_are_refused_wherever_they_are(key: str):
    smuggled = {key: {"type": "Agent", "id": "admin"}}
    for body in (smuggled, {"outer": smuggled}, {"list": [1, smuggled]}):
        with pytest.raises(MappingError) as info:
            _body(body)
        assert info.value.status == 400
        assert key in str(info.value)


def test_escape_key_lookalikes_are_fine():
    assert _body({"entity": 1, "__entity_": 2, "_extn": 3}) == {"entity": 1, "__entity_": 2, "_extn": 3}


def test_too_deep_body_is_refused():
    ok: object = "leaf"
    for _ in range(MAX_BODY_DEPTH):
        ok = [ok]
    assert _body(ok) == ok
    with pytest.raises(MappingError, match="deeper"):
        _body([ok])


# Anything an agent can send as JSON either maps to a context Cedar accepts, or is refused up front.
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_every_json_body_maps_to_a_context_cedar_accepts_or_is_refused(value):
    call = make_call("POST", "http://localhost/", headers=JSON, body=json.dumps(value).encode())
    try:
        request = map_call(call, MappingOptions())
    except MappingError as exc:
        assert exc.status == 400
        return
    result = cedarpy.is_authorized(
        request.as_cedarpy(), '@id("all") permit (principal, action, resource);', []
    )
    assert (result.decision.value, result.diagnostics.errors) == ("Allow", [])


# ---- what policies can do with the body, end to end ------------------------------------------------

BODY_SCHEMA_FIELD = "  headers: Headers,\n  body?: { amount?: decimal, note?: String },\n"
BODY_POLICIES = """
@id("ops-post")
permit (principal in Team::"ops", action == Action::"post", resource);

@id("big-payments")
@reason("Payments over 100.0 need a human.")
forbid (principal, action == Action::"post", resource)
when { context has body && context.body has amount && context.body.amount.greaterThan(decimal("100.0")) };
"""


@pytest.fixture
def body_gate(tmp_path: Path, recorder: Recorder) -> Gate:
    directory = tmp_path / "body-policies"
    directory.mkdir()
    schema = (POLICIES / "schema.cedarschema").read_text()
    assert "  headers: Headers,\n" in schema
    (directory / "schema.cedarschema").write_text(schema.replace("  headers: Headers,\n", BODY_SCHEMA_FIELD))
    shutil.copy2(POLICIES / "entities.json", directory / "entities.json")
    (directory / "pay.cedar").write_text(BODY_POLICIES)
    return Gate(Engine(directory), recorder)


@pytest.mark.parametrize(
    "body, outcome",
    [
        (b'{"amount": 150.5}', Outcome.DENY),
        (b'{"amount": 99.99, "note": "ok"}', Outcome.ALLOW),
        (b'{"amount": 100.0}', Outcome.ALLOW),
        (b'{"note": "no amount", "extra": null}', Outcome.ALLOW),
        # An integer is a Long, not a decimal: the forbid cannot be evaluated, so the call is refused.
        (b'{"amount": 150}', Outcome.ERROR),
    ],
)
def test_body_based_policy_sees_floats_as_decimals(body_gate: Gate, body: bytes, outcome: Outcome):
    verdict = body_gate.decide(make_call("POST", "http://localhost/pay", headers=JSON, body=body))
    assert verdict.outcome is outcome, verdict.detail
    if outcome is Outcome.DENY:
        assert verdict.detail == "Payments over 100.0 need a human."


def test_padding_the_body_past_the_cap_does_not_dodge_a_body_policy(body_gate: Gate):
    body = json.dumps({"amount": 150.5, "pad": "x" * 70_000}).encode()
    verdict = body_gate.decide(make_call("POST", "http://localhost/pay", headers=JSON, body=body))
    assert verdict.outcome is Outcome.ERROR
    assert (verdict.problem, verdict.status) == (Problem.MAPPING_ERROR, 413)


# ---- regressions: each was a fail-open or crash before it was fixed -------------------------------


@pytest.mark.parametrize("spelling", ["127.1", "2130706433", "0x7f.0.0.1", "0177.0.0.1", "127.0.0.01"])
def test_production_host_spelled_differently_is_still_protected(gate: Gate, spelling: str):
    verdict = gate.decide(make_call("POST", f"http://{spelling}:9000/v1/instances/i-1/stop"))
    assert verdict.outcome is not Outcome.ALLOW


CARVE_OUT = """
@id("ops-may-write")
permit (principal in Team::"ops", action, resource);

@id("no-volume-deletion")
@reason("Deleting a volume destroys its data for good.")
forbid (principal, action == Action::"delete", resource)
when { context.path like "/v1/volumes/*" };
"""


@pytest.fixture
def carve_out_gate(policy_dir: Path, recorder: Recorder) -> Gate:
    """The layout the conventions prescribe: a broad permit first, then forbids carving out exceptions."""
    (policy_dir / "ops.cedar").write_text(CARVE_OUT)
    return Gate(Engine(policy_dir), recorder)


def test_carve_out_forbid_denies_the_plain_path(carve_out_gate: Gate):
    verdict = carve_out_gate.decide(make_call("DELETE", "http://localhost:9000/v1/volumes/v-1"))
    assert (verdict.outcome, [p.policy_id for p in verdict.determining]) == (
        Outcome.DENY,
        ["no-volume-deletion"],
    )


@pytest.mark.parametrize("path", ["/v1/%76olumes/v-1", "/v1/volume%73/v-1", "/v1/%76%6F%6C%75%6D%65%73/v-1"])
def test_percent_encoded_path_does_not_dodge_a_forbid(carve_out_gate: Gate, path: str):
    verdict = carve_out_gate.decide(make_call("DELETE", f"http://localhost:9000{path}"))
    assert verdict.outcome is not Outcome.ALLOW


# ---- what the agent tells the policy -------------------------------------------------------------------

from proxy.calls.mapping import agent_statements  # noqa: E402


def test_agent_headers_become_validated_context():
    told = agent_statements({"X-Agent-Justification": "  disk is full  ", "x-agent-confidence": "0.8",
                             "X-Agent-Session": "incident-4711", "X-Other": "ignored"})
    assert told == {"justification": "disk is full", "confidence": {"__extn": {"fn": "decimal", "arg": "0.8"}},
                    "session": "incident-4711"}
    assert agent_statements({"X-Agent-Confidence": "1"})["confidence"]["__extn"]["arg"] == "1.0"
    assert agent_statements({}) == {}


@pytest.mark.parametrize("header, value, message", [
    ("X-Agent-Confidence", "1.5", "from 0 to 1"),
    ("X-Agent-Confidence", "-0.1", "from 0 to 1"),
    ("X-Agent-Confidence", "0.12345", "at most 4 places"),
    ("X-Agent-Confidence", "high", "from 0 to 1"),
    ("X-Agent-Session", "has spaces", "X-Agent-Session"),
    ("X-Agent-Session", "x" * 129, "X-Agent-Session"),
    ("X-Agent-Justification", "", "X-Agent-Justification"),
    ("X-Agent-Justification", "line\nbreak", "printable"),
])
def test_bad_agent_headers_are_refused_with_400(header, value, message):
    with pytest.raises(MappingError, match=message) as refused:
        agent_statements({header: value})
    assert refused.value.status == 400


@pytest.mark.parametrize("content_type, body, message", [
    ("application/json", b'{"amount": 1, "amount": 9999}', "key 'amount' appears more than once"),
    ("text/json", b'{"a": {"b": 1, "b": 2}}', "key 'b' appears more than once"),
    ("application/json, text/plain", b'{"amount": 1}', "more than one Content-Type"),
])
def test_bodies_an_upstream_could_read_differently_are_refused(content_type, body, message):
    call = Call("ops-bot", "POST", "http", "localhost", 9000, "/v1/x", headers={"Content-Type": content_type},
                body=body)
    with pytest.raises(MappingError, match=message):
        map_call(call, MappingOptions())


@pytest.mark.parametrize("name", ["X-Auth-Token", "Private-Token", "X-Api-Key", "Cookie", "Authorization"])
def test_credential_headers_never_enter_the_context_even_when_selected(name):
    call = Call("ops-bot", "GET", "http", "localhost", 9000, "/v1/x", headers={name: "s3cret", "Accept": "*/*"})
    context = map_call(call, MappingOptions(context_headers=(name.lower(), "accept"))).context
    assert context["headers"] == {"accept": "*/*"}


@pytest.mark.parametrize("host_header", ["", "  ", ":9000"])
def test_an_empty_host_header_is_refused(host_header):
    call = Call("ops-bot", "GET", "http", "localhost", 9000, "/v1/x", host_header=host_header)
    with pytest.raises(MappingError, match="Host header is empty|Host header names ''") as refused:
        map_call(call, MappingOptions())
    assert refused.value.status == 400


@pytest.mark.parametrize("coding", ["gzip, chunked", "chunked, identity", "identity", "deflate", "xchunked"])
def test_transfer_codings_other_than_chunked_are_refused_with_501(coding):
    call = Call("ops-bot", "POST", "http", "localhost", 9000, "/v1/x", headers={"Transfer-Encoding": coding},
                body=b"{}")
    with pytest.raises(MappingError, match="Transfer-Encoding") as refused:
        map_call(call, MappingOptions())
    assert refused.value.status == 501


@pytest.mark.parametrize("coding", ["chunked", " Chunked "])
def test_chunked_framing_alone_is_mapped(coding):
    call = Call("ops-bot", "POST", "http", "localhost", 9000, "/v1/x", headers={"Transfer-Encoding": coding},
                body=b"{}", host_header="localhost:9000")
    assert map_call(call, MappingOptions()).context["path"] == "/v1/x"


@pytest.mark.parametrize("headers, message", [
    ({"Content-Length": "3"}, "is not the length of the body sent"),
    ({"Content-Length": "+2"}, "is not the length of the body sent"),
    ({"Content-Length": "2", "Transfer-Encoding": "chunked"}, "both Transfer-Encoding and Content-Length"),
])
def test_framing_that_is_not_the_bodys_is_refused(headers, message):
    call = Call("ops-bot", "POST", "http", "localhost", 9000, "/v1/x", headers=headers, body=b"{}")
    with pytest.raises(MappingError, match=message):
        map_call(call, MappingOptions())


def test_a_call_with_another_body_drops_the_framing_of_the_first():
    call = Call("ops-bot", "POST", "http", "localhost", 9000, "/v1/x", body=b"[{}, {}]",
                headers={"Content-Length": "8", "Content-Type": "application/json"})
    message = call.with_body(b"{}")
    assert message.headers == {"Content-Type": "application/json"}
    assert map_call(message, MappingOptions()).context["body"] == {}


@pytest.mark.parametrize("name, value", [
    ("X-Note", "a\r\nHost: 127.0.0.1"),  # an HTTP/2 field value: another header at an HTTP/1.1 upstream
    ("X-Note", "a\r\n\r\nDELETE /v1/volumes/v-1 HTTP/1.1"),  # ... or another request
    ("X-Note", "a\nb"),
    ("X-Note", "a\x00b"),
    ("Content-Type", "text/plain\r\n ;application/json"),  # obs-fold as mitmproxy keeps it
    ("X Note", "a"),
    ("X-Note:", "a"),
])
def test_header_fields_an_upstream_would_split_are_refused(name, value):
    call = Call("ops-bot", "POST", "http", "localhost", 9000, "/v1/x", headers={name: value})
    with pytest.raises(MappingError, match="folded line|control character|not a token") as refused:
        map_call(call, MappingOptions())
    assert refused.value.status == 400


@pytest.mark.parametrize("path, query", [
    ("/v1/x/\u00e9", ""), ("/v1/\uff56olumes/v-1", ""), ("/v1/x", "q=\u00e9"), ("/v1/x/\udcc3\udca9", ""),
    ("/v1/x y", ""), ("/v1/x", "a=b c"), ("/v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nDELETE /v1/y", ""),
    ("/v1/x\t", ""), ("/v1/x", "q=\x1b[2J"), ("/v1/x\x7f", ""),
])
def test_a_request_target_that_is_not_visible_ascii_is_refused(path, query):
    # HTTP/2 carries these; mitmproxy writes them into the HTTP/1.1 request line as they came.
    call = Call("ops-bot", "GET", "http", "localhost", 9000, path, query)
    with pytest.raises(MappingError, match="outside ASCII; percent-encode them|contains .*; percent-encode it"):
        map_call(call, MappingOptions())
