"""The action manifest: what a call *does*, in the operator's words, instead of a method and a path.

`policies/actions.yaml` maps calls on a host to named Cedar actions:

    hosts:
      - host: api.payments.example            # exact, or a glob: "*.payments.example"
        unknown: refuse                       # a call matching no route: refuse (default) or http
        routes:
          - route: POST /v1/refunds/{order_id}
            action: process_refund
            severity: high                    # classification, shown to policies as context
            reversible: false
            fields:
              order_id: {from: path, type: String}
              amount:   {from: body, at: amount, type: Decimal}
              currency: {from: body, at: currency, type: String, required: false}

A route's fields become typed Cedar context (`context.amount > decimal("500.0")`), and its
classification `context.severity` and `context.reversible`. On a host that has a manifest, a call that
matches no route is an *unknown action* and is refused, because nobody has classified its risk, unless
the host says `unknown: http`. `schema_text` writes the Cedar schema of the manifest's actions so that
policies are validated against exactly the context the proxy sends. Errors name file, entry and field.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from proxy.cedar.context import (
    CALL_TOOL,
    DECIMAL_TEXT,
    MCP_RPC,
    METHODS,
    RESERVED,
    ROUTE_CONTEXT,
    decimal,
    is_decimal,
    schema_lines,
)
from proxy.vocabulary.hosts import canonical_host

MANIFEST_FILE = "actions.yaml"
MANIFEST_SCHEMA_FILE = "actions.cedarschema"  # written by `cedargate schema`, loaded with the others
FIELD_TYPES = {"String": "String", "Long": "Long", "Decimal": "decimal", "Bool": "Bool"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# MCP tool names (and cedargate's server names): one Cedar id "server/tool" must name exactly one tool.
TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}\Z")  # \Z, not $: "refund\n" is not a tool name
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
MCP_ACTIONS = ("mcp", "call_tool", "mcp_rpc")  # the actions of the MCP mapping (see proxy.calls.mcp)


class ManifestError(Exception):
    """The manifest cannot be used; the message names file, entry and field."""


class FieldError(Exception):
    """A call lacks a field its route needs, or has it in the wrong type; the call is refused."""


class FieldSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    source: Literal["path", "query", "body"] = Field(alias="from")
    at: str | None = None  # the query parameter, or the body's dotted key; default: the field's name
    type: Literal["String", "Long", "Decimal", "Bool"] = "String"
    required: bool = True


class RouteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    route: str
    action: str
    severity: Literal["low", "medium", "high", "critical"] = "medium"
    reversible: bool = True
    groups: tuple[str, ...] = ()  # Cedar action groups the action belongs to, e.g. ["write"]
    fields: dict[str, FieldSpec] = {}

    @field_validator("route")
    @classmethod
    def _route(cls, value: str) -> str:
        method, _, path = value.strip().partition(" ")
        if method.upper() not in METHODS or not path.startswith("/"):
            raise ValueError(f"{value!r} must be 'METHOD /path/{{param}}', METHOD one of {', '.join(METHODS)}")
        return f"{method.upper()} {path.strip()}"

    @field_validator("action")
    @classmethod
    def _action(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"action {value!r} must be a name like process_refund")
        return value

    @model_validator(mode="after")
    def _fields(self) -> RouteSpec:
        params = set(_PLACEHOLDER.findall(self.route))
        for name, spec in self.fields.items():
            if not _NAME.match(name) or name in RESERVED:
                raise ValueError(f"field {name!r} must be a name and not one of {', '.join(sorted(RESERVED))}")
            if spec.source == "path" and (spec.at or name) not in params:
                raise ValueError(f"field {name!r} reads path parameter {{{spec.at or name}}}, "
                                 f"which {self.route!r} does not have")
        return self

    @property
    def method(self) -> str:
        return self.route.split(" ", 1)[0]

    @property
    def template(self) -> str:
        return self.route.split(" ", 1)[1]


class ArgumentSpec(BaseModel):
    """A tool argument given a Cedar type, so policies can compare it (`context.arguments.amount`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["String", "Long", "Decimal", "Bool"] = "String"
    required: bool = True


def _tool_name(value: str) -> str:
    if not TOOL_NAME.match(value):
        raise ValueError(f"{value!r} must be 1 to 128 letters, digits, _ . or -")
    return value


def _argument_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"argument {value!r} must be a name like order_id")
    return value


