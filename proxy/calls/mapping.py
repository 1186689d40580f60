"""Turning an agent's HTTP call into a Cedar request.

principal = `Agent::"<id>"`, action = the HTTP method (`Action::"get"`, `"post"`, ...; the schema groups
them as `read` and `write`), resource = `Host::"<host>"`, context = scheme, host, port, method, path,
query, the operator's selected headers, when it was decided (`time`, `local`) and the JSON body when
there is one. The Cedar schema of this
mapping is `policies/schema.cedarschema`. On a host the action manifest covers, the action is the
route's named action and its typed fields join the context (see `proxy.cedar.manifest`). Anything that
cannot be mapped faithfully raises `MappingError`; the caller refuses the call rather than guess.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, tzinfo
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs

from proxy.calls import ambiguity
from proxy.calls.mcp.jsonrpc import McpError, Message, parse_messages
from proxy.calls.mcp.mapping import HintLookup, map_message
from proxy.calls.tunnels import server_name_problem, target_problem
from proxy.cedar.context import METHOD_ACTIONS, decimal, decimal_of_float, time_context
from proxy.cedar.engine import CedarRequest
from proxy.cedar.manifest import FieldError, Manifest, McpEndpointSpec, extract_fields
from proxy.vocabulary.hosts import canonical_host

# Headers that carry credentials by their name: never in the context or the record, whatever the
# operator selects, and never shown to reviewers.
_SECRET_HEADER = re.compile(r"auth|token|secret|password|passwd|cookie|api[-_]?key|signature|credential", re.I)


@lru_cache(maxsize=1024)  # asked of the operator's few context headers on every call
def is_secret_header(name: str) -> bool:
    return _SECRET_HEADER.search(name) is not None

# What an HTTP/1.1 request line and header lines can carry as the upstream will read them.
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]*")
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a token (RFC 9110 5.1)

# How the upstream finds where the body ends: they must describe exactly the body decided on.
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})

# Cedar reads these keys in JSON as escapes for entity and extension values; an agent's body must
# not be able to smuggle an entity reference into the context.
CEDAR_ESCAPES = frozenset({"__entity", "__extn", "__expr"})

MAX_BODY_DEPTH = 32
CEDAR_LONG_MIN, CEDAR_LONG_MAX = -(2**63), 2**63 - 1


class MappingError(Exception):
    """The call cannot be expressed as a Cedar request; `status` is the HTTP status to refuse with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class UnknownAction(MappingError):
    """The host has an action manifest and no route matches: nobody has classified this call's risk."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 403)


@dataclass(frozen=True)
class Call:
    """One agent call as plain data, independent of mitmproxy."""

    agent: str
    method: str
    scheme: str
    host: str
    port: int
    path: str
    query: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    host_header: str | None = None  # the Host header or :authority as the agent sent it; None: none sent
    trailers: tuple[str, ...] = ()  # names of trailer fields sent after a chunked body
    # In a CONNECT tunnel (to `host:port`): the authority of an HTTP/1 absolute-form request target,
    # and the TLS server name (SNI) the client sent. A server may route by either.
    target_authority: str | None = None
    server_name: str | None = None

    def with_body(self, body: bytes) -> Call:
        """The same call carrying another body (one message of a batch): its framing described the whole."""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in FRAMING_HEADERS}
        return replace(self, body=body, headers=headers)

    @property
    def url(self) -> str:
        default = {"http": 80, "https": 443}.get(self.scheme)
        netloc = self.host if self.port == default else f"{self.host}:{self.port}"
        return f"{self.scheme}://{netloc}{self.path}" + (f"?{self.query}" if self.query else "")


@dataclass(frozen=True)
class MappingOptions:
    context_headers: tuple[str, ...] = ("content-type", "user-agent", "accept")
    max_body_bytes: int = 64 * 1024
    time_zone: tzinfo = UTC  # the wall clock of `context.local`


@dataclass(frozen=True)
class McpBody:
    """A POST body on an MCP endpoint, read once: its JSON-RPC messages, or why it has none cedargate
    can decide (`problem`, refused with `status` when the call is mapped)."""

    messages: tuple[Message, ...] = ()
    batch: bool = False
    problem: str | None = None
    status: int = 400


@dataclass(frozen=True)
class Reading:
    """What is read of a call before it is mapped, once per call: the MCP endpoint it is addressed to
    (None: not one the manifest names) and, for a POST there, the messages its body carries."""

    endpoint: McpEndpointSpec | None = None
    body: McpBody | None = None


def read_call(call: Call, options: MappingOptions, manifest: Manifest | None) -> Reading:
    """Look up the call's MCP endpoint and parse its JSON-RPC body, never raising: a body that cannot
    be read is refused when the call is mapped (`map_call`), in the order of the mapping's checks."""
    endpoint = manifest.mcp_endpoint(canonical_host(call.host), call.path) if manifest is not None else None
    if endpoint is None or call.method.upper() != "POST":
        return Reading(endpoint)
    try:
        parsed = parse_json(call, options.max_body_bytes)
    except MappingError as exc:
        return Reading(endpoint, McpBody(problem=str(exc), status=exc.status))
    if parsed is None:
        return Reading(endpoint, McpBody(
            problem=f"a POST to the MCP endpoint {call.path} must carry JSON-RPC as application/json"))
    try:
        messages, batch = parse_messages(parsed)
    except McpError as exc:
        return Reading(endpoint, McpBody(problem=str(exc)))
    return Reading(endpoint, McpBody(tuple(messages), batch))


