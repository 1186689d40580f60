"""Differential: the upstream executes exactly what cedargate decided, whatever bytes an agent sends.

Hypothesis writes requests as raw bytes, in the shapes by which a proxy and a server have been made to
read one request two ways: absolute and origin form, straight to the proxy or in a CONNECT tunnel (plain
or TLS), HTTP/1.1 and HTTP/2, repeated and case-variant headers and JSON keys, Host and
Transfer-Encoding/Content-Length combinations, percent-escapes, odd whitespace, obs-fold, line breaks in
HTTP/2 fields, method and URL override headers, charsets and encodings. All go through one long-lived
`cedargate run` to `raw_upstream`, where h11 reads what arrived as a strict server would.

For every request the upstream received, `differential_support.readings` reads it the ways real servers
do (host by the request line or the Host header, with or without a `#` fragment, honouring method and URL
override headers and `_method`, JSON keys matched exactly or ignoring case, first or last wins). Each
reading must be what cedargate recorded deciding on (method, host, port, scheme, path: the `decisions`
row, found by a marker in the path), and Cedar, given the policy text below and the reading as context,
must allow it by the same determining policies as the record: the permits are written so that this set
shows the query, the Content-Type and the JSON body fields the call was decided on. A request
cedargate refused must not reach the upstream at all. Well-formed calls (httpx) must moreover be decided
exactly as Cedar decides them, so that the properties cannot hold by cedargate refusing everything.
"""

from __future__ import annotations

import json
import os
import ssl
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import cedarpy
import httpx
import pytest
from differential_support import (
    CONTEXT_HEADERS,
    FRAMINGS,
    MARK,
    METHODS,
    Divergence,
    Gate,
    Http1Attempt,
    Http2Attempt,
    Reading,
    Sent,
    canonical,
    decided_fields,
    decision_row,
    forwarded_rows,
    last_row_id,
    readings,
    send_http1,
    send_http2,
)
from e2e_support import AGENT, TOKEN, RawCall, start_cedargate, write_config
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

SCHEMA = """
entity Team;
entity Agent in [Team];
entity Environment;
entity Host in [Environment] { tags: Set<String> };
type Headers = { "content-type"?: String, "user-agent"?: String, "accept"?: String };
type AgentStatements = { justification?: String, confidence?: decimal, session?: String };
type Payment = { amount?: Long, sku?: String };
type HttpContext = {
  scheme: String, host: String, port: Long, method: String, path: String, query: String,
  headers: Headers, agent?: AgentStatements, body?: Payment,
};
action read, write;
action get, head, options in [read]
  appliesTo { principal: [Agent], resource: [Host], context: HttpContext };
action post, put, patch, delete in [write]
  appliesTo { principal: [Agent], resource: [Host], context: HttpContext };
"""

# Two loopback spellings, two environments: "localhost" is the dev host, "127.0.0.1" production.
ENTITIES = [
    {"uid": {"type": "Team", "id": "ops"}, "attrs": {}, "parents": []},
    {"uid": {"type": "Agent", "id": AGENT}, "attrs": {}, "parents": [{"type": "Team", "id": "ops"}]},
    {"uid": {"type": "Environment", "id": "production"}, "attrs": {}, "parents": []},
    {"uid": {"type": "Environment", "id": "development"}, "attrs": {}, "parents": []},
    {"uid": {"type": "Host", "id": "localhost"}, "attrs": {"tags": ["dev"]},
     "parents": [{"type": "Environment", "id": "development"}]},
    {"uid": {"type": "Host", "id": "127.0.0.1"}, "attrs": {"tags": ["production-critical"]},
     "parents": [{"type": "Environment", "id": "production"}]},
]

# Each permit allows a recognisable set of calls; the narrower ones ("read-probe", "json-writes",
# "tiny-payments") match inside a wider one, so the determining policies of an allowed call show the
# query, the Content-Type and the body amount it was decided on. Anything else is refused.
POLICIES = """
@id("read-tree")
permit (principal in Team::"ops", action in Action::"read", resource)
when { context.path like "/d/*" };

@id("read-probe")
permit (principal in Team::"ops", action in Action::"read", resource)
when { context.path like "/d/*" && context.query like "*probe=1*" };

@id("dev-writes")
permit (principal in Team::"ops", action in [Action::"post", Action::"put", Action::"patch"],
        resource in Environment::"development")
when { context.path like "/d/*/w/*" };

@id("json-writes")
permit (principal in Team::"ops", action in [Action::"post", Action::"put", Action::"patch"],
        resource in Environment::"development")
when { context.path like "/d/*/w/*" && context.headers has "content-type" &&
       context.headers["content-type"] like "application/json*" };

@id("small-payments")
permit (principal in Team::"ops", action == Action::"post", resource)
when { context.path like "/d/*/pay" && context has body && context.body has amount &&
       context.body has sku && context.body.amount <= 100 && context.body.sku like "safe-*" };

@id("tiny-payments")
permit (principal in Team::"ops", action == Action::"post", resource)
when { context.path like "/d/*/pay" && context has body && context.body has amount &&
       context.body has sku && context.body.amount <= 10 && context.body.sku like "safe-*" };

@id("no-deny-query")
@reason("the query asks for a denial")
forbid (principal, action, resource) when { context.query like "*deny*" };

@id("unsure-writes")
@reason("the agent is unsure")
forbid (principal, action in Action::"write", resource)
when { context has agent && context.agent has confidence &&
       context.agent.confidence.lessThan(decimal("0.5")) };
"""