ToolName = Annotated[str, AfterValidator(_tool_name)]  # a tool's or a server's name
ArgumentName = Annotated[str, AfterValidator(_argument_name)]


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    severity: Literal["low", "medium", "high", "critical"] = "medium"
    reversible: bool = True
    arguments: dict[ArgumentName, ArgumentSpec] = {}


class McpEndpointSpec(BaseModel):
    """An MCP server behind one URL path (streamable HTTP): its calls are tool calls, not POSTs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    server: ToolName  # names the server in policies: McpServer::"github", Tool::"github/delete_repository"
    unknown_tools: Literal["refuse", "policy"] = "refuse"
    tools: dict[ToolName, ToolSpec] = {}

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or "{" in value or "?" in value:
            raise ValueError(f"{value!r} must be a literal path like /mcp")
        return value


class HostSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    unknown: Literal["refuse", "http"] = "refuse"
    routes: list[RouteSpec] = []
    mcp: list[McpEndpointSpec] = []


class ManifestSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hosts: list[HostSpec] = []


@dataclass(frozen=True)
class RouteMatch:
    route: RouteSpec
    params: Mapping[str, str]


@dataclass(frozen=True)
class _HostRoutes:
    spec: HostSpec
    # One alternation per method: `re` tries the routes in C, and the outer group names the route.
    patterns: Mapping[str, re.Pattern[str]]
    routes: Mapping[str, RouteSpec]
    mcp: Mapping[str, McpEndpointSpec]  # by path


class Manifest:
    """Compiled routes by host; `match` answers which route (if any) a call is."""

    def __init__(self, spec: ManifestSpec) -> None:
        self.spec = spec
        self._exact: dict[str, _HostRoutes] = {}
        self._globs: list[tuple[str, _HostRoutes]] = []
        for host in spec.hosts:
            compiled = _compile(host)
            if any(c in host.host for c in "*?["):
                self._globs.append((host.host.lower(), compiled))
            else:  # spelled as calls' hosts are: "API.Example." and "127.1" name the hosts they are
                self._exact[canonical_host(host.host)] = compiled

    @property
    def actions(self) -> dict[str, RouteSpec]:
        return {r.action: r for h in self.spec.hosts for r in h.routes}

    def host(self, host: str) -> _HostRoutes | None:
        found = self._exact.get(host)
        if found is None:
            found = next((c for pattern, c in self._globs if fnmatch.fnmatchcase(host, pattern)), None)
        return found

    @property
    def mcp_endpoints(self) -> list[McpEndpointSpec]:
        return [e for h in self.spec.hosts for e in h.mcp]

    def mcp_endpoint(self, host: str, path: str) -> McpEndpointSpec | None:
        routes = self.host(host)
        return routes.mcp.get(path) if routes is not None else None

    def mcp_lookalike(self, host: str, path: str) -> McpEndpointSpec | None:
        """An endpoint `path` is not, but which servers may take it for: /MCP, /mcp/ or /mcp;x for /mcp."""
        routes = self.host(host)
        if routes is None or not routes.mcp:
            return None
        folded = path.split(";", 1)[0].lower().rstrip("/")  # servers that drop ;parameters see /mcp too
        return next((e for p, e in routes.mcp.items() if p.lower().rstrip("/") == folded), None)

    @property
    def argument_types(self) -> dict[str, str]:
        """Each declared tool argument's type; one name has one type across all tools (checked at load)."""
        return {n: a.type for e in self.mcp_endpoints for t in e.tools.values() for n, a in t.arguments.items()}

    def match(self, host: str, method: str, path: str) -> tuple[HostSpec | None, RouteMatch | None]:
        """(the host's spec or None if the host has no manifest, the matching route or None)."""
        routes = self.host(host)
        if routes is None:
            return None, None
        pattern = routes.patterns.get(method.upper())
        found = pattern.fullmatch(path) if pattern else None
        if not found:
            return routes.spec, None
        key = found.lastgroup
        assert key is not None  # each route's alternative is a named group
        route = routes.routes[key]
        prefix = f"{key}_"
        params = {name[len(prefix):]: value for name, value in found.groupdict().items()
                  if value is not None and name.startswith(prefix)}
        return routes.spec, RouteMatch(route, params)


