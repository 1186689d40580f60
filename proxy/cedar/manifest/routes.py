"""The manifest compiled: which route, MCP endpoint or host a call is, matched in one regex per method."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from proxy.cedar.manifest.spec import PLACEHOLDER, HostSpec, ManifestSpec, McpEndpointSpec, RouteSpec
from proxy.vocabulary.folds import fold_key
from proxy.vocabulary.hosts import canonical_host

# In `Manifest.argument_folds`, a fold no spelling of which is right: two names policies read fold to it.
AMBIGUOUS = ""


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

    def __init__(self, spec: ManifestSpec, read_arguments: Iterable[tuple[str, ...]] = ()) -> None:
        self.spec = spec
        self._exact: dict[str, _HostRoutes] = {}
        self._globs: list[tuple[str, _HostRoutes]] = []
        for host in spec.hosts:
            compiled = _compile(host)
            if any(c in host.host for c in "*?["):
                self._globs.append((host.host.lower(), compiled))
            else:  # spelled as calls' hosts are: "API.Example." and "127.1" name the hosts they are
                self._exact[canonical_host(host.host)] = compiled
        # Read by every tools/call: gathered once (the spec is frozen), not walked over every tool per call.
        self._argument_types: Mapping[str, str] = MappingProxyType(
            {n: a.type for e in self.mcp_endpoints for t in e.tools.values() for n, a in t.arguments.items()})
        # Servers that match JSON keys ignoring case (Go's encoding/json) bind "Amount" to a declared
        # `amount`: a tools/call refuses an argument spelled so, found by its fold. Argument names are
        # ASCII identifiers (spec._NAME), whose fold (proxy.vocabulary.folds.fold_key) is their lower();
        # no two fold alike (checked at load).
        folds = {n.lower(): n for n in self._argument_types}
        # Names the policies read that no tool declares (`context.arguments has query && ...query`) are
        # spelled as read, too. A declared name keeps its spelling (the manifest says what the server
        # takes); two read names of one fold leave no right spelling: AMBIGUOUS refuses every key of it.
        # Not refused at load, as two declared names are: existing policy sets would stop loading.
        read: dict[str, str] = {}
        # Keys of nested records the policies read (`context.arguments.opts.force`), by the path of their
        # record: a server that matches keys ignoring case binds {"opts": {"Force": true}} to that force too.
        nested: dict[tuple[str, ...], dict[str, str]] = {}
        for path in sorted(read_arguments):
            fold = fold_key(path[-1])
            if len(path) > 1:
                within = nested.setdefault(path[:-1], {})
                within[fold] = path[-1] if within.setdefault(fold, path[-1]) == path[-1] else AMBIGUOUS
            elif fold not in folds:
                read[fold] = path[0] if read.setdefault(fold, path[0]) == path[0] else AMBIGUOUS
        self._argument_folds: Mapping[str, str] = MappingProxyType(folds | read)
        self._nested_argument_folds: Mapping[tuple[str, ...], Mapping[str, str]] = MappingProxyType(
            {path: MappingProxyType(within) for path, within in nested.items()})

    def reading(self, read_arguments: Iterable[tuple[str, ...]]) -> Manifest:
        """This manifest, its argument folds also holding the paths `read_arguments` (policies read)."""
        return Manifest(self.spec, read_arguments)

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
    def argument_types(self) -> Mapping[str, str]:
        """Each declared tool argument's type; one name has one type across all tools (checked at load)."""
        return self._argument_types

    @property
    def argument_folds(self) -> Mapping[str, str]:
        """Each declared tool argument's name by its fold: the spelling a call must use for it."""
        return self._argument_folds

    @property
    def nested_argument_folds(self) -> Mapping[tuple[str, ...], Mapping[str, str]]:
        """For each nested record of the arguments the policies read into (its path from the arguments),
        the names they read in it by their fold: the spelling a call must use there."""
        return self._nested_argument_folds

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
    for placeholder in PLACEHOLDER.finditer(template):
        parts.append((template[last:placeholder.start()], placeholder.group(1)))
        last = placeholder.end()
    parts.append((template[last:], None))
    return parts