@pytest.fixture(scope="module")
def gate(tmp_path_factory, raw_upstream):
    tmp = tmp_path_factory.mktemp("differential")
    policy_dir = tmp / "policies"
    policy_dir.mkdir()
    (policy_dir / "schema.cedarschema").write_text(SCHEMA)
    (policy_dir / "differential.cedar").write_text(POLICIES)
    (policy_dir / "entities.json").write_text(json.dumps(ENTITIES))
    config = write_config(tmp / "cedargate.yaml", policy_dir, tmp / "state", raw_upstream,
                          policy_reload_interval=0)
    running = start_cedargate(config)
    yield Gate(running.proxy_port, running.database, running.ca_cert, raw_upstream.http_port,
               raw_upstream.https_port, raw_upstream.calls)
    running.stop()


# --- the oracle: Cedar itself, on the policy text, and the check ---------------------------------------

_ENTITIES = cedarpy.Entities.from_json_str(json.dumps(ENTITIES), schema=cedarpy.Schema.from_str(SCHEMA))


def cedar_decides(reading: Reading) -> tuple[bool, frozenset[str]]:
    """Cedar's decision on a reading of a request, and the @ids of the policies that determined it."""
    if reading.method not in METHODS or reading.agent is None:
        return False, frozenset()  # cedargate refuses these before asking Cedar
    context = {"scheme": reading.scheme, "host": reading.host, "port": reading.port, "method": reading.method,
               "path": reading.path, "query": reading.query, "headers": dict(reading.headers)}
    if reading.agent:
        context["agent"] = dict(reading.agent)
    if reading.body is not None:
        context["body"] = json.loads(reading.body)
    request = {"principal": f'Agent::"{AGENT}"', "action": f'Action::"{reading.method.lower()}"',
               "resource": f'Host::"{reading.host}"', "context": context}
    result = cedarpy.is_authorized(request, POLICIES, _ENTITIES)
    ids = frozenset(result.diagnostics.id_annotations_by_reason.get(r, r) for r in result.diagnostics.reasons)
    return result.allowed and not result.diagnostics.errors, ids


def check_arrivals(gate: Gate, sent: Sent, start: int, after: int) -> list[RawCall]:
    """What reached the upstream for this example is exactly what cedargate decided, read every way."""
    arrived = gate.calls[start:]
    if not arrived:
        return arrived
    rows = forwarded_rows(gate, after, sent.marker, len(arrived))
    for call in arrived:
        read = readings(call, sent.scheme, sent.port)
        row = next((r for r in rows if r["path"] == read[0].path and r["decision"] == "allow"
                    and r["upstream_status"] is not None), None)
        if row is None:
            late = "" if sent.marker in call.target else " (without this example's marker: a late one?)"
            raise Divergence(f"the upstream received {call.method} {call.target!r}{late}, but no allowed "
                             f"decision on path {read[0].path!r} was recorded; decisions: {_rows(rows)}")
        decided = (row["method"], canonical(row["host"]), row["port"], row["scheme"], row["path"])
        recorded = frozenset(json.loads(row["determining_policies"]))
        for reading in read:
            seen = (reading.method, reading.host, reading.port, reading.scheme, reading.path)
            if seen != decided:
                raise Divergence(f"cedargate decided {decided}, but a server reading it by {reading.how} "
                                 f"executes {seen}")
            allowed, determining = cedar_decides(reading)
            if not allowed or determining != recorded:
                verdict = f"allows it by {sorted(determining)}" if allowed else "refuses it"
                raise Divergence(f"cedargate allowed it by {sorted(recorded)}, but read by {reading.how} "
                                 f"(query {reading.query!r}, headers {dict(reading.headers)}, body "
                                 f"{reading.body}) Cedar {verdict}")
    return arrived


def _rows(rows: list[dict]) -> list:
    return [(r["method"], r["host"], r["path"], r["decision"], r["upstream_status"]) for r in rows]


# --- what is tried ------------------------------------------------------------------------------------
#
# Each example starts from a call the policies allow (a read anywhere, a write to the dev host, a small
# payment) and applies a few tweaks, each one a way a proxy and a server have been made to disagree.
# Hypothesis shrinks the list of tweaks, so a failure shows the one or two that matter.

LOOPBACK_SPELLINGS = ["localhost", "127.0.0.1", "LocalHost", "localhost.", "127.1", "2130706433",
                      "0x7f.0.0.1", "[::ffff:127.0.0.1]"]
DEV_SPELLINGS = ["localhost", "localhost", "LocalHost", "localhost."]
hosts = st.sampled_from(LOOPBACK_SPELLINGS)

