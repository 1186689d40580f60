"""What actions.yaml may say: its entries as pydantic models, each checked where it is read."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from proxy.cedar.context import (
    METHODS,
    RESERVED,
)

MANIFEST_FILE = "actions.yaml"
MANIFEST_SCHEMA_FILE = "actions.cedarschema"  # written by `cedargate schema`, loaded with the others
FIELD_TYPES = {"String": "String", "Long": "Long", "Decimal": "decimal", "Bool": "Bool"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# MCP tool names (and cedargate's server names): one Cedar id "server/tool" must name exactly one tool.
TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}\Z")  # \Z, not $: "refund\n" is not a tool name
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
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
        params = set(PLACEHOLDER.findall(self.route))
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


