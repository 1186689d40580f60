"""A matched route's fields read from the call and typed as Cedar values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.cedar.context import (
    DECIMAL_TEXT,
    decimal,
    is_decimal,
)
from proxy.cedar.manifest.routes import RouteMatch
from proxy.cedar.manifest.spec import FieldError, FieldSpec


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