segments = st.one_of(
    st.sampled_from(["w", "x", "pay", "a;b", "%41", "%2e%2e", "%2F", "%252F", "..", ".", "", "%00", "%c3%a9",
                     "x#y", "x?probe=1", "x%23y", "é", "a b", "\x1b[1m", "\x7f", "\t", "x%3Fdeny=1"]),
    st.text(alphabet="abw-._~%;#?=&@:+,!$'()*/", min_size=1, max_size=4),
)
queries = st.one_of(st.none(), st.sampled_from([
    "", "a=1", "probe=1", "deny=1", "a=1&deny=1", "_method=DELETE", "_m%65thod=DELETE", "a=1#deny",
    "probe=1#x", "x=%64eny", "q=a%00b", "q=\x1b", "a=1&a=2", "probe=1&probe=1", "a=1;deny=1",
]))
VERSIONS = ["HTTP/1.0", "http/1.1", "HTTP/1.1 ", "HTTP/2.0", "HTTP/1.10"]
METHOD_VARIANTS = ["DELETE", "get", "Post", "PROPFIND", "PUT", "HEAD", "TRACE", "GET", "post", "DELETE "]

CONTENT_TYPES = ["application/json", "APPLICATION/JSON", "application/json; charset=utf-8",
                 "application/json;charset=UTF-16", "application/json; charset=utf-7", "text/plain",
                 "application/vnd.api+json", "application/x-www-form-urlencoded",
                 "application/json, text/plain", " application/json ", 'text/json; charset="utf-8"',
                 "application/json; charset=latin-1"]

# Keys of the decided body fields as JSON text: exact, case variants, escapes, and the Unicode letters that
# Go folds to ASCII ("ſ" to s, the Kelvin sign to k).
AMOUNT_KEYS = ['"amount"', '"AMOUNT"', '"Amount"', '"\\u0061mount"', '"amount "']
SKU_KEYS = ['"sku"', '"SKU"', '"\u017fku"', '"s\u212au"', '"\\u0073ku"']
AMOUNTS = ["5", "50", "5000", '"5"', "5.0", "1e1", "null", "true", "9223372036854775808", "-1", "500"]
SKUS = ['"safe-1"', '"evil"', '"SAFE-1"', "null", "1"]
json_members = st.lists(st.one_of(
    st.tuples(st.sampled_from(AMOUNT_KEYS), st.sampled_from(AMOUNTS)),
    st.tuples(st.sampled_from(SKU_KEYS), st.sampled_from(SKUS)),
    st.tuples(st.just('"note"'), st.sampled_from(['"x"', "NaN", "[1,2]", '{"a":1}'])),
), min_size=1, max_size=3)
JSON_WRAPS = ["bom", "array", "trailing", "nested", "space", "utf-16"]
OTHER_BODIES = [b"", b"_method=DELETE&a=1", b"amount=5000", b"\x00\xff", b"{}"]


def json_text(members: list[tuple[str, str]], wrap: str) -> bytes:
    text = "{" + ", ".join(f"{k}: {v}" for k, v in members) + "}"
    if wrap == "utf-16":
        return text.encode("utf-16")
    text = {"bom": "\ufeff" + text, "array": f"[{text}]", "trailing": text + " x",
            "nested": f'{{"a": {text}}}', "space": f"\n {text}\t"}.get(wrap, text)
    return text.encode("utf-8")


