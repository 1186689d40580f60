"""The condition index: which policies' `when` conditions can hold for a request, before Cedar runs.

Cedar evaluates a policy's clauses in order (`when { a && b } unless { c }` is `a && b && !c`), left to
right, stopping at the first false term or the first error. So when a policy's conditions *begin* with
tests this index can answer itself, exactly, for the request at hand, the index knows the start of
Cedar's evaluation: a test that is false, reached only through tests that are true, makes the policy
false with no error, and leaving the policy out changes neither the decision, nor the determining
policies, nor the errors Cedar reports. A test the index cannot answer (an attribute that is missing
or of a shape it does not know: Cedar may raise) stops the walk and keeps the policy.

The tests it answers, on `context`, `principal` or `resource` attributes (nested paths too):
`<attr> == <literal>` in either order (string, long and bool literals, or a `||` of them on one
attribute), `<value> has <attr>`, `<attr>.contains(<literal>)`, the negation of any of these (an
`unless` clause that is one such test), and `context.path like "/literal/prefix*..."`, which it answers
only as false (the path lacks the prefix) or unknown. Entity attributes are read as Cedar holds them
(the entity set with its schema applied), so answers on `principal`/`resource` depend on the entity
alone; answers on `context` depend on the request's `signature`, a small tuple that slices and cached
decisions are keyed by: the value of each compared attribute when some policy names it (or "another
value", or "cannot tell"), each other test's answer, and the indexed path prefixes the path has.
Within a scope, the policies whose first test compares a context attribute are filed by the literal
they name (`plan`), so the slice for a new value costs a lookup, not a walk over every rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cedarpy import pst

Uid = tuple[str, str]
# A Cedar value the index compares, with its type: ("String", "acme"), ("Long", 5), ("Bool", True).
Typed = tuple[str, object]

# Keys that make a JSON object an entity reference or an extension value, not a record.
_ESCAPES = frozenset({"__entity", "__extn", "__expr"})
_ROOTS = frozenset({"context", "principal", "resource"})
_LONG = range(-(2**63), 2**63)


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# What an attribute read gives when the index cannot know Cedar's answer (Cedar may raise), and a
# compared value that no policy's literal names.
UNKNOWN = _Marker("UNKNOWN")
OTHER = _Marker("OTHER")


@dataclass(frozen=True)
class _Entity:
    """The principal or resource itself: `.attr` reads its attributes, `has` asks for one."""

    attrs: Mapping[str, Any]


@dataclass(frozen=True)
class Equals:
    root: str
    path: tuple[str, ...]
    values: frozenset[Typed]


@dataclass(frozen=True)
class Has:
    root: str
    path: tuple[str, ...]
    attrs: tuple[str, ...]


@dataclass(frozen=True)
class Contains:
    root: str
    path: tuple[str, ...]
    value: Typed


@dataclass(frozen=True)
class Not:
    test: Equals | Has | Contains


@dataclass(frozen=True)
class PathPrefix:
    prefix: str


Test = Equals | Has | Contains | Not | PathPrefix
Answer = bool | None  # None: the index cannot tell; Cedar must evaluate the policy


def leading_tests(template: pst.Template) -> tuple[Test, ...]:
    """The tests Cedar evaluates first in this policy's conditions, up to the first one not indexable."""
    tests: list[Test] = []
    for clause in template.clauses:
        terms = _conjuncts(clause.expr) if isinstance(clause, pst.When) else [pst.UnaryOp("not", clause.expr)]
        for term in terms:
            test = _test_of(term)
            if test is None:
                return tuple(tests)
            tests.append(test)
            if isinstance(test, PathPrefix):  # never answered true: nothing after it is reached knowingly
                return tuple(tests)
    return tuple(tests)


def _conjuncts(expr: Any) -> list[Any]:
    if isinstance(expr, pst.BinaryOp) and expr.op == "and":
        return _conjuncts(expr.left) + _conjuncts(expr.right)
    return [expr]


