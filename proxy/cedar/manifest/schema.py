"""The Cedar schema of the manifest's actions, so policies are validated against the context sent."""

from __future__ import annotations

from proxy.cedar.context import (
    CALL_TOOL,
    HINT_FIELDS,
    MCP_RPC,
    ROUTE_CONTEXT,
    schema_lines,
)
from proxy.cedar.manifest.routes import Manifest
from proxy.cedar.manifest.spec import FIELD_TYPES


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
        "// The server's own annotations of a tool actions.yaml does not list (context.hints), from its tools/list",
        "// answers; MCP's cautious defaults for a hint it did not give, and for every hint while `listed` is",
        "// false. They may only add caution: a call is decided with and without them, the stricter answer wins.",
        "type ToolHints = {",
        *[f"  {n}: {t}," for n, t in HINT_FIELDS.items()],
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