def _header(name: str, value: str, style: str) -> str:
    if style == "lower":
        name = name.lower()
    elif style == "upper":
        name = name.upper()
    elif style == "tight":
        return f"{name}:{value}"
    elif style == "tabbed":
        return f"{name}:\t{value}\t"
    elif style == "space before colon":
        return f"{name} : {value}"
    elif style == "folded":  # RFC 9112 5.2 obs-fold: a proxy must reject or unfold
        cut = max(1, len(value) // 2)
        return f"{name}: {value[:cut]}\r\n {value[cut:]}"
    return f"{name}: {value}"


HEADER_STYLES = ["lower", "upper", "tight", "tabbed", "space before colon", "folded"]
extra_headers = st.one_of(
    st.tuples(st.just("Content-Type"), st.sampled_from(CONTENT_TYPES)),
    st.tuples(st.sampled_from(["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"]),
              st.sampled_from(["DELETE", "PUT", "GET"])),
    st.tuples(st.sampled_from(["X-Original-URL", "X-Rewrite-URL"]),
              st.sampled_from(["/d/{m}/admin", "/admin"])),
    st.tuples(st.just("X-Agent-Confidence"), st.sampled_from(["0.9", "0.1", "1", " 0.95 "])),
    st.tuples(st.just("Content-Encoding"), st.sampled_from(["gzip", "identity", "GZIP", "base64"])),
    st.tuples(st.just("Accept"), st.sampled_from(["*/*", "application/json"])),
    st.tuples(st.just("Upgrade"), st.just("websocket")),
    st.tuples(st.just("Connection"), st.sampled_from(["close", "keep-alive, Host", "Content-Type"])),
    st.tuples(st.just("Expect"), st.just("100-continue")),
    st.tuples(st.just("X-Note"), st.sampled_from(["a\x00b", "a\x7fb", "\u00e9"])),
)
# Targets other than the origin and absolute forms of the draft's path.
ODD_TARGETS = ["*", "localhost:{port}", "//127.0.0.1:{port}/d/{m}/w/x", "HTTP://localhost:{port}/d/{m}/w/x",
               "http://localhost@127.0.0.1:{port}/d/{m}/w/x", "http://127.0.0.1:{port}#@localhost/d/{m}/w/x",
               "http://localhost:{port}/d/{m}/w/x", "/d/{m}/w/x?", "/d/{m}/w/x/", "/d/{m}/W/x"]
# Fields only HTTP/2 carries as sent: line breaks in values, names out of case, connection-specific
# fields, pseudo-headers twice.
HTTP2_FIELDS = [("x-note", "b\r\nHost: 127.0.0.1:{port}"), ("x-note", "b\nc"), ("x-note", "b\x00c"),
                ("X-Upper", "v"), ("x note", "v"), ("connection", "keep-alive"),
                ("transfer-encoding", "chunked"), ("te", "trailers"), ("host", "127.0.0.1:{port}"),
                (":path", "/d/{m}/y"), (":authority", "127.0.0.1:{port}"), (":method", "DELETE"),
                ("content-length", "0")]


@dataclass
class Draft:
    """A call the policies allow, being tweaked into an attempt."""

    kind: str
    transport: str
    scheme: str
    connect: str
    sni: str | None
    method: str
    form: str
    authority: str
    path: str
    query: str | None
    headers: list[tuple[str, str]]  # name, value: written "Name: value" unless restyled
    styles: dict[int, str] = field(default_factory=dict)  # header index -> how it is written
    host_lines: list[str] | None = None  # None: one Host header naming the authority
    framing: str = "length"
    members: list[tuple[str, str]] = field(default_factory=list)  # JSON body members, as text
    wrap: str = ""
    body: bytes | None = None  # a body other than the JSON members
    content_length: str = "right"  # HTTP/2
    target: str | None = None  # HTTP/1.1: a target other than the draft's path
    version: str = "HTTP/1.1"
    fields: list[tuple[str, str]] = field(default_factory=list)  # HTTP/2: fields written as they are


@st.composite
def drafts(draw, transports: list[str]) -> Draft:
    kind = draw(st.sampled_from(["read", "write", "pay"]))
    transport = draw(st.sampled_from(transports))
    connect = draw(st.sampled_from(DEV_SPELLINGS if kind == "write" else ["localhost", "127.0.0.1"]))
    scheme = "https" if transport in ("tls", "h2") else "http"
    method = draw(st.sampled_from({"read": ["GET", "HEAD", "OPTIONS"], "write": ["POST", "PUT", "PATCH"],
                                   "pay": ["POST"]}[kind]))
    path = {"read": "/d/{m}/x", "write": "/d/{m}/w/x", "pay": "/d/{m}/pay"}[kind]
    query = draw(st.sampled_from([None, "probe=1", "a=1"]))
    headers: list[tuple[str, str]] = [("Accept", "*/*")]
    members: list[tuple[str, str]] = []
    if kind == "pay":
        members = [('"amount"', draw(st.sampled_from(["5", "50"]))), ('"sku"', '"safe-1"')]
    elif kind == "write" and draw(st.booleans()):
        members = [('"note"', '"x"')]
    if members:
        headers.append(("Content-Type", draw(st.sampled_from(CONTENT_TYPES[:3]))))
    sni = "localhost" if canonical(connect) == "localhost" else None
    form = "absolute" if transport == "forward" else "origin"
    return Draft(kind, transport, scheme, connect, sni, method, form, connect, path, query, headers,
                 members=members, framing="length" if members else draw(st.sampled_from(["none", "length"])))


def _tweak_host_header(draw, d: Draft) -> None:
    shape = draw(st.sampled_from(["without port", "other", "none", "two", "empty", "styled", "two same"]))
    named = f"{d.authority}:{{port}}"
    d.host_lines = {
        "without port": [f"Host: {d.authority}"],
        "other": [f"Host: {draw(hosts)}:{{port}}"],
        "none": [],
        "two": [f"Host: {named}", f"Host: {draw(hosts)}:{{port}}"],
        "two same": [f"Host: {named}", f"host: {named}"],
        "empty": ["Host: "],
        "styled": [_header("Host", named, draw(st.sampled_from(HEADER_STYLES)))],
    }[shape]


def _tweak_style(draw, d: Draft) -> None:
    d.styles[draw(st.integers(0, len(d.headers) - 1))] = draw(st.sampled_from(HEADER_STYLES))


def _tweak_json_value(draw, d: Draft) -> None:
    if d.members:
        index = draw(st.integers(0, len(d.members) - 1))
        key = d.members[index][0]
        d.members[index] = (key, draw(st.sampled_from(SKUS if "k" in key.lower() else AMOUNTS)))


TWEAKS: dict[str, Callable] = {
    "absolute form": lambda draw, d: setattr(d, "form", "absolute"),
    "origin form": lambda draw, d: setattr(d, "form", "origin"),
    "authority": lambda draw, d: setattr(d, "authority", draw(hosts)),
    "connect spelling": lambda draw, d: setattr(d, "connect", draw(hosts)),
    "forwarded as https": lambda draw, d: setattr(d, "scheme", "https" if d.transport == "forward"
                                                  else d.scheme),
    "host header": _tweak_host_header,
    "sni": lambda draw, d: setattr(d, "sni", draw(st.one_of(st.none(), hosts))),
    "method": lambda draw, d: setattr(d, "method", draw(st.sampled_from(METHOD_VARIANTS))),
    "path": lambda draw, d: setattr(d, "path", d.path + "/" + draw(segments)),
    "query": lambda draw, d: setattr(d, "query", draw(queries)),
    "header": lambda draw, d: d.headers.append(draw(extra_headers)),
    "header style": _tweak_style,
    "content type": lambda draw, d: d.headers.append(("Content-Type", draw(st.sampled_from(CONTENT_TYPES)))),
    "framing": lambda draw, d: setattr(d, "framing", draw(st.sampled_from(list(FRAMINGS)))),
    "json keys": lambda draw, d: d.members.extend(draw(json_members)),
    "json value": _tweak_json_value,
    "json wrap": lambda draw, d: setattr(d, "wrap", draw(st.sampled_from(JSON_WRAPS))),
    "other body": lambda draw, d: setattr(d, "body", draw(st.sampled_from(OTHER_BODIES))),
    "content length": lambda draw, d: setattr(d, "content_length", draw(st.sampled_from(["none", "wrong"]))),
    "odd target": lambda draw, d: setattr(d, "target", draw(st.sampled_from(ODD_TARGETS))),
    "version": lambda draw, d: setattr(d, "version", draw(st.sampled_from(VERSIONS))),
    "http2 field": lambda draw, d: d.fields.append(draw(st.sampled_from(HTTP2_FIELDS))),
}
HTTP1_TWEAKS = [t for t in TWEAKS if t not in ("content length", "http2 field")]
HTTP2_TWEAKS = [t for t in TWEAKS if t not in ("absolute form", "origin form", "forwarded as https",
                                                "framing", "header style", "odd target", "version")]


def _body(d: Draft) -> bytes:
    if d.body is not None:
        return d.body
    return json_text(d.members, d.wrap) if d.members else b""


@st.composite
def http1_attempts(draw) -> Http1Attempt:
    d = draw(drafts(["forward", "forward", "tunnel", "tls"]))
    for tweak in draw(st.lists(st.sampled_from(HTTP1_TWEAKS), max_size=3, unique=True)):
        TWEAKS[tweak](draw, d)
    body = _body(d)
    target = d.path + (f"?{d.query}" if d.query is not None else "")
    if d.form == "absolute":
        target = f"{d.scheme}://{d.authority}:{{port}}{target}"
    if d.target is not None:
        target = d.target
    host_lines = [f"Host: {d.authority}:{{port}}"] if d.host_lines is None else d.host_lines
    lines = host_lines + [_header(n, v, d.styles.get(i, "plain")) for i, (n, v) in enumerate(d.headers)]
    framing = d.framing if body or d.framing != "length" else "none"
    return Http1Attempt(d.transport, d.scheme, d.connect, d.sni, d.method, target, tuple(lines), framing,
                        body, d.version)


@st.composite
def http2_attempts(draw) -> Http2Attempt:
    d = draw(drafts(["h2"]))
    for tweak in draw(st.lists(st.sampled_from(HTTP2_TWEAKS), max_size=3, unique=True)):
        TWEAKS[tweak](draw, d)
    pseudo = [(":method", d.method), (":scheme", "https"), (":authority", f"{d.authority}:{{port}}"),
              (":path", d.path + (f"?{d.query}" if d.query is not None else ""))]
    if d.host_lines is not None:  # HTTP/2 names the host in :authority; a host header is an extra
        pseudo.pop(2) if not d.host_lines else None
        for line in d.host_lines:
            name, _, value = line.partition(":")
            pseudo.append((name.strip().lower() if draw(st.booleans()) else name.strip(), value.strip()))
    fields = pseudo + [(n.lower(), v) for n, v in d.headers] + d.fields
    return Http2Attempt(d.connect, d.sni, tuple(fields), _body(d), d.content_length)


# --- the shapes tried on every run, besides the generated ones ----------------------------------------

def _h1(method: str, target: str, *lines: str, transport: str = "tunnel", framing: str = "none",
        body: bytes = b"") -> Http1Attempt:
    tls = transport == "tls"
    return Http1Attempt(transport, "https" if tls else "http", "localhost", "localhost" if tls else None,
                        method, target, lines, framing, body)


def _h2(*headers: tuple[str, str], body: bytes = b"", length: str = "right") -> Http2Attempt:
    return Http2Attempt("localhost", "localhost", headers, body, length)


HOST = "Host: localhost:{port}"
JSON_TYPE = "Content-Type: application/json"
PAY_OVER_GO = b'{"amount": 5, "sku": "safe-1", "AMOUNT": 5000}'
HTTP1_SHAPES = [
    # 1: absolute form in a tunnel, plain and TLS (the nginx case)
    _h1("POST", "http://127.0.0.1:{port}/d/{m}/w/x", HOST),
    _h1("POST", "https://127.0.0.1:{port}/d/{m}/w/x", HOST, transport="tls"),
    # repeated JSON keys, as written and behind an escape (JavaScript takes the last)
    _h1("POST", "/d/{m}/pay", HOST, JSON_TYPE, framing="length",
        body=b'{"amount": 5, "sku": "safe-1", "amount": 5000}'),
    _h1("POST", "/d/{m}/pay", HOST, JSON_TYPE, framing="length",
        body=b'{"amount": 5, "sku": "safe-1", "\\u0061mount": 5000}'),
    # 5: keys equal under case folding (Go and ASP.NET take the last), ASCII and Unicode folds
    _h1("POST", "/d/{m}/pay", HOST, JSON_TYPE, framing="length", body=PAY_OVER_GO),
    _h1("POST", "/d/{m}/pay", HOST, JSON_TYPE, framing="length",
        body='{"amount": 5, "sku": "safe-1", "\u017fku": "evil"}'.encode()),
    # 6: method and URL override
    _h1("GET", "/d/{m}/x", HOST, "X-HTTP-Method-Override: DELETE"),
    _h1("POST", "/d/{m}/w/x?_method=DELETE", HOST),
    _h1("GET", "/d/{m}/x", HOST, "X-Original-URL: /d/{m}/admin"),
    # 7: lookalike targets (# and control characters), two Host headers, obs-fold, a chunked body with
    # trailers (the last three refused or not forwarded on this branch already)
    _h1("POST", "/d/{m}/w/x#", HOST),
    _h1("GET", "/d/{m}/x?q=\x1b[2J", HOST),
    _h1("POST", "/d/{m}/w/x", HOST, "Host: 127.0.0.1:{port}"),
    _h1("GET", "http://[::ffff:127.0.0.1]:{port}/d/{m}/x", "Host: [::ffff:127.0.0.1]:{port}", HOST,
        transport="forward"),
    _h1("POST", "/d/{m}/w/x", HOST, "Content-Type: text/plain\r\n ;application/json", framing="length",
        body=b'{"a": 1}'),
    _h1("POST", "/d/{m}/w/x", HOST, JSON_TYPE, framing="chunked with trailer", body=b'{"a": 1}'),
    # found by this test, fixed on this branch: no host named, other transfer codings, NUL in a field,
    # a target outside ASCII
    _h1("POST", "http://localhost:{port}/d/{m}/w/x", transport="forward"),
    _h1("POST", "/d/{m}/w/x", "Host: "),
    _h1("POST", "/d/{m}/w/x", HOST, framing="gzip, chunked", body=b'{"a": 1}'),
    _h1("POST", "/d/{m}/w/x", HOST, "X-Note: a\x00b"),
    _h1("GET", "/d/{m}/x/\u00e9", HOST),
    # repeated and case-variant headers a policy reads: each server picks its own
    _h1("POST", "/d/{m}/w/x", HOST, "Content-Type: text/plain", JSON_TYPE, framing="length",
        body=b'{"a": 1}'),
    _h1("POST", "/d/{m}/w/x", HOST, "content-type: application/json", "CONTENT-TYPE: text/plain",
        framing="length", body=b'{"a": 1}'),
    _h1("POST", "/d/{m}/w/x", HOST, "X-Agent-Confidence: 0.9", "x-agent-confidence: 0.1"),
    # request smuggling classics: both framings, a second request behind the body
    _h1("POST", "/d/{m}/w/x", HOST, framing="chunked and length", body=b'{"a": 1}'),
    _h1("POST", "/d/{m}/w/x", HOST, framing="pipelined after length", body=b'{"a": 1}'),
]


def _pseudo(method: str, path: str, authority: str | None = "localhost:{port}") -> tuple:
    return ((":method", method), (":scheme", "https"), *([(":authority", authority)] if authority else []),
            (":path", path))


WRITE = _pseudo("POST", "/d/{m}/w/x")
HTTP2_SHAPES = [
    # found by this test, fixed on this branch: a body without a length, or with another length, which
    # mitmproxy passed on to the HTTP/1.1 upstream as they came (the body read as the next request)
    _h2(*WRITE, body=b"DELETE /d/{m}/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n", length="none"),
    _h2(*WRITE, length="wrong"),
    _h2(*WRITE, ("transfer-encoding", "chunked"), body=b'{"a": 1}'),  # mitmproxy: a PROTOCOL_ERROR
    # found by this test, fixed on this branch: a line break or NUL in an HTTP/2 field value, which
    # mitmproxy wrote to the HTTP/1.1 upstream as is (another Host, another framing, another request)
    _h2(*WRITE, ("x-note", "b\r\nHost: 127.0.0.1:{port}")),
    _h2(*WRITE, ("x-note", "b\r\nTransfer-Encoding: chunked"),
        body=b"0\r\n\r\nDELETE /d/{m}/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"),
    _h2(*WRITE, ("x-note", "b\nc")),
    _h2(*WRITE, ("x-note", "b\x00c")),
    # found by this test, fixed on this branch: a :path that is not visible ASCII, which mitmproxy wrote
    # into the HTTP/1.1 request line as is: a space splits the line, a line break the request (here into
    # a DELETE nobody decided), other characters are read by the upstream's charset
    _h2(*_pseudo("GET", "/d/{m}/x/a b")),
    _h2(*_pseudo("GET", "/d/{m}/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\nDELETE /d/{m}/y")),
    _h2(*_pseudo("GET", "/d/{m}/x/\u00e9")),
    _h2(*_pseudo("GET", "/d/{m}/\uff57/x")),
    # :authority and a host header naming different hosts, two host headers, a host header alone
    _h2(*WRITE, ("host", "127.0.0.1:{port}")),
    _h2(*_pseudo("GET", "/d/{m}/x"), ("host", "localhost:{port}"), ("host", "localhost:{port}")),
    _h2(*_pseudo("POST", "/d/{m}/w/x", authority=None), ("host", "127.0.0.1:{port}")),
    # repeated headers, 5 and 6 over HTTP/2
    _h2(*WRITE, ("content-type", "text/plain"), ("content-type", "application/json"), body=b'{"a": 1}'),
    _h2(*_pseudo("POST", "/d/{m}/pay"), ("content-type", "application/json"), body=PAY_OVER_GO),
    _h2(*_pseudo("GET", "/d/{m}/x"), ("x-http-method-override", "DELETE")),
]


# --- what this branch refuses -----------------------------------------------------------------------
#
# Found by the properties above: the agent gets a problem+json answer saying what to mend, the record
# says why, and the upstream gets nothing.

SPLIT_PATH = "/d/{m}/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\nDELETE /d/{m}/y"
SMUGGLED_DELETE = b"DELETE /d/{m}/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
REFUSED_HERE = [
    pytest.param(_h1("POST", "/d/{m}/w/x", "Host: "), 400, "Host header is empty", id="empty Host header"),
    pytest.param(_h1("POST", "/d/{m}/w/x", HOST, framing="gzip, chunked", body=b'{"a": 1}'), 501,
                 "Transfer-Encoding", id="gzip, chunked"),
    pytest.param(_h1("POST", "/d/{m}/w/x", HOST, "X-Note: a\x00b"), 400, "control character U+0000",
                 id="NUL in a field"),
    pytest.param(_h1("GET", "/d/{m}/x/\u00e9", HOST), 400, "outside ASCII", id="target outside ASCII"),
    pytest.param(_h1("GET", "/d/{m}/x?q=\x1b[2J", HOST), 400, "control character",
                 id="escape in the query"),
    pytest.param(_h2(*WRITE, length="wrong"), 400, "is not the length of the body",
                 id="h2 length not the body's"),
    pytest.param(_h2(*WRITE, ("x-note", "b\r\nHost: 127.0.0.1:{port}")), 400, "folded line",
                 id="h2 field injecting a Host"),
    pytest.param(_h2(*WRITE, ("x-note", "b\r\nTransfer-Encoding: chunked"),
                     body=b"0\r\n\r\n" + SMUGGLED_DELETE),
                 400, "folded line", id="h2 field injecting a request"),
    pytest.param(_h2(*_pseudo("GET", "/d/{m}/x/a b")), 400, "a space", id="h2 space in :path"),
    pytest.param(_h2(*_pseudo("GET", SPLIT_PATH)),
                 400, "contains a space", id="h2 :path splitting the request"),
]


@pytest.mark.parametrize("shape, status, detail", REFUSED_HERE)
def test_a_request_an_upstream_would_read_otherwise_is_refused_with_problem_json(gate, shape, status, detail):
    start = len(gate.calls)
    sent = (send_http1 if isinstance(shape, Http1Attempt) else send_http2)(gate, shape)
    problem = sent.problem()
    assert (sent.status, problem["status"]) == (status, status)
    assert problem["type"] == "urn:cedargate:problem:mapping-error"
    assert detail in problem["detail"]
    assert gate.calls[start:] == [], "the upstream received a call cedargate refused"
    row = decision_row(gate.database, problem["decision_id"])
    assert row["decision"] == "error" and detail in row["errors"]


def test_an_http2_body_without_a_length_reaches_the_upstream_whole_and_alone(gate):
    # mitmproxy passed it to the HTTP/1.1 upstream without a length: the upstream read no body, and the
    # body as a second request, which nobody decided.
    start = len(gate.calls)
    sent = send_http2(gate, _h2(*WRITE, body=SMUGGLED_DELETE, length="none"))
    assert sent.status == 200
    [call] = gate.calls[start:]
    expected = SMUGGLED_DELETE.replace(b"{m}", sent.marker.encode())
    expected = expected.replace(b"{port}", str(sent.port).encode())
    assert (call.method, call.target, call.body) == ("POST", f"/d/{sent.marker}/w/x", expected)
    assert call.header("content-length") == [str(len(expected))]


# --- the properties -----------------------------------------------------------------------------------

# Reproducible in CI: the same examples on every run, no example database. To search deeper locally, set
# CEDARGATE_DIFFERENTIAL_EXPLORE=<examples per test>: that many random examples.
EXPLORE = int(os.environ.get("CEDARGATE_DIFFERENTIAL_EXPLORE", "0"))
PROPERTY = settings(deadline=None, derandomize=not EXPLORE, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def budget(examples: int) -> settings:
    return settings(PROPERTY, max_examples=EXPLORE or examples)


def _attempt(gate: Gate, attempt: Http1Attempt | Http2Attempt, send, tally: Counter) -> None:
    start, after = len(gate.calls), last_row_id(gate.database)
    sent = send(gate, attempt)
    try:
        arrived = check_arrivals(gate, sent, start, after)
    except Divergence as divergence:
        raise Divergence(f"{divergence}\n  sent: {sent.wire!r}\n  answer: {sent.status} {sent.note}\n"
                         f"  upstream received: {[c.raw for c in gate.calls[start:]]!r}") from None
    tally["forwarded" if arrived else "refused"] += 1


def test_http1_requests_reach_the_upstream_as_decided(gate):
    tally: Counter = Counter()

    @budget(90)
    @given(attempt=http1_attempts())
    def run(attempt):
        _attempt(gate, attempt, send_http1, tally)

    for shape in HTTP1_SHAPES:
        run = example(attempt=shape)(run)
    run()
    print(dict(tally))
    assert tally["forwarded"] >= 20, f"too few requests got through to test anything: {dict(tally)}"


def test_http2_requests_reach_the_upstream_as_decided(gate):
    tally: Counter = Counter()

    @budget(40)
    @given(attempt=http2_attempts())
    def run(attempt):
        _attempt(gate, attempt, send_http2, tally)

    for shape in HTTP2_SHAPES:
        run = example(attempt=shape)(run)
    run()
    print(dict(tally))
    assert tally["forwarded"] >= 10, f"too few requests got through to test anything: {dict(tally)}"


# Well-formed calls, as an HTTP library writes them, must be decided exactly as Cedar decides them (both
# ways): the properties above cannot then hold by cedargate refusing everything, and a slicing or caching
# slip in the engine shows here.
segment_lists = st.lists(st.sampled_from(["w", "x", "pay", "v1"]), max_size=2)
well_formed = st.fixed_dictionaries({
    "method": st.sampled_from(METHODS),
    "scheme": st.sampled_from(["http", "http", "https"]),
    "host": st.sampled_from(["localhost", "127.0.0.1"]),
    "path": segment_lists.map(lambda s: "/".join([MARK, *s])),
    "query": st.sampled_from(["", "probe=1", "deny=1", "a=1&probe=1"]),
    "confidence": st.sampled_from([None, "0.9", "0.1"]),
    "json": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
        "amount": st.sampled_from([5, 50, 5000]), "sku": st.sampled_from(["safe-1", "evil"]),
        "note": st.text(max_size=3)})),
})


