"""Calls a server would read otherwise than the policy saw them are refused by the mapping (proxy.calls.ambiguity).

Each refusal names what a real server does differently; the controls show that the plain spelling of
the same call still maps.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from proxy_support import POLICIES, make_call

from proxy.calls import ambiguity
from proxy.calls.mapping import MappingError, MappingOptions, map_call
from proxy.cedar.engine import Engine
from proxy.cedar.manifest import FieldError, extract_fields, load_manifest
from proxy.decision.decisions import decide_call
from proxy.decision.gate import Gate, Outcome
from proxy.vocabulary.problems import Problem

JSON = {"Content-Type": "application/json"}
STOP = "http://localhost:9000/v1/instances/i-1/stop"


def _map(method: str = "POST", url: str = STOP, **kw):
    return map_call(make_call(method, url, **kw), MappingOptions(), kw.pop("manifest", None))


def _refused(method: str = "POST", url: str = STOP, **kw) -> str:
    with pytest.raises(MappingError) as refused:
        _map(method, url, **kw)
    assert refused.value.status == 400
    return str(refused.value)


# -- 5. JSON keys equal under case folding --------------------------------------------------------------

@pytest.mark.parametrize("first, second", [
    ("name", "NAME"),
    ("name", "Name"),
    ("task", "ta\u017fk"),  # Go's encoding/json folds the long s to s
    ("kind", "\u212aind"),  # ... and the Kelvin sign to k
    ("id", "\u0131d"),  # Java's equalsIgnoreCase takes the dotless i for i
    ("id", "\u0130d"),  # ... and the dotted capital I
    ("strasse", "stra\u00dfe"),  # full case folding: refusing more than Go matches is safe
])
def test_keys_one_name_ignoring_case_collide(first, second):
    assert ambiguity.colliding_keys([first, "other", second]) == (first, second)


@pytest.mark.parametrize("keys", [["name", "arguments"], ["a", "b", "c"], ["\u00e4", "a"], ["id", "i d"], []])
def test_distinct_keys_do_not_collide(keys):
    assert ambiguity.colliding_keys(keys) is None


@pytest.mark.parametrize("body", [
    {"force": False, "FORCE": True},
    {"outer": {"nested": [{"amount": 1, "AMOUNT": 9999}]}},
    {"steps": [[{"kind": "soft", "\u212aind": "hard"}]]},
])
def test_a_rest_body_with_colliding_keys_at_any_depth_is_refused(body):
    assert "one name to servers that match keys ignoring case" in _refused(headers=JSON, body=json.dumps(body).encode())


def test_colliding_keys_written_as_escapes_are_refused():
    body = b'{"name": "search_issues", "N\\u0041ME": "transfer_repository"}'
    assert "'name' and 'NAME'" in _refused(headers=JSON, body=body)


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x24F), min_size=1, max_size=12))
def test_any_case_variant_of_a_key_is_refused(key):
    variants = {key.upper(), key.lower(), key.swapcase(), key.title()} - {key}
    for variant in variants:
        body = json.dumps({key: 1, variant: 2}).encode()
        with pytest.raises(MappingError):
            _map(headers=JSON, body=body)


def test_a_body_without_colliding_keys_maps_unchanged():
    request = _map(headers=JSON, body=b'{"force": false, "reason": {"Code": 1, "text": "x"}}')
    assert request.context["body"] == {"force": False, "reason": {"Code": 1, "text": "x"}}


@pytest.fixture
def mcp_gate(policy_dir):
    engine = Engine(policy_dir)
    yield Gate(engine, None)
    engine.close()


@pytest.mark.parametrize("params", [
    {"name": "search_issues", "NAME": "transfer_repository"},
    {"name": "merge_pull_request", "arguments": {"repo": "a/b", "REPO": "acme/payments"}},
    {"name": "merge_pull_request", "arguments": {"repo": "a/b"}, "argument\u017f": {"repo": "acme/payments"}},
])
def test_an_mcp_message_with_colliding_keys_is_refused_by_the_gate(mcp_gate, params):
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
    call = make_call("POST", "http://mcp.github.example/mcp", headers=JSON, body=json.dumps(message).encode())
    decision = decide_call(mcp_gate, call)
    assert decision.exchange.messages == ()  # nothing read from it for the answer either
    verdict = mcp_gate.decide(call)
    assert decision.verdicts[0].detail == verdict.detail
    assert verdict.outcome is Outcome.ERROR and verdict.problem is Problem.MAPPING_ERROR and verdict.status == 400
    assert "one name to servers that match keys ignoring case" in verdict.detail


# -- 6. Method and URL overrides ------------------------------------------------------------------------

@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "x-http-method", "X-Method-Override",
                                    "X_HTTP_Method_Override", "X-Original-URL", "x-rewrite-url"])
def test_override_headers_are_refused(header):
    detail = _refused(headers={header: "DELETE"})
    assert header in detail and ("real method" in detail or "real path" in detail)


@pytest.mark.parametrize("query", ["_method=DELETE", "a=1&_method=DELETE", "x=1;_method=DELETE", "_METHOD=DELETE",
                                   "%5Fmethod=DELETE", "_%6Dethod=DELETE", "+_method=DELETE", ".method=DELETE",
                                   "%5F%6D%65%74%68%6F%64=PUT", "_method[]=DELETE", "_method[x]=DELETE",
                                   "_method%00x=DELETE"])
def test_a_method_parameter_in_the_query_is_refused(query):
    assert "query has a" in _refused(url=f"{STOP}?{query}")


@pytest.mark.parametrize("query", ["method=DELETE", "_methods=1", "http_method=x", "a=_method", "x=%41"])
def test_other_query_parameters_pass(query):
    assert _map(url=f"{STOP}?{query}").context["query"] == query


@pytest.mark.parametrize("content_type, body", [
    ("application/x-www-form-urlencoded", b"a=1&_method=DELETE"),
    ("application/x-www-form-urlencoded; charset=utf-8", b"_method=PUT"),
    (None, b"_method=DELETE"),  # Rack reads a POST without a Content-Type as a form
    ("multipart/form-data; boundary=b",
     b'--b\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--b--'),
    ("multipart/form-data; boundary=b", b"--b\r\ncontent-disposition:form-data;name=_method\r\n\r\nDELETE\r\n--b--"),
    ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data; name*=utf-8''%5Fmethod\r\n\r\nX\r\n"),
    ("multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="_m\\ethod"\r\n\r\nX\r\n'),
    ("multipart/mixed; boundary=b", b'--b\r\nContent-Disposition: form-data; name="_method"\r\n\r\nX\r\n'),
    ("application/json", b'{"_method": "DELETE"}'),  # Laravel reads a JSON body's _method
])
def test_a_method_parameter_in_the_body_is_refused(content_type, body):
    headers = {"Content-Type": content_type} if content_type else {}
    assert "real method" in _refused(headers=headers, body=body)


@pytest.mark.parametrize("content_type, body", [
    ("application/x-www-form-urlencoded", b"method=graceful&reason=stuck"),
    ("multipart/form-data; boundary=b",
     b'--b\r\nContent-Disposition: form-data; name="file"; filename="_method"\r\n\r\n_method=DELETE\r\n--b--'),
    ("application/json", b'{"options": {"_method": "DELETE"}}'),  # only a top-level _method is read
    ("text/plain", b"_method=DELETE"),  # no framework reads a text body as a form
])
def test_bodies_without_a_method_parameter_pass(content_type, body):
    _map(headers={"Content-Type": content_type}, body=body)


# -- 7. Request-target lookalikes -----------------------------------------------------------------------

@pytest.mark.parametrize("path, query, says", [
    ("/mcp#x", "", "'#'"),
    ("/v1/instances", "a=1#x", "'#'"),
    ("/v1/inst\x1bances", "", "U+001B"),
    ("/v1/instances", "q=\x1b[2J", "U+001B"),
    ("/v1/inst\x7fances", "", "U+007F"),
    ("/v1/inst\x9bances", "", "U+009B"),
    ("/v1/inst\udc9bances", "", "the byte 0x9B"),
    ("/v1/inst ances", "", "a space"),
    ("/v1/instances", "q=a\tb", "U+0009"),
])
def test_fragments_spaces_and_control_characters_in_the_target_are_refused(path, query, says):
    call = replace(make_call("GET", "http://localhost/"), path=path, query=query)  # as mitmproxy hands them on
    with pytest.raises(MappingError, match=says.replace("+", r"\+")) as refused:
        map_call(call, MappingOptions())
    assert refused.value.status == 400


def test_escaped_characters_pass():
    _map("GET", "http://localhost/v1/instances?q=%23%1B%20")


@pytest.mark.parametrize("url", ["http://localhost/v1/caf\u00e9", "http://localhost/v1/instances?name=r\u00e9sum\u00e9"])
def test_characters_outside_ascii_must_be_percent_encoded(url):
    # An upstream reads raw bytes by its own charset, or maps them to ASCII lookalikes (IIS "best fit").
    assert "outside ASCII" in _refused("GET", url)


def test_path_parameters_are_refused_wherever_they_are():
    for url in ("http://localhost/v1/volumes;x/vol-1", "http://localhost/v1/volumes/vol-1;v=2"):
        assert "';' parameter" in _refused("DELETE", url)


def test_a_path_value_with_a_semicolon_or_hash_is_a_field_error(tmp_path):
    manifest = load_manifest(POLICIES)
    for value in ("o-9;v=1", "o-9#x"):
        _, match = manifest.match("api.payments.example", "GET", f"/v1/refunds/{value}")
        with pytest.raises(FieldError, match="cannot hold ';' or '#'"):
            extract_fields(match, {}, None)


@pytest.mark.parametrize("value, says", [
    ("t-1\r\n X-HTTP-Method-Override: DELETE", "folded line (obs-fold"),
    ("t-1\n\tmore", "folded line (obs-fold"),
    ("t-1\x00", "U+0000"),
    ("t-1\x1b[2J", "U+001B"),
    ("t-1\x7f", "U+007F"),
    ("t-1\u009b", "U+009B"),
    ("t-1\udc85", "the byte 0x85"),
])
def test_control_characters_in_header_values_are_refused(value, says):
    assert says in _refused(headers={"X-Trace": value})


def test_tabs_and_non_ascii_letters_in_header_values_pass():
    request = _map(headers={"X-Trace": "t-1\tretry", "User-Agent": "agent/1 (caf\u00e9)"})
    assert request.context["headers"]["user-agent"] == "agent/1 (caf\u00e9)"


def test_repeated_host_headers_are_refused():
    call = replace(make_call("POST", STOP), host_header="localhost:9000, 127.0.0.1:9000")
    with pytest.raises(MappingError, match="more than one Host header"):
        map_call(call, MappingOptions())
    with pytest.raises(MappingError, match="more than one Host header"):
        _map(headers={"Host": "localhost:9000, localhost:9000"})


def test_a_host_header_besides_the_authority_must_name_the_same_host():
    # HTTP/2: mitmproxy reads :authority, and sends an HTTP/1 upstream the Host header.
    call = replace(make_call("POST", STOP, headers={"Host": "127.0.0.1:9000"}), host_header="localhost:9000")
    with pytest.raises(MappingError, match="names '127.0.0.1'"):
        map_call(call, MappingOptions())
    same = replace(make_call("POST", STOP, headers={"host": "localhost:9000"}), host_header="localhost:9000")
    assert map_call(same, MappingOptions()).resource == ("Host", "localhost")


def test_a_call_with_trailer_fields_is_refused():
    call = replace(make_call("POST", STOP), trailers=("X-HTTP-Method-Override",))
    with pytest.raises(MappingError, match=r"trailer fields \(X-HTTP-Method-Override\)"):
        map_call(call, MappingOptions())