def split_batch(call: Call, reading: Reading, max_body_bytes: int) -> list[tuple[Call, Reading]]:
    """Each message of a JSON-RPC batch as a call of its own, read as if it had come alone.

    The batch was parsed whole (every key of every message checked); what a message alone adds is the
    size of its own body and the `_method` check on its top-level keys.
    """
    assert reading.body is not None and reading.body.batch
    parts = []
    for message in reading.body.messages:
        part = call.with_body(message.encoded())
        try:
            _check_json_size(part, max_body_bytes)
            _check_json_overrides(message.raw)
        except MappingError as exc:
            body = McpBody(problem=str(exc), status=exc.status)
        else:
            body = McpBody((message,), False)
        parts.append((part, Reading(reading.endpoint, body)))
    return parts


def map_call(call: Call, options: MappingOptions, manifest: Manifest | None = None,
             reading: Reading | None = None, *, at: datetime | None = None,
             hints: HintLookup | None = None) -> CedarRequest:
    """The Cedar request for `call`; `reading` is what `read_call` read of it, if the caller has it.

    `at`: when the call is decided (default now); `hints`: what MCP servers' tool lists said of their
    tools (default: nothing, so a tool the manifest does not classify has MCP's cautious defaults).
    """
    action = METHOD_ACTIONS.get(call.method.upper())
    if action is None:
        raise MappingError(f"HTTP method {call.method!r} has no Cedar action; cedargate does not forward it", 405)
    host = canonical_host(call.host)
    if not host:
        raise MappingError("the call names no host")
    problem = server_name_problem(call.server_name, call.host)
    if problem:
        raise MappingError(problem, 421)  # Misdirected Request: what a server answers for an SNI not its own
    if call.host_header is not None and not call.host_header.strip():
        # Servers read an empty Host as none (their default virtual host) or refuse it: never the call's.
        raise MappingError(f"the Host header is empty; name the host the call goes to ({host!r}) or leave it out")
    if call.host_header:
        _check_host_header(call, host, call.host_header)
    if call.target_authority is not None:
        _refuse(target_problem(call.target_authority, call.scheme, call.host, call.port))
    for part, text in (("path", call.path), ("query", call.query)):
        _refuse(ambiguity.target_problem(part, text))
    if not _VISIBLE_ASCII.fullmatch(call.path + call.query):
        # HTTP/2 carries them, and mitmproxy writes them into an HTTP/1.1 request line as they came: a space
        # or line break there splits the request line, or the request; a character outside ASCII is read
        # by the upstream's own charset, or mapped to an ASCII lookalike (IIS "best fit").
        raise MappingError("the request target has a space, a control character or a character outside "
                           "ASCII; percent-encode them (RFC 3986 2.1)")
    check_normal_path(call.path)
    check_framing(call)
    if call.trailers:
        # mitmproxy forwards no HTTP/1 trailers, and servers merge them into headers or not: refused,
        # since a policy decides on the headers alone.
        raise MappingError(f"the call sends trailer fields ({', '.join(call.trailers)[:200]}) after its chunked "
                           "body, which cedargate does not decide on; send them as headers")
    content_type = ""
    for name, value in call.headers.items():
        key = _PLAIN_NAMES.get(name)
        if key is not None:  # a name that passed every check of the name alone: only its value is checked
            _refuse(ambiguity.header_problem(name, key, value))
            continue
        key = name.lower()
        if key == "host":  # besides :authority in HTTP/2
            if value != call.host_header:  # (else checked above)
                _check_host_header(call, host, value)
            continue
        _refuse(ambiguity.header_problem(name, key, value))  # line breaks and other controls in the value
        if not _FIELD_NAME.fullmatch(name):
            # HTTP/2 carries fields as data, and mitmproxy writes them to an HTTP/1.1 upstream as they came:
            # there a name with a space or a colon is another header (RFC 9113 8.2.1, RFC 9110 5.1).
            raise MappingError(f"header name {name[:40]!r} is not a token (RFC 9110 section 5.1); send each "
                               "header as one line of visible text")
        if key == "content-type":
            content_type = value
        if key == "upgrade" or key.startswith("sec-websocket-"):
            # A WebSocket (or h2c) upgrade would open a channel whose messages no policy decides.
            raise MappingError("cedargate decides each HTTP call and does not forward protocol upgrades "
                               f"({name})")
        if key == "content-encoding" and value.strip().lower() not in ("", "identity"):
            # Decoders differ (mitmproxy even decodes "base64"): the policy and the server must read
            # the same bytes, so a body is sent as it is.
            raise MappingError(f"cedargate decides on bodies sent without Content-Encoding, not {value[:40]!r}", 415)
        if key not in _VALUED_NAMES and len(_PLAIN_NAMES) < _MAX_PLAIN_NAMES:
            _PLAIN_NAMES[name] = key
    context: dict[str, Any] = {
        "scheme": call.scheme,
        "host": host,
        "port": call.port,
        "method": call.method.upper(),
        "path": call.path,
        "query": call.query,
        "headers": select_headers(call.headers, options.context_headers),
        **time_context(at or datetime.now(UTC), options.time_zone),
    }
    told = agent_statements(call.headers)
    if told:
        context["agent"] = told
    check_overrides(call, content_type.split(";", 1)[0].strip().lower())
    if manifest is not None:
        if reading is None:
            reading = read_call(call, options, manifest)
        if reading.endpoint is not None:
            return _mcp_request(call, reading, context, manifest, hints)
        lookalike = manifest.mcp_lookalike(host, call.path)
        if lookalike is not None:
            # The server may route it to its MCP endpoint, where it would not be decided as MCP.
            raise MappingError(f"{call.path} is not the MCP endpoint {lookalike.path} of {host}, but a server "
                               f"may take it for it; send MCP calls to {lookalike.path}", 404)
    _refuse(ambiguity.path_parameter_problem(call.path))
    body = json_body(call, options.max_body_bytes)
    if body is not None:
        context["body"] = body
    if manifest is not None:
        routed = _manifest_action(manifest, host, call, body, context)
        if routed is not None:
            action, query_fields = routed
            return CedarRequest(("Agent", call.agent), ("Action", action), ("Host", host), context, query_fields)
    return CedarRequest(("Agent", call.agent), ("Action", action), ("Host", host), context)