def test_well_formed_calls_are_decided_as_cedar_decides_them(gate):
    tally: Counter = Counter()
    trust = ssl.create_default_context(cafile=str(gate.ca_cert))
    proxy = f"http://{AGENT}:{TOKEN}@127.0.0.1:{gate.proxy_port}"

    @budget(25)
    @given(call=well_formed)
    def run(call):
        marker = uuid.uuid4().hex[:12]
        port = gate.https_port if call["scheme"] == "https" else gate.http_port
        path = "/d/" + call["path"].replace(MARK, marker)
        headers = {"Accept": "*/*", "User-Agent": "differential"}
        if call["confidence"]:
            headers["X-Agent-Confidence"] = call["confidence"]
        content = None
        if call["json"] is not None:
            headers["Content-Type"] = "application/json"
            content = json.dumps(call["json"]).encode()
        start, after = len(gate.calls), last_row_id(gate.database)
        with httpx.Client(proxy=proxy, verify=trust, timeout=10) as client:
            response = client.request(call["method"], f"{call['scheme']}://{call['host']}:{port}{path}",
                                      params=call["query"] or None, headers=headers, content=content)
        arrived = check_arrivals(gate, Sent(marker, call["scheme"], port), start, after)

        selected = tuple(sorted((k.lower(), v) for k, v in headers.items() if k.lower() in CONTEXT_HEADERS))
        agent = ()
        if call["confidence"]:
            agent = (("confidence", {"__extn": {"fn": "decimal", "arg": call["confidence"]}}),)
        body = decided_fields(call["json"]) if content else None
        intended = Reading("as sent", call["method"], call["scheme"], call["host"], port, path, call["query"],
                           selected, agent, body)
        allowed, determining = cedar_decides(intended)
        if allowed:
            assert response.status_code == 200 and len(arrived) == 1, (response.status_code, response.text)
        else:
            assert response.status_code == 403 and arrived == [], (response.status_code, response.text)
            if call["method"] != "HEAD":
                assert {p["id"] for p in response.json()["policies"]} == determining
        tally["allowed" if allowed else "refused"] += 1

    run()
    print(dict(tally))
    assert tally["allowed"] >= 5 and tally["refused"] >= 5, dict(tally)
