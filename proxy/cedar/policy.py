"""Loading a policy directory into one immutable, validated `PolicyBundle`.

A bundle is everything a decision needs from the operator: the Cedar schema, the policies (parsed
once into cedarpy handles), the entities, each policy's annotations, and a revision hash over all of
it. Loading either yields a complete bundle or raises `PolicyLoadError` naming file, line and policy
`@id`, so a caller can keep the last good bundle and never decide with half a set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cedarpy
from cedarpy import pst

from proxy.cedar.entities import implicit_parents
from proxy.cedar.escalation import AnnotationError, check_annotations
from proxy.cedar.manifest import MANIFEST_FILE, MANIFEST_SCHEMA_FILE, Manifest, ManifestError, load_manifest
from proxy.cedar.manifest import schema_text as manifest_schema
from proxy.vocabulary.hosts import canonical_host

ENTITIES_FILE = "entities.json"


class PolicyLoadError(Exception):
    """The policy directory cannot be used; the message says where and why."""


@dataclass(frozen=True)
class PolicyInfo:
    """What the proxy needs to know about one policy besides its Cedar text."""

    policy_id: str
    effect: str
    file: str
    line: int
    annotations: Mapping[str, str]

    @property
    def reason(self) -> str | None:
        return self.annotations.get("reason")


@dataclass(frozen=True)
class PolicyBundle:
    directory: Path
    revision: str
    schema: cedarpy.Schema
    policy_set: cedarpy.PolicySet
    templates: Mapping[str, pst.Template]
    policies: Mapping[str, PolicyInfo]
    entities: cedarpy.Entities
    entity_uids: frozenset[tuple[str, str]]
    files: tuple[str, ...] = field(default=())
    manifest: Manifest | None = None


def directory_signature(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """Cheap fingerprint (name, size, mtime) of the files a bundle is read from, for change polling."""
    sig = []
    for path in _bundle_files(directory):
        st = path.stat()
        sig.append((path.name, st.st_size, st.st_mtime_ns))
    return tuple(sig)


def _bundle_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.cedar")) + sorted(directory.glob("*.cedarschema"))
    for extra in (ENTITIES_FILE, MANIFEST_FILE):
        if (directory / extra).exists():
            files.append(directory / extra)
    return files


def load_bundle(directory: str | Path) -> PolicyBundle:
    directory = Path(directory)
    if not directory.is_dir():
        raise PolicyLoadError(f"policy directory {directory} does not exist or is not a directory")
    files = _bundle_files(directory)
    texts = {p.name: _read(p) for p in files}
    revision = hashlib.sha256(
        b"".join(name.encode() + b"\0" + text.encode() + b"\0" for name, text in texts.items())
    ).hexdigest()

    try:
        manifest = load_manifest(directory)
    except ManifestError as exc:
        raise PolicyLoadError(str(exc)) from exc
    if manifest is not None and texts.get(MANIFEST_SCHEMA_FILE) != manifest_schema(manifest):
        # Policies must be validated against the context the proxy will really send.
        raise PolicyLoadError(
            f"{MANIFEST_SCHEMA_FILE} does not match {MANIFEST_FILE}: run `cedargate schema {directory}`"
        )
    schema_names = [n for n in texts if n.endswith(".cedarschema")]
    if not schema_names:
        raise PolicyLoadError(f"{directory}: no *.cedarschema file; policies are validated against it")
    schema_text = "\n".join(texts[n] for n in schema_names)
    try:
        schema = cedarpy.Schema.from_str(schema_text)
    except ValueError as exc:
        raise PolicyLoadError(f"{', '.join(schema_names)}: schema does not parse: {exc}") from exc

    policy_names = [n for n in texts if n.endswith(".cedar")]
    if not policy_names:
        raise PolicyLoadError(f"{directory}: no *.cedar policy files")
    templates: dict[str, pst.Template] = {}
    infos: dict[str, PolicyInfo] = {}
    for name in policy_names:
        for info, template in _load_policy_file(name, texts[name], schema):
            if info.policy_id in infos:
                other = infos[info.policy_id]
                raise PolicyLoadError(
                    f"{name}:{info.line}: @id(\"{info.policy_id}\") is already used at {other.file}:{other.line}"
                )
            infos[info.policy_id] = info
            templates[info.policy_id] = template

    try:
        check_annotations(infos.values())
    except AnnotationError as exc:
        bad = infos.get(exc.policy_id) if exc.policy_id else None
        bad = bad or next((i for i in infos.values() if f'"{i.policy_id}"' in str(exc)), None)
        where = f"{bad.file}:{bad.line}: " if bad else ""
        raise PolicyLoadError(f"{where}{exc}") from exc
    policy_set = policy_set_of(templates.values())
    entities_json = texts.get(ENTITIES_FILE, "[]")
    entities, uids = _load_entities(entities_json, schema)
    if manifest is not None:
        manifest = manifest.reading(_argument_reads(templates.values()))
    return PolicyBundle(
        directory=directory,
        revision=revision,
        schema=schema,
        policy_set=policy_set,
        templates=templates,
        policies=infos,
        entities=entities,
        entity_uids=uids,
        files=tuple(texts),
        manifest=manifest,
    )


def record_fields(templates: Iterable[pst.Template], record: str) -> frozenset[str] | None:
    """The fields of `context.<record>` these policies read (`.field` or `has field`), or None if any
    uses the record (or `context`) otherwise, as a whole."""
    found: set[str] = set()
    stack: list[Any] = [clause.expr for t in templates for clause in t.clauses]
    while stack:
        node = stack.pop()
        if isinstance(node, (pst.GetAttr, pst.HasAttr)) and _is_context_record(node.base, record):
            found.add(node.attr if isinstance(node, pst.GetAttr) else node.attrs[0])
            continue
        if isinstance(node, pst.HasAttr) and isinstance(node.base, pst.Var) and node.base.name == "context":
            if node.attrs[0] == record and len(node.attrs) > 1:  # `context has local.hour`
                found.add(node.attrs[1])
            continue
        if _is_context_record(node, record) or isinstance(node, pst.Var) and node.name == "context":
            return None
        stack.extend(syntax_children(node))
    return frozenset(found)


def _is_context_record(node: Any, record: str) -> bool:
    return (isinstance(node, pst.GetAttr) and node.attr == record
            and isinstance(node.base, pst.Var) and node.base.name == "context")


def syntax_children(node: Any) -> Iterator[Any]:
    """A policy syntax node's sub-expressions: its dataclass fields, and those inside tuples and mappings."""
    if not dataclasses.is_dataclass(node):
        return
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if isinstance(value, tuple):
            yield from (v for v in value if dataclasses.is_dataclass(v))
        elif isinstance(value, Mapping):
            yield from (v for v in value.values() if dataclasses.is_dataclass(v))
        elif dataclasses.is_dataclass(value):
            yield value