def _mcp_request(call: Call, reading: Reading, context: dict[str, Any],
                 manifest: Manifest, hints: HintLookup | None) -> CedarRequest:
    """A message on an MCP endpoint: `call_tool` on its Tool, or `mcp_rpc` on its server
    (see proxy.calls.mcp)."""
    endpoint, body = reading.endpoint, reading.body
    assert endpoint is not None
    message = None
    if body is not None:
        if body.problem is not None:
            raise MappingError(body.problem, body.status)
        if body.batch:  # decided message by message (`split_batch`); a whole batch has no one action
            raise MappingError("a JSON-RPC batch is decided message by message, not as one call")
        message = body.messages[0]
    elif call.body:
        # Decided as the stream's GET or the session's DELETE; a server reading a body would act on it.
        raise MappingError(f"a {call.method.upper()} to the MCP endpoint {call.path} carries no body")
    try:
        mapped = map_message(endpoint, call.method, message, to_cedar_value, call.headers,
                             manifest.argument_types, hints, manifest.argument_folds,
                             manifest.nested_argument_folds)
    except McpError as exc:
        raise MappingError(str(exc), 400 if message else 405) from None
    except LookupError as exc:
        raise UnknownAction(str(exc)) from None
    context.update(mapped.context)
    return CedarRequest(("Agent", call.agent), ("Action", mapped.action), mapped.resource, context)


