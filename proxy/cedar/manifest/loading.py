"""Reading actions.yaml: YAML, then the models, then the rules across entries; errors name file, entry, field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from proxy.cedar.manifest.routes import Manifest
from proxy.cedar.manifest.spec import MANIFEST_FILE, MCP_ACTIONS, ManifestError, ManifestSpec, RouteSpec


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
    spellings: dict[str, tuple[str, str]] = {}
    for endpoint in (e for host in spec.hosts for e in host.mcp):
        for tool, tool_spec in endpoint.tools.items():
            for name, argument in tool_spec.arguments.items():
                where = f"{endpoint.server}/{tool}"
                spelled = spellings.setdefault(name.lower(), (name, where))
                if spelled[0] != name:
                    # Servers that match JSON keys ignoring case read both as one argument, and a call
                    # may only spell an argument as declared (proxy.calls.mcp.mapping).
                    raise ManifestError(
                        f"{path.name}: tool {where!r}: argument {name!r} is {spelled[0]!r} of {spelled[1]!r} "
                        "in another case, one name to servers that match keys ignoring case; spell it one way"
                    )
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