def _argument_reads(templates: Iterable[pst.Template]) -> frozenset[tuple[str, ...]]:
    """The paths under `context.arguments` the policies read, undeclared ones too, and into nested
    records: ("force",) for `.force` or `has force`, ("opts",) and ("opts", "force") for `.opts.force`
    or `.opts has force`. Wherever a policy names them: one that also reads a record whole does not
    hide the names it reads besides."""
    found: set[tuple[str, ...]] = set()
    stack: list[Any] = [clause.expr for t in templates for clause in t.clauses]
    while stack:
        node = stack.pop()
        path = None
        if isinstance(node, pst.GetAttr):
            path = _context_path(node)
        elif isinstance(node, pst.HasAttr):
            base = _context_path(node.base)
            path = base + tuple(node.attrs) if base is not None else None
        if path is not None and path[:1] == ("arguments",):
            found.update(path[1:end] for end in range(2, len(path) + 1))
        stack.extend(syntax_children(node))
    return frozenset(found)


def _context_path(node: Any) -> tuple[str, ...] | None:
    """("arguments", "opts") for `context.arguments.opts`; () for `context`; None if not a path from it."""
    attrs: list[str] = []
    while isinstance(node, pst.GetAttr):
        attrs.append(node.attr)
        node = node.base
    return tuple(reversed(attrs)) if isinstance(node, pst.Var) and node.name == "context" else None