# Header names (as spelled) that passed every check of the name alone in `map_call`, with their lower-case
# form: a token, neither an override header nor an upgrade, and none of `_VALUED_NAMES`, whose checks read
# the value too. For these the loop checks only the value. Bounded: names past the bound are checked whole.
_PLAIN_NAMES: dict[str, str] = {}
_MAX_PLAIN_NAMES = 1024
_VALUED_NAMES = frozenset({"host", "content-type", "content-encoding"})


def _manifest_action(manifest: Manifest, host: str, call: Call, body: Any,
                     context: dict[str, Any]) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """The route's action and its fields taken from the query (context key, parameter), its fields added to
    `context`; None on a host the manifest does not cover."""
    host_spec, match = manifest.match(host, call.method, call.path)
    if host_spec is None:
        return None
    if match is None:
        if host_spec.unknown == "http":
            return None
        raise UnknownAction(
            f"{call.method.upper()} {call.path} on {host} matches no route of the action manifest, so nobody "
            "has classified what it does; add it to actions.yaml to allow it"
        )
    # A repeated query parameter stays a list, which no typed field accepts: an agent must not show
    # the policy one value and the upstream another.
    query = {k: v[0] if len(v) == 1 else v for k, v in parse_qs(call.query, keep_blank_values=True).items()}
    try:
        fields = extract_fields(match, query, body)
    except FieldError as exc:
        raise MappingError(str(exc)) from exc
    context.update(fields)
    from_query = tuple((name, spec.at or name) for name, spec in match.route.fields.items()
                       if spec.source == "query" and name in fields)
    return match.route.action, from_query


def _refuse(problem: str | None) -> None:
    if problem is not None:
        raise MappingError(problem)


def _check_host_header(call: Call, host: str, authority: str) -> None:
    """A policy sees where the call goes; an upstream routing by Host must not see another host."""
    _refuse(ambiguity.header_problem("Host", "host", authority))  # repeated Host headers come joined
    named = _hostname(authority)
    # (Spelled as the call's own host, it is that host: canonical_host is costly, so skip it then.)
    if named != call.host and canonical_host(named) != host:
        raise MappingError(f"the Host header names {named!r} but the call goes to {host!r}; send them alike")


def check_overrides(call: Call, media: str) -> None:
    """Refuse a `_method` parameter in the query or a form body: frameworks run the method it names."""
    if call.query:
        parameter = ambiguity.method_parameter(call.query)
        if parameter is not None:
            raise MappingError(ambiguity.override_problem("query", parameter))
    if not call.body:
        return
    parameter = None
    if media in ("", "application/x-www-form-urlencoded"):  # Rack reads a POST without a type as a form
        parameter = ambiguity.form_method_parameter(call.body)
    elif media.startswith("multipart/"):
        parameter = ambiguity.multipart_method_parameter(call.body)
    if parameter is not None:
        raise MappingError(ambiguity.override_problem("form body", parameter))


def _hostname(authority: str) -> str:
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def check_framing(call: Call) -> None:
    """Refuse framing headers that would make an upstream read another body than the one decided on.

    Over HTTP/1.1 mitmproxy reads the body by them, so they agree with it; an HTTP/2 request carries them
    apart from its data, and mitmproxy passes them on to an HTTP/1.1 upstream as sent. A length that is
    not the body's, or a length beside chunked, makes a server read part of the body, or of the next
    request, as a request of its own (request smuggling, RFC 9112 6.3 and 11.2).
    """
    framing = {}
    for name, value in call.headers.items():
        key = name.lower()
        if key in FRAMING_HEADERS:
            framing[key] = value
    coding = framing.get("transfer-encoding")
    if coding is not None and coding.strip().lower() != "chunked":
        # The body is decided as mitmproxy de-chunks it; a server that also undoes the other codings
        # ("gzip, chunked") executes other bytes, and one that cannot answers 501 (RFC 9112 6.1).
        raise MappingError(f"cedargate forwards a body framed by Content-Length or by Transfer-Encoding: "
                           f"chunked alone, not Transfer-Encoding {coding[:40]!r}", 501)
    length = framing.get("content-length")
    if length is not None and coding is not None:
        raise MappingError("the call has both Transfer-Encoding and Content-Length; send one of them")
    if length is not None and length.strip() != str(len(call.body)):
        raise MappingError(f"Content-Length {length[:40]!r} is not the length of the body sent "
                           f"({len(call.body)} bytes); send the body's length")


UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def check_normal_path(path: str) -> None:
    """Refuse a path that an upstream may read differently from how a policy would.

    Policies match `context.path` as sent, while servers decode escapes and resolve dot segments, so
    `/v1/%76olumes/x` or `/v1/x/../volumes/x` could slip past `like "/v1/volumes/*"`. Like Envoy's
    path normalization, but refusing instead of rewriting, so allowed calls pass unchanged.
    """
    if path == "*":
        return
    problem = None
    if not path.startswith("/"):
        problem = "it does not start with /"
    elif "\x00" in path or "\\" in path:
        problem = "it contains a NUL byte or a backslash"
    elif "//" in path:
        problem = "it contains an empty segment (//)"
    elif any(segment in (".", "..") for segment in path.split("/")):
        problem = "it contains a . or .. segment"
    elif "%" in path:
        for escape in _ESCAPE.findall(path):
            char = chr(int(escape, 16))
            if char in UNRESERVED:
                problem = f"%{escape} escapes {char!r}, which must be sent unescaped"
            elif char in "/\\\x00":
                problem = f"%{escape} escapes a slash, backslash or NUL, which upstreams read differently"
            if problem:
                break
    if problem:
        raise MappingError(f"path {path!r} is not in normal form (RFC 3986 section 6.2.2): {problem}")


_SESSION = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}$")
_CONFIDENCE = re.compile(r"^(0(\.\d{1,4})?|1(\.0{1,4})?)$")
MAX_JUSTIFICATION = 2000


def agent_statements(headers: Mapping[str, str]) -> dict[str, Any]:
    """What the agent tells the policy about its call, from optional headers, validated.

    `X-Agent-Justification` (free text, also shown to reviewers), `X-Agent-Confidence` (0 to 1, at most
    4 places, a Cedar decimal), `X-Agent-Session` (an id). A bad value is refused with 400 rather than
    dropped, so a policy never decides on a value the agent did not mean.
    """
    told: dict[str, Any] = {}
    for name, value in headers.items():
        key = name.lower()
        if not key.startswith("x-agent-"):
            continue
        value = value.strip()
        if key == "x-agent-justification":
            if not value or len(value) > MAX_JUSTIFICATION or not value.isprintable():
                raise MappingError(f"X-Agent-Justification must be 1 to {MAX_JUSTIFICATION} printable characters")
            told["justification"] = value
        elif key == "x-agent-confidence":
            if not _CONFIDENCE.match(value):
                raise MappingError(f"X-Agent-Confidence must be a number from 0 to 1 with at most 4 places, "
                                   f"not {value[:40]!r}")
            told["confidence"] = decimal(value)
        elif key == "x-agent-session":
            if not _SESSION.match(value):
                raise MappingError("X-Agent-Session must be 1 to 128 characters of letters, digits and ._:@/-")
            told["session"] = value
    return told


def select_headers(headers: Mapping[str, str], wanted: Iterable[str]) -> dict[str, str]:
    lowered = {k.lower(): v for k, v in headers.items()}
    return {name: lowered[name] for name in wanted if name in lowered and not is_secret_header(name)}


def json_body(call: Call, max_bytes: int) -> Any:
    """The body as Cedar JSON when it is JSON; None when there is no JSON body."""
    parsed = parse_json(call, max_bytes)
    return None if parsed is None else to_cedar_value(parsed)


