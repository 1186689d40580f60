"""A narrowed forbid: the Cedar text that would stop an `@escalate` forbid asking about calls that its
reviewers approve every time, for an operator to review (never applied by cedargate itself).

In Cedar a forbid overrides every permit, so no permit can stop an escalating forbid from asking; the
forbid itself must match less. `narrowed_forbid` takes the policy's own text (found in its file by its
@id, annotations and conditions kept) and adds an `unless` clause listing the (principal, action,
resource) combinations that were approved: exactly those when they are few, else each one's set of
values (which admits their combinations too), and a dimension with too many values is left out (which
admits any value of it). What the calls carried (their context: amounts, paths) is not looked at: the
operator decides whether that matters. The result is validated against the bundle's schema, so what is
printed parses and validates as it stands.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import cedarpy

from proxy.cedar.policy import PolicyBundle, split_statements

MAX_COMBINATIONS = 12  # exact (principal, action, resource) combinations listed before sets are used
MAX_VALUES = 20  # values of one dimension listed before it is left unconstrained

Entity = tuple[str, str]  # (type, id), e.g. ("Host", "127.0.0.1")
Combination = tuple[Entity, Entity, Entity]  # principal, action, resource
_LITERAL = re.compile(r'^(?P<type>[A-Za-z_][A-Za-z0-9_]*(?:::[A-Za-z_][A-Za-z0-9_]*)*)::"(?P<id>(?:[^"\\]|\\.)*)"$')


class NarrowingError(Exception):
    """No narrowed forbid can be given; the message says why."""


@dataclass(frozen=True)
class Narrowed:
    policy_id: str
    text: str  # the whole policy, narrowed, ending in `;`
    condition: str  # its added `unless` clause's condition
    file: str
    exact: bool  # the unless clause lists exactly the approved combinations (no set widened them)
    unconstrained: tuple[str, ...]  # dimensions left out for having too many values


def entity(literal: str) -> Entity:
    """`Host::"127.0.0.1"` as (type, id); raises NarrowingError for anything else."""
    match = _LITERAL.match(literal.strip())
    if match is None:
        raise NarrowingError(f"{literal!r} is not a Cedar entity literal like Type::\"id\"")
    return match.group("type"), _unescape(match.group("id"))


def narrowed_forbid(bundle: PolicyBundle, policy_id: str, approved: Iterable[Combination], *,
                    note: str = "") -> Narrowed:
    """The forbid `policy_id` of `bundle` with an `unless` clause for the `approved` combinations, validated
    against the bundle's schema; `note` becomes a comment above it. Raises NarrowingError saying why not."""
    info = bundle.policies.get(policy_id)
    if info is None:
        raise NarrowingError(f'policy "{policy_id}" is not in {bundle.directory} any more')
    if info.effect != "forbid":
        raise NarrowingError(f'policy "{policy_id}" is a {info.effect}, not a forbid')
    combinations = sorted(set(approved))
    if not combinations:
        raise NarrowingError(f'no approved request of "{policy_id}" to narrow it by')
    original = _statement(bundle, info.file, policy_id)
    condition, exact, unconstrained = _condition(combinations)
    body = original.rstrip()
    assert body.endswith(";")  # split_statements ends a statement at its `;`
    comment = "".join(f"// {line}\n" for line in note.splitlines() if line.strip())
    text = f"{comment}{body[:-1].rstrip()}\nunless {{\n  {condition}\n}};"
    validation = cedarpy.validate_policies(text, bundle.schema)
    if not validation.validation_passed:
        errors = "; ".join(str(e.error) for e in validation.errors)
        raise NarrowingError(f'the narrowed "{policy_id}" does not validate against the schema: {errors}')
    return Narrowed(policy_id, text, condition, info.file, exact, unconstrained)


def exempts(narrowed: Narrowed, combinations: Iterable[Combination]) -> list[bool]:
    """For each combination, whether the narrowed forbid's `unless` clause exempts it (Cedar decides, on that
    clause alone: it reads only principal, action and resource, whatever else the call carried)."""
    probe = cedarpy.PolicySet.from_str("permit (principal, action, resource);\n"
                                       f"forbid (principal, action, resource) unless {{ {narrowed.condition} }};")
    exempt = []
    for (ptype, pid), (atype, aid), (rtype, rid) in combinations:
        request = {"principal": {"type": ptype, "id": pid}, "action": {"type": atype, "id": aid},
                   "resource": {"type": rtype, "id": rid}, "context": {}}
        exempt.append(cedarpy.is_authorized(request, probe, []).decision == cedarpy.Decision.Allow)
    return exempt


def _statement(bundle: PolicyBundle, file: str, policy_id: str) -> str:
    try:
        source = (bundle.directory / file).read_text(encoding="utf-8")
    except OSError as exc:
        raise NarrowingError(f"{bundle.directory / file} cannot be read: {exc}") from exc
    for _, statement in split_statements(source):
        try:
            parsed = cedarpy.policies_to_pst(statement)
        except ValueError:
            continue
        if any(t.annotations.get("id") == policy_id for t in parsed.static_policies.values()):
            return _without_leading_comments(statement)
    raise NarrowingError(f'policy "{policy_id}" is no longer in {bundle.directory / file}')


def _without_leading_comments(statement: str) -> str:
    lines = statement.splitlines()
    while lines and (not lines[0].strip() or lines[0].strip().startswith("//")):
        lines.pop(0)
    return "\n".join(lines)


def _condition(combinations: list[Combination]) -> tuple[str, bool, tuple[str, ...]]:
    """The `unless` condition exempting `combinations`, whether it is exact, and the dimensions left out."""
    names = ("principal", "action", "resource")
    if len(combinations) <= MAX_COMBINATIONS:
        each = [" && ".join(f"{name} == {_literal(value)}" for name, value in zip(names, combo, strict=True))
                for combo in combinations]
        return "\n  || ".join(f"({c})" for c in each), True, ()
    parts, left_out = [], []
    for index, name in enumerate(names):
        values = sorted({combo[index] for combo in combinations})
        if len(values) > MAX_VALUES:
            left_out.append(name)
            continue
        parts.append("(" + " || ".join(f"{name} == {_literal(v)}" for v in values) + ")")
    return ("\n  && ".join(parts) if parts else "true"), False, tuple(left_out)


def _literal(value: Entity) -> str:
    return f'{value[0]}::"{_escape(value[1])}"'


def _escape(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif unicodedata.category(ch)[0] in "CZ" and ch != " ":
            # Control, format (bidi overrides), separators: escaped, so the printed text shows what it is.
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    return "".join(out)


def _unescape(text: str) -> str:
    return re.sub(r'\\(["\\])', r"\1", text)
