"""Approve with changes: which values of a held call a reviewer may edit, checking an edit, and the
changed call. Plain data in, plain data out; the workflow decides whether the changed call may go.

A reviewer may change a call's typed values, never its shape: the action manifest's body fields of a
JSON call (`amount` of `POST /v1/refunds/{order_id}`, where the manifest says where in the body it is
and its type), and the scalar arguments of an MCP tool call (typed as actions.yaml declares them, else
by their JSON value). Path and query fields are not editable: they name what the call acts on, which
an approval with a different target would make a different call, not a changed amount.

`changed_body` rewrites the changed values in the JSON body and nothing else (for MCP, the tool call's
arguments in the JSON-RPC message), and `changed_call` gives the call carrying it, its Content-Length the new length:
that call is decided by policy again, and is what goes upstream. `mark_changed` adds
`_meta["cedargate/changes"]` to the MCP server's result for the changed message, so the agent's model
learns its call was changed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from proxy.calls.mapping import Call
from proxy.cedar.manifest import FieldError, FieldSpec, Manifest, typed_value
from proxy.vocabulary.hosts import canonical_host

# The response header naming the fields a reviewer changed, and the MCP result's _meta key with them.
CHANGED_HEADER = "Cedargate-Changed"
META_KEY = "cedargate/changes"


class ChangeError(Exception):
    """The changes cannot be made: `errors` names each field and what is wrong with it."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))
        self.errors = errors


@dataclass(frozen=True)
class EditableField:
    """A value of the call a reviewer may change: its name, Cedar type, value now, and where in the body."""

    name: str
    type: str  # "String", "Long", "Decimal" or "Bool"
    value: Any
    at: tuple[str, ...]  # the keys leading to it in the JSON body

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "value": self.value}


def editable_fields(manifest: Manifest | None, host: str, method: str, path: str, body: bytes) -> list[EditableField]:
    """The fields a reviewer may change in the call `method host path` carrying `body`; none when the
    body is not a JSON object or the manifest names no body field (or tool arguments) for the call."""
    if manifest is None:
        return []
    try:
        # As UTF-8, as the mapping reads a JSON body (json.loads would guess UTF-16 or -32 from the bytes),
        # and as `changed_body` rewrites it.
        parsed = json.loads(body.decode("utf-8")) if body else None
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(parsed, dict):
        return []
    host = canonical_host(host)
    if manifest.mcp_endpoint(host, path) is not None:
        return _tool_arguments(manifest, parsed)
    _, match = manifest.match(host, method, path)
    if match is None:
        return []
    fields = []
    for name, spec in match.route.fields.items():
        if spec.source != "body":
            continue
        at = tuple((spec.at or name).split("."))
        present, value = _dig(parsed, at)
        if present and _scalar(value):
            fields.append(EditableField(name, spec.type, value, at))
    return fields


def _tool_arguments(manifest: Manifest, message: dict[str, Any]) -> list[EditableField]:
    params = message.get("params")
    if message.get("method") != "tools/call" or not isinstance(params, dict):
        return []
    arguments = params.get("arguments")
    if not isinstance(arguments, dict):
        return []
    declared = manifest.argument_types  # one type per argument name across tools (checked at load)
    fields = []
    for name, value in arguments.items():
        if _scalar(value):
            kind = declared.get(name) or _json_type(value)
            fields.append(EditableField(name, kind, value, ("params", "arguments", name)))
    return fields


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "Bool"
    if isinstance(value, int):
        return "Long"
    if isinstance(value, float):
        return "Decimal"
    return "String"


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, bool, int, float))


def _dig(node: Any, at: tuple[str, ...]) -> tuple[bool, Any]:
    for key in at:
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def check_changes(fields: Iterable[EditableField], changes: Mapping[str, Any]) -> dict[str, Any]:
    """The changes, each checked against its field's type; raises ChangeError naming every field that
    is not editable or whose value has the wrong type."""
    by_name = {f.name: f for f in fields}
    errors = []
    for name, value in changes.items():
        found = by_name.get(name)
        if found is None:
            editable = ", ".join(sorted(by_name)) or "none"
            errors.append({"field": name, "message": f"not an editable field of this call (editable: {editable})"})
            continue
        problem = _type_problem(found, value)
        if problem:
            errors.append({"field": name, "message": problem})
    if errors:
        raise ChangeError(errors)
    return dict(changes)