def _test_of(expr: Any) -> Test | None:
    if isinstance(expr, pst.UnaryOp) and expr.op == "not":
        inner = _test_of(expr.arg)
        return Not(inner) if isinstance(inner, (Equals, Has, Contains)) else None
    if isinstance(expr, pst.BinaryOp) and expr.op == "eq":
        for read, literal in ((expr.left, expr.right), (expr.right, expr.left)):
            attribute, value = _attribute(read), _literal(literal)
            if attribute is not None and attribute[1] and value is not None:
                return Equals(attribute[0], attribute[1], frozenset({value}))
        return None
    if isinstance(expr, pst.BinaryOp) and expr.op == "or":
        # `a == "x" || a == "y"`: both sides read the same attribute, so the second adds no new error.
        left, right = _test_of(expr.left), _test_of(expr.right)
        if isinstance(left, Equals) and isinstance(right, Equals) and left.root == right.root \
                and left.path == right.path:
            return Equals(left.root, left.path, left.values | right.values)
        return None
    if isinstance(expr, pst.HasAttr):
        base = _attribute(expr.base)
        return Has(base[0], base[1], tuple(expr.attrs)) if base is not None else None
    if isinstance(expr, pst.BinaryOp) and expr.op == "contains":
        attribute, value = _attribute(expr.left), _literal(expr.right)
        if attribute is not None and value is not None:
            return Contains(attribute[0], attribute[1], value)
        return None
    if isinstance(expr, pst.Like) and _attribute(expr.base) == ("context", ("path",)):
        prefix = []
        for element in expr.pattern:
            if not isinstance(element, pst.Char):
                break
            prefix.append(element.value)
        return PathPrefix("".join(prefix)) if prefix else None
    return None


def _attribute(expr: Any) -> tuple[str, tuple[str, ...]] | None:
    """`context.a.b` as ("context", ("a", "b")); `principal` as ("principal", ())."""
    path: list[str] = []
    while isinstance(expr, pst.GetAttr):
        path.append(expr.attr)
        expr = expr.base
    if isinstance(expr, pst.Var) and expr.name in _ROOTS:
        return expr.name, tuple(reversed(path))
    return None


def _literal(expr: Any) -> Typed | None:
    if isinstance(expr, pst.StringLit):
        return ("String", expr.value)
    if isinstance(expr, pst.BoolLit):
        return ("Bool", expr.value)
    if isinstance(expr, pst.LongLit):
        return ("Long", expr.value)
    return None


def typed(value: Any) -> Typed | None:
    """A request or entity value as Cedar compares it; None for records, sets, entities, extensions."""
    kind = type(value)
    if kind is str:
        return ("String", value)
    if kind is bool:  # before int: True is an int to Python, never equal to 1 in Cedar
        return ("Bool", value)
    if kind is int and value in _LONG:
        return ("Long", value)
    return None


def _is_record(value: Any) -> bool:
    return isinstance(value, dict) and not _ESCAPES.intersection(value)


def _read(value: Any, path: Iterable[str]) -> Any:
    """What `value.a.b` gives, or UNKNOWN where Cedar would raise or the index cannot follow it."""
    for attr in path:
        if isinstance(value, _Entity):
            value = value.attrs.get(attr, UNKNOWN)
        elif _is_record(value):
            value = value.get(attr, UNKNOWN)
        else:  # a scalar or extension (Cedar raises), or an entity reference (a store lookup)
            return UNKNOWN
        if value is UNKNOWN:
            return UNKNOWN
    return value


def _has(value: Any, attrs: tuple[str, ...]) -> Answer:
    # `e has a.b` is `e has a && e.a has b`.
    for attr in attrs:
        fields = value.attrs if isinstance(value, _Entity) else value if _is_record(value) else None
        if fields is None:
            return None
        if attr not in fields:
            return False
        value = fields[attr]
    return True


def _contains(value: Any, wanted: Typed) -> Answer:
    if not isinstance(value, list):
        return None
    found: Answer = False
    for element in value:
        seen = typed(element)
        if seen == wanted:
            return True
        if seen is None and not isinstance(element, (dict, list)):
            found = None
    return found


def answer(test: Equals | Has | Contains, value: Any) -> Answer:
    """The test's answer on the value its path starts from (the request context or an entity)."""
    if isinstance(test, Has):
        base = _read(value, test.path)
        return None if base is UNKNOWN else _has(base, test.attrs)
    read = _read(value, test.path)
    if read is UNKNOWN:
        return None
    if isinstance(test, Contains):
        return _contains(read, test.value)
    value_typed = typed(read)
    return None if value_typed is None else value_typed in test.values


@dataclass(frozen=True)
class Scope:
    """The policies whose scope holds for a (principal, action, resource), laid out for `admits`."""

    ids: tuple[str, ...]
    walked: tuple[str, ...]  # every test walked, in id order
    # By signature position: the policies whose first test compares that attribute, by the literal
    # named, and all of them (when the request's value cannot be told).
    filed: Mapping[int, tuple[Mapping[Typed, tuple[str, ...]], tuple[str, ...]]]