def _compile(host: HostSpec) -> _HostRoutes:
    by_method: dict[str, list[str]] = {}
    routes: dict[str, RouteSpec] = {}
    for index, route in enumerate(host.routes):
        key = f"r{index}"
        routes[key] = route
        regex = ""
        for literal, name in _split_template(route.template):
            regex += re.escape(literal)
            if name:
                regex += f"(?P<{key}_{name}>[^/]+)"
        by_method.setdefault(route.method, []).append(f"(?P<{key}>{regex})")
    return _HostRoutes(host, {m: re.compile("|".join(alts)) for m, alts in by_method.items()}, routes,
                       {endpoint.path: endpoint for endpoint in host.mcp})


def _split_template(template: str) -> list[tuple[str, str | None]]:
    parts, last = [], 0
    for placeholder in _PLACEHOLDER.finditer(template):
        parts.append((template[last:placeholder.start()], placeholder.group(1)))
        last = placeholder.end()
    parts.append((template[last:], None))
    return parts


def load_manifest(directory: str | Path) -> Manifest | None:
    """The directory's manifest, or None when it has none."""
    path = Path(directory) / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path.name}: cannot be read as YAML: {exc}") from exc
    try:
        spec = ManifestSpec.model_validate(raw)
    except ValidationError as exc:
        problems = [f"  {_where(raw, e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ManifestError(f"{path.name} has bad entries:\n" + "\n".join(problems)) from exc
    actions: dict[str, RouteSpec] = {}
    for h, host in enumerate(spec.hosts):
        for r, route in enumerate(host.routes):
            earlier = actions.setdefault(route.action, route)
            if earlier is not route and _context_of(earlier) != _context_of(route):
                raise ManifestError(
                    f"{path.name}: hosts[{h}].routes[{r}] ({route.route}): action {route.action!r} is used "
                    "elsewhere with other fields or classification; one action, one context"
                )
            if route.action in MCP_ACTIONS:
                raise ManifestError(f"{path.name}: hosts[{h}].routes[{r}] ({route.route}): action "
                                    f"{route.action!r} is cedargate's own MCP action; choose another name")
        paths = [e.path for e in host.mcp]
        for e, endpoint in enumerate(host.mcp):
            if paths.count(endpoint.path) > 1:
                raise ManifestError(f"{path.name}: hosts[{h}].mcp[{e}]: path {endpoint.path!r} appears twice")
    argument_types: dict[str, tuple[str, str]] = {}
    for endpoint in (e for host in spec.hosts for e in host.mcp):
        for tool, tool_spec in endpoint.tools.items():
            for name, argument in tool_spec.arguments.items():
                where = f"{endpoint.server}/{tool}"
                first = argument_types.setdefault(name, (argument.type, where))
                if first[0] != argument.type:
                    # All tools share one Cedar context type, so an argument name has one type.
                    raise ManifestError(
                        f"{path.name}: tool {where!r}: argument {name!r} is a {argument.type} here but a "
                        f"{first[0]} in {first[1]!r}; one argument name, one type"
                    )
    return Manifest(spec)


def _where(raw: Any, loc: tuple[int | str, ...]) -> str:
    """hosts[0].routes[2] (POST /v1/x).fields.amount: readable, with the route named."""
    out, node = "", raw
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict) and "route" in node:
                out += f" ({node['route']})"
        else:
            out += ("." if out else "") + str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out


def _context_of(route: RouteSpec) -> tuple[object, ...]:
    return (route.severity, route.reversible, tuple(sorted(route.groups)),
            tuple(sorted((n, f.type, f.required) for n, f in route.fields.items())))


def extract_fields(match: RouteMatch, query: Mapping[str, str | list[str]], body: Any) -> dict[str, Any]:
    """The route's fields as Cedar values; FieldError names a missing or mistyped field."""
    values: dict[str, Any] = {"severity": match.route.severity, "reversible": match.route.reversible}
    for name, spec in match.route.fields.items():
        key = spec.at or name
        raw: Any
        if spec.source == "path":
            raw, present = match.params.get(key), key in match.params
            if present and any(c in raw for c in ";#"):
                # Servlet containers cut a segment at ";" and Node a target at "#": the server's value
                # would be shorter than the one the policy compares.
                raise FieldError(f"field {name!r} (path {{{key}}}) is {raw!r}: a path value cannot hold ';' "
                                 "or '#', which servers cut it at; percent-encode them")
        elif spec.source == "query":
            raw, present = query.get(key), key in query
        else:
            raw, present = _dig(body, key)
        if not present or raw is None:
            if spec.required:
                raise FieldError(f"field {name!r} ({spec.source} {key!r}) is required by {match.route.route}")
            continue
        values[name] = typed_value(name, spec, raw)
    return values