def parse_json(call: Call, max_bytes: int) -> Any:
    """The body parsed when it is declared as JSON; None when there is no JSON body."""
    content_type = next((v for k, v in call.headers.items() if k.lower() == "content-type"), "")
    media = content_type.split(";", 1)[0].strip().lower()
    if "," in media:
        # Repeated Content-Type headers (joined with ","): upstreams pick differently; so may not we.
        raise MappingError(f"the call has more than one Content-Type ({content_type!r})")
    if not call.body or not (media in ("application/json", "text/json") or media.endswith("+json")):
        return None
    if not plain_utf8(content_type):
        # A server honouring charset=utf-7 (express.json does) reads other JSON than UTF-8 shows us, and
        # parsers disagree on quoted or repeated parameters: only one spelling is taken.
        raise MappingError(f"a JSON body must be UTF-8, sent as {media} or {media}; charset=utf-8, "
                           f"not {content_type[:100]!r}", 415)
    _check_json_size(call, max_bytes)
    try:
        # Decoded as UTF-8 first: json.loads would guess UTF-16 or UTF-32 from the bytes.
        text = call.body.decode("utf-8")
        # A BOM is not JSON. The decoder refuses it anyway ("Expecting value"); this says why, in the
        # words json.loads used before one decoder was built once.
        if text.startswith("\ufeff"):
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        parsed = _STRICT_JSON.decode(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MappingError(f"body is declared as JSON but does not parse as UTF-8 JSON: {exc}") from exc
    except RecursionError:
        raise MappingError("JSON body nests too deeply to be checked") from None
    if isinstance(parsed, dict):
        _check_json_overrides(parsed)
    return parsed


def _check_json_size(call: Call, max_bytes: int) -> None:
    if len(call.body) > max_bytes:
        # Dropping the body would let an agent pad a call past any body-based policy; refuse instead.
        raise MappingError(
            f"JSON body of {len(call.body)} bytes exceeds the {max_bytes}-byte inspection limit", 413
        )


def _check_json_overrides(parsed: Mapping[str, object]) -> None:
    # Laravel reads a JSON body's `_method` as a form's, and Express apps often do.
    parameter = next((k for k in parsed if ambiguity.is_method_parameter(k)), None)
    if parameter is not None:
        raise MappingError(ambiguity.override_problem("JSON body", parameter))


_PLAIN_UTF8 = re.compile(r'[^;"]+(;\s*charset\s*=\s*("utf-?8"|utf-?8)\s*)?', re.I)


def plain_utf8(content_type: str) -> bool:
    """Whether a media type says UTF-8 in the one way every parser reads alike: no parameters, or a
    single `charset=utf-8`."""
    return _PLAIN_UTF8.fullmatch(content_type.strip()) is not None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # {"amount": 1, "amount": 9999}: parsers disagree on which wins, so a policy could see the other one.
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        # set.add returns None: `or seen.add(k)` notes k and is false.
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"key {repeated!r} appears more than once")
    if len(found) > 1 and ambiguity.has_colliding_keys(found):
        # Go's encoding/json, ASP.NET and Jackson (as configured) match keys ignoring case, and the last
        # one wins: {"name": "search_issues", "NAME": "transfer_repository"} (CVE-2026-27896).
        first, second = ambiguity.colliding_keys(found) or ("", "")
        raise MappingError(f"the JSON body has keys {first!r} and {second!r}, one name to servers that match "
                           "keys ignoring case (which take the last); send each key once, in one spelling")
    return found


# json.loads with a hook builds a decoder and its scanner on every call: one, built once, parses every
# body (it keeps no state between documents).
_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_unique_keys)


def to_cedar_value(value: Any, depth: int = 0) -> Any:
    """Convert parsed JSON to Cedar's JSON value form.

    Cedar has no null and no floats: nulls are dropped from records, floats become `decimal` when
    Cedar can hold them exactly enough (4 places) and strings otherwise, and integers outside Cedar's
    64-bit Long become strings. Anything else Cedar would reject fails the call, not the policy.
    """
    if depth > MAX_BODY_DEPTH:
        raise MappingError(f"JSON body nests deeper than {MAX_BODY_DEPTH} levels")
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value if CEDAR_LONG_MIN <= value <= CEDAR_LONG_MAX else str(value)
    if isinstance(value, float):
        as_decimal = decimal_of_float(value)
        return repr(value) if as_decimal is None else as_decimal
    if isinstance(value, list):
        return [to_cedar_value(v, depth + 1) for v in value if v is not None]
    if isinstance(value, dict):
        if CEDAR_ESCAPES.intersection(value):
            raise MappingError(f"JSON body uses a key reserved by Cedar ({', '.join(CEDAR_ESCAPES & set(value))})")
        return {k: to_cedar_value(v, depth + 1) for k, v in value.items() if v is not None}
    raise MappingError(f"JSON value of type {type(value).__name__} cannot be mapped")