def _type_problem(found: EditableField, value: Any) -> str | None:
    # JSON carries what the reviewer sent: a Decimal is a number, never text, as in the call's own body.
    if found.type == "Decimal" and isinstance(value, str):
        return f"must be a Decimal, given as a JSON number, not the text {value!r}"
    if found.type == "Long" and isinstance(value, float):
        return f"must be a Long (a whole number), not {value!r}"
    if value is None:
        return f"must be a {found.type}, not null"
    try:
        typed_value(found.name, FieldSpec.model_validate({"from": "body", "type": found.type}), value)
    except FieldError as exc:
        return str(exc).split(": ", 1)[-1]
    return None


def changed_body(body: bytes, fields: Iterable[EditableField], changes: Mapping[str, Any]) -> bytes:
    """`body` (a JSON object) with each changed field's value replaced, every other byte as it was.

    Not parsed and written again: that would change what nobody changed, what the reviewer saw (a number
    rounded to a float's 17 digits, one past a float's range written as `Infinity`, which is not JSON) or
    fail on a string the agent sent (a lone surrogate escape cannot be encoded as UTF-8).
    """
    text = body.decode("utf-8")
    by_name = {f.name: f for f in fields}
    spans = sorted((_span(text, by_name[name].at), name) for name in changes)
    parts, last = [], 0
    for (start, end), name in spans:
        if start < last:
            raise ChangeError([{"field": name, "message": "is the same value as another field changed"}])
        parts += [text[last:start], json.dumps(changes[name], allow_nan=False)]
        last = end
    parts.append(text[last:])
    return "".join(parts).encode()


_VALUE = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


def _skip(text: str, at: int) -> int:
    return _SPACE.match(text, at).end()  # type: ignore[union-attr]  # matches anywhere, if only ""


def _span(text: str, at: tuple[str, ...]) -> tuple[int, int]:
    """Where in the JSON text the value at the keys `at` starts and ends."""
    start, end = _skip(text, 0), len(text)
    for key in at:
        start, end = _members(text, start)[key]
    return start, end


def _members(text: str, at: int) -> dict[str, tuple[int, int]]:
    """Where each member's value of the JSON object at `at` starts and ends (of a repeated key, the last:
    the one json.loads keeps, and `editable_fields` shows)."""
    members: dict[str, tuple[int, int]] = {}
    at = _skip(text, at + 1)
    while text[at] != "}":
        key, at = _VALUE.raw_decode(text, at)
        at = _skip(text, _skip(text, at) + 1)  # past the colon
        _, end = _VALUE.raw_decode(text, at)
        members[key] = (at, end)
        at = _skip(text, end)
        if text[at] == ",":
            at = _skip(text, at + 1)
    return members


def changed_call(call: Call, body: bytes) -> Call:
    """`call` carrying `body`, its Content-Length (if it had one) the new body's length."""
    headers = {k: (str(len(body)) if k.lower() == "content-length" else v) for k, v in call.headers.items()}
    return replace(call, body=body, headers=headers)


def apply_changes(call: Call, fields: Iterable[EditableField], changes: Mapping[str, Any]) -> Call:
    return changed_call(call, changed_body(call.body, fields, changes))


def mark_changed(answer: Any, changed: Mapping[str, Mapping[str, Any]]) -> Any | None:
    """The MCP answer with `_meta["cedargate/changes"]` added to each result answering a changed message;
    `changed` maps the JSON-RPC id (as JSON text: 1 and "1" are different ids) of each to its changes.
    None if no result answers one."""
    marked = False
    for item in answer if isinstance(answer, list) else [answer]:
        if not isinstance(item, dict) or "method" in item:
            continue
        changes = changed.get(json.dumps(item.get("id")))
        result = item.get("result")
        if changes is not None and isinstance(result, dict):
            meta = result.get("_meta")
            result["_meta"] = {**(meta if isinstance(meta, dict) else {}), META_KEY: dict(changes)}
            marked = True
    return answer if marked else None


def value_from_text(text: str, kind: str | None) -> Any:
    """A change typed at a terminal (`--change amount=50`) as the JSON value its field's type takes; for a
    field the call does not have (`kind` None), read as JSON if it is, else as text (the API says why
    it is refused)."""
    if kind == "String":
        return text
    if kind == "Bool" and text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    if kind in ("Long", "Decimal"):
        number = text.strip()
        try:
            return int(number)
        except ValueError:
            pass
        if kind == "Decimal":
            try:
                return float(number)
            except ValueError:
                pass
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def changed_names(changes: Iterable[Mapping[str, Any]]) -> str:
    """The `Cedargate-Changed` header's value: the names of the fields changed (in any of the messages)."""
    return ", ".join(sorted({name for one in changes for name in one}))