def policy_set_of(templates: Iterable[pst.Template]) -> cedarpy.PolicySet:
    """Build a cedarpy handle from PST policies whose ids are already their `@id`s."""
    return cedarpy.PolicySet.from_pst(
        pst.PolicySet(templates={}, static_policies={t.id: t for t in templates}, template_links=())
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyLoadError(f"{path}: cannot be read: {exc}") from exc


def _load_policy_file(name: str, text: str, schema: cedarpy.Schema) -> list[tuple[PolicyInfo, pst.Template]]:
    statements = split_statements(text)
    parsed: list[tuple[int, pst.Template]] = []
    for line, statement in statements:
        try:
            node = cedarpy.policies_to_pst(statement)
        except ValueError as exc:
            raise PolicyLoadError(f"{name}:{line}:{_id_hint(statement)} does not parse: {exc}") from exc
        if node.templates:
            raise PolicyLoadError(
                f"{name}:{line}:{_id_hint(statement)} is a template (?principal/?resource); "
                "cedargate needs concrete policies"
            )
        for template in node.static_policies.values():
            parsed.append((line, template))

    result: list[tuple[PolicyInfo, pst.Template]] = []
    for line, template in parsed:
        policy_id = template.annotations.get("id")
        if not policy_id:
            raise PolicyLoadError(f'{name}:{line}: policy has no @id("..."); every policy needs a stable id')
        info = PolicyInfo(policy_id, template.effect, name, line, dict(template.annotations))
        result.append((info, dataclasses.replace(template, id=policy_id)))

    by_id = {info.policy_id: info for info, _ in result}
    validation = cedarpy.validate_policies(text, schema)
    if not validation.validation_passed:
        problems = []
        for error in validation.errors:
            policy_id = validation.id_annotations_by_policy_id.get(error.policy_id, error.policy_id)
            where = by_id.get(policy_id)
            line = where.line if where else 1
            problems.append(f'{name}:{line}: @id("{policy_id}"): {error.error}')
        raise PolicyLoadError("policy does not validate against the schema:\n  " + "\n  ".join(problems))
    return result


def _id_hint(statement: str) -> str:
    match = re.search(r'@id\s*\(\s*"([^"]*)"', statement)
    return f' policy @id("{match.group(1)}")' if match else " policy"


def split_statements(text: str) -> list[tuple[int, str]]:
    """Split Cedar text into policies at top-level `;`, each with the line it starts on.

    cedarpy's parse errors carry no position; parsing policy by policy lets an error name its line.
    The scanner skips `//` comments and string literals so a `;` inside them does not split.
    """
    statements: list[tuple[int, str]] = []
    start = 0
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end == -1 else end
            continue
        if ch == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif ch == ";":
            statements.append(_statement(text, start, i + 1))
            start = i + 1
        i += 1
    tail = text[start:]
    if _strip_comments(tail).strip():
        statements.append(_statement(text, start, n))
    return statements


def _statement(text: str, start: int, end: int) -> tuple[int, str]:
    chunk = text[start:end]
    # Report the line of the first code, not of the blank lines and comments before it.
    offset = start
    for raw in chunk.splitlines(keepends=True):
        if raw.strip() and not raw.strip().startswith("//"):
            break
        offset += len(raw)
    return text.count("\n", 0, offset) + 1, chunk


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", text)


def _load_entities(text: str, schema: cedarpy.Schema) -> tuple[cedarpy.Entities, frozenset[tuple[str, str]]]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyLoadError(f"{ENTITIES_FILE}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
    if not isinstance(raw, list):
        raise PolicyLoadError(f"{ENTITIES_FILE}: must be a JSON list of entities")
    try:
        uids = frozenset((e["uid"]["type"], e["uid"]["id"]) for e in raw)
    except (KeyError, TypeError) as exc:
        raise PolicyLoadError(f'{ENTITIES_FILE}: every entity needs "uid": {{"type", "id"}}') from exc
    for entity_type, entity_id in uids:
        # Calls are mapped to the canonical host; a host listed any other way would never match.
        if entity_type == "Host" and canonical_host(entity_id) != entity_id:
            raise PolicyLoadError(
                f'{ENTITIES_FILE}: Host::"{entity_id}" must be written as the proxy sees it: '
                f'Host::"{canonical_host(entity_id)}"'
            )
    for entity in raw:
        uid = (entity["uid"]["type"], entity["uid"]["id"])
        if uid[0] != "Tool":
            continue
        # The proxy puts an unlisted tool in its server; a listed one must say so too, or a policy on
        # `resource in McpServer::"..."` would cover the tool only while it is not listed.
        server = implicit_parents(uid)[0]
        parents = {(p.get("type"), p.get("id")) for p in entity.get("parents", ()) if isinstance(p, dict)}
        if "/" not in uid[1] or server not in parents:
            raise PolicyLoadError(f'{ENTITIES_FILE}: Tool::"{uid[1]}" must be named "<server>/<tool>" and list '
                                  f'McpServer::"{server[1]}" among its parents')
    try:
        # Built with the schema so Cedar adds the schema's action entities and their groups.
        entities = cedarpy.Entities.from_json_str(text, schema=schema)
    except ValueError as exc:
        raise PolicyLoadError(f"{ENTITIES_FILE}: does not match the schema: {exc}") from exc
    return entities, uids