class ConditionIndex:
    """The leading tests of every policy, answered per request from its signature and its entities."""

    def __init__(self, templates: Iterable[pst.Template], attributes_of: Callable[[Uid], Mapping[str, Any]]) -> None:
        self._attributes_of = attributes_of
        self.tests = {t.id: tests for t in templates if (tests := leading_tests(t))}
        # The context reads a request's signature is made of: the compared paths with the literals
        # any policy names for them, the other tests on the context, and the path prefixes.
        literals: dict[tuple[str, ...], set[Typed]] = {}
        others: set[Has | Contains] = set()
        prefixes: set[str] = set()
        for tests in self.tests.values():
            for test in tests:
                inner = test.test if isinstance(test, Not) else test
                if isinstance(inner, PathPrefix):
                    prefixes.add(inner.prefix)
                elif inner.root != "context":
                    continue
                elif isinstance(inner, Equals):
                    literals.setdefault(inner.path, set()).update(inner.values)
                else:
                    others.add(inner)
        self._compared = tuple((path, frozenset(values)) for path, values in literals.items())
        self._others = tuple(others)
        self.path_prefixes = frozenset(prefixes)
        # A path has an indexed prefix of length n when its first n characters are one: one slice per
        # distinct length, not one per character of the path.
        self._prefix_lengths = tuple(sorted({len(prefix) for prefix in prefixes}))
        # Where each read sits in a signature: a compared path by its path, another test by itself.
        self._position: dict[tuple[str, ...] | Has | Contains, int] = {
            path: i for i, (path, _) in enumerate(self._compared)}
        self._position.update({test: len(self._compared) + i for i, test in enumerate(self._others)})

    def signature(self, context: Mapping[str, Any] | None, path: str | None = None) -> tuple[Any, ...]:
        """What the index reads of a request's context. With no context (only the path known), every
        context test is taken as unknown, so policies it would decide stay in."""
        if context is None:
            values: list[Any] = [UNKNOWN] * (len(self._compared) + len(self._others))
        else:
            path = context.get("path")
            values = []
            for attr_path, names in self._compared:
                value = typed(_read(context, attr_path))  # None also when the read failed
                values.append(UNKNOWN if value is None else value if value in names else OTHER)
            values.extend(answer(test, context) for test in self._others)
        if not self.path_prefixes:
            values.append(None)
        elif not isinstance(path, str):
            values.append(UNKNOWN)
        else:
            values.append(frozenset(path[:n] for n in self._prefix_lengths
                                    if n <= len(path) and path[:n] in self.path_prefixes))
        return tuple(values)

    def plan(self, ids: tuple[str, ...]) -> Scope:
        """The policies of one scope, those whose first test compares a context attribute filed by
        the literals it names, so a request only walks the tests of those naming its value."""
        walked: list[str] = []
        filed: dict[int, dict[Typed, list[str]]] = {}
        for i in ids:
            first = self.tests.get(i, (None,))[0]
            if isinstance(first, Equals) and first.root == "context":
                by_value = filed.setdefault(self._position[first.path], {})
                for value in first.values:
                    by_value.setdefault(value, []).append(i)
            else:
                walked.append(i)
        return Scope(ids, tuple(walked), {
            position: ({v: tuple(named) for v, named in by_value.items()},
                       tuple(sorted({i for named in by_value.values() for i in named})))
            for position, by_value in filed.items()})

    def admits(self, scope: Scope, principal: Uid, resource: Uid, signature: tuple[Any, ...]) -> tuple[str, ...]:
        """The policies of the scope whose conditions may hold, or raise, for a request with this
        principal, resource and signature: those whose leading tests are not answered false."""
        entities = {"principal": _Entity(self._attributes_of(principal)),
                    "resource": _Entity(self._attributes_of(resource))}
        answers: dict[Test, Answer] = {}
        candidates = list(scope.walked)
        for position, (by_value, every) in scope.filed.items():
            value = signature[position]
            candidates.extend(every if value is UNKNOWN else () if value is OTHER else by_value.get(value, ()))
        kept = []
        for i in candidates:
            tests = self.tests.get(i)
            if tests is None or self._may_hold(tests, entities, signature, answers):
                kept.append(i)
        return tuple(sorted(kept)) if scope.filed else tuple(kept)

    def _may_hold(self, tests: tuple[Test, ...], entities: Mapping[str, _Entity], signature: tuple[Any, ...],
                  answers: dict[Test, Answer]) -> bool:
        for test in tests:
            known = answers.get(test, UNKNOWN)
            if known is UNKNOWN:
                known = answers[test] = self._answer(test, entities, signature)
            if known is False:
                return False
            if known is None:
                return True
        return True

    def _answer(self, test: Test, entities: Mapping[str, _Entity], signature: tuple[Any, ...]) -> Answer:
        if isinstance(test, Not):
            inner = self._answer(test.test, entities, signature)
            return None if inner is None else not inner
        if isinstance(test, PathPrefix):
            prefixes = signature[-1]
            return None if prefixes is UNKNOWN or test.prefix in prefixes else False
        if test.root != "context":
            return answer(test, entities[test.root])
        if isinstance(test, Equals):
            value = signature[self._position[test.path]]
            return None if value is UNKNOWN else value is not OTHER and value in test.values
        known: Answer = signature[self._position[test]]
        return known