def _dig(body: Any, dotted: str) -> tuple[Any, bool]:
    node = body
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None, False
        node = node[part]
    return node, True


def typed_value(name: str, spec: FieldSpec, raw: Any) -> Any:
    from_text = spec.source != "body"  # path and query values arrive as text
    try:
        if spec.type == "String":
            if not isinstance(raw, str):
                raise ValueError("not a string")
            return raw
        if spec.type == "Bool":
            if isinstance(raw, bool):
                return raw
            if from_text and raw in ("true", "false"):
                return raw == "true"
            raise ValueError("not true or false")
        if spec.type == "Long":
            if isinstance(raw, bool):
                raise ValueError("a boolean")
            value = int(raw) if from_text or isinstance(raw, int) else _whole(raw)
            if not -(2**63) <= value < 2**63:
                raise ValueError("out of range")
            return value
        return _decimal(raw, from_text)
    except (ValueError, TypeError) as exc:
        raise FieldError(f"field {name!r} must be a {spec.type}: {raw!r} is {exc}") from None


def _whole(raw: Any) -> int:
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    raise ValueError("not a whole number")


def _decimal(raw: Any, from_text: bool) -> dict[str, Any]:
    if isinstance(raw, bool):
        raise ValueError("a boolean")
    if is_decimal(raw):  # already converted from JSON by the mapping
        return raw
    text = str(raw).strip() if from_text or isinstance(raw, (int, float)) else None
    if text is None or not DECIMAL_TEXT.fullmatch(text):
        raise ValueError("not a decimal with at most 4 places")
    return decimal(text)


def schema_text(manifest: Manifest) -> str:
    """The Cedar schema of the manifest's actions: HTTP context, classification and typed fields."""
    lines = ["// Written by `cedargate schema` from actions.yaml: regenerate it, do not edit it.", ""]
    for action, route in sorted(manifest.actions.items()):
        fields = [f'    "{n}"{"" if f.required else "?"}: {FIELD_TYPES[f.type]},'
                  for n, f in sorted(route.fields.items())]
        groups = f" in [{', '.join(g for g in route.groups)}]" if route.groups else ""
        lines += [
            f"action {action}{groups} appliesTo {{",
            "  principal: [Agent],",
            "  resource: [Host],",
            "  context: {",
            *schema_lines(ROUTE_CONTEXT),
            *fields,
            "  },",
            "};",
            "",
        ]
    if manifest.mcp_endpoints:
        lines += _mcp_schema(manifest)
    return "\n".join(lines)


def _mcp_schema(manifest: Manifest) -> list[str]:
    arguments: dict[str, str] = {}
    for endpoint in manifest.mcp_endpoints:
        for tool in endpoint.tools.values():
            arguments.update({n: FIELD_TYPES[a.type] for n, a in tool.arguments.items()})
    return [
        "// MCP (streamable HTTP): a tools/call is `call_tool` on Tool::\"<server>/<tool>\", which is in",
        "// McpServer::\"<server>\"; every other message on the endpoint is `mcp_rpc` on the McpServer.",
        "entity McpServer;",
        "entity Tool in [McpServer];",
        "",
        "// Arguments declared in actions.yaml, typed; a call's other arguments are present but untyped.",
        "type ToolArguments = {",
        *[f'  "{n}"?: {t},' for n, t in sorted(arguments.items())],
        "};",
        "",
        "action mcp;",
        "",
        "action call_tool in [mcp] appliesTo {",
        "  principal: [Agent],",
        "  resource: [Tool],",
        "  context: {",
        *schema_lines(CALL_TOOL),
        "  },",
        "};",
        "",
        "action mcp_rpc in [mcp] appliesTo {",
        "  principal: [Agent],",
        "  resource: [McpServer],",
        "  context: {",
        *schema_lines(MCP_RPC),
        "  },",
        "};",
        "",
    ]
