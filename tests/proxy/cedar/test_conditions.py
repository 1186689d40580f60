"""The condition index against Cedar: slicing on `when` tests never changes what Cedar says.

Generated policy sets whose conditions test context, principal and resource attributes (equalities in
either order, `||` of them, `has`, `contains`, negations, path prefixes), mixed with tests the index
cannot answer and tests that raise before or after an indexable one, are decided through
`Engine.evaluate` (sliced, cached) and by `cedarpy.is_authorized` on the whole set: the decision, the
determining policies and the errors must be the same. The calls carry bodies whose fields have the
compared values, other values, other types, or are missing, so every answer the index can give (and
every error Cedar can raise) is reached.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import cedarpy
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from proxy_support import POLICIES

from proxy.calls.mapping import Call, MappingError, MappingOptions, map_call
from proxy.cedar.conditions import ConditionIndex, Equals, Has, Not, PathPrefix, leading_tests
from proxy.cedar.engine import Engine
from tests.proxy.cedar.test_slicing import (
    ENTITIES,
    HOSTS,
    _direct,
    _policy_dir,
    calls,
    json_values,
    policy_texts,
    scratch,  # noqa: F401  (the fixture)
)

# The example schema with attributes to compare: on agents and hosts, and a typed JSON body.
SCHEMA = (
    (POLICIES / "schema.cedarschema").read_text()
    .replace("entity Agent in [Team];", "entity Agent in [Team] {\n  team: String,\n  level: Long,\n};")
    .replace("  tags: Set<String>,\n", "  tags: Set<String>,\n  env: String,\n  owner?: Agent,\n")
    .replace("  agent?: AgentStatements,\n",
             "  agent?: AgentStatements,\n  body: { customer: String, tier: Long, vip: Bool },\n")
)
ATTRIBUTES = {
    ("Agent", "ops-bot"): {"team": "ops", "level": 3},
    ("Agent", "dev-bot"): {"team": "dev", "level": 1},
    ("Agent", "both-bot"): {"team": "ops", "level": 2},
    ("Host", "localhost"): {"env": "dev"},
    ("Host", "127.0.0.1"): {"env": "prod", "owner": {"__entity": {"type": "Agent", "id": "ops-bot"}}},
    ("Host", "x"): {"env": "prod"},
}
ENTITIES_WITH_ATTRIBUTES = [
    {**e, "attrs": {**e["attrs"], **ATTRIBUTES.get((e["uid"]["type"], e["uid"]["id"]), {})}} for e in ENTITIES
]
AGENTS = ["ops-bot", "dev-bot", "both-bot", "stranger"]  # the stranger is unlisted: it has no attributes

CONDITIONS = [
    'context.body.customer == "acme"',
    '"globex" == context.body.customer',
    'context.body.customer == "acme" || context.body.customer == "initech"',
    'context.body has customer && context.body.customer == "globex"',
    'context has body && context.body has customer && context.body.customer == "acme"',
    "context.body.tier == 2",
    "context.body has tier && context.body.tier == 3",
    "context.body.vip == true",
    "context.body.vip == false",
    'context.method == "POST"',
    '"https" == context.scheme',
    'context.query == "force=1"',
    'context.headers has "user-agent" && context.headers["user-agent"] == "robot"',
    'resource.env == "prod"',
    'resource has env && resource.env == "dev"',
    'principal.team == "ops"',
    "principal has team",
    "principal.level == 3",
    'resource.tags.contains("dev")',
    'resource has owner && resource.owner == Agent::"ops-bot"',
    '!(context.body.customer == "acme")',
    # Not indexable, or raising before or after an indexable test (64-bit overflow for some ports).
    'context.body.customer like "ac*"',
    "context.body.vip",
    "principal.team == context.body.customer",
    'context.port * 4611686018427387904 > 0 && context.body.customer == "acme"',
    'context.body.customer == "acme" && context.port * 4611686018427387904 > 0',
    'context.body.tier + 9223372036854775000 > 0 && principal.team == "dev"',
    'context.path like "/v1/*" && context.body.customer == "acme"',
    'context.body.customer == "acme" && context.path like "/v1/*"',
    'context has agent && context.agent has confidence && context.agent.confidence.lessThan(decimal("0.8"))',
]
CUSTOMERS = ["acme", "globex", "initech", "zeta"]


# Field values of every kind: the compared ones, others of the same type, other types, records,
# sets, decimals (floats become decimals) and nothing at all.
_field_values = st.sampled_from([*CUSTOMERS, 2, 3, 7, True, False, 1.5, "2", None, ["acme"], {"customer": "acme"}])
bodies = st.one_of(
    st.fixed_dictionaries({}, optional={"customer": _field_values, "tier": _field_values, "vip": _field_values}),
    json_values,
)


def _engine(root: Path, texts: list[str]) -> Engine:
    return Engine(_policy_dir(root, texts, schema=SCHEMA, entities=ENTITIES_WITH_ATTRIBUTES))


def _agrees(engine: Engine, request) -> None:
    got, want = engine.evaluate(request), _direct(engine, request)
    assert got.decision == want.decision.value, request
    assert set(got.determining) == set(want.diagnostics.reasons), request
    assert set(got.errors) == set(want.diagnostics.errors), request


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=policy_texts(CONDITIONS, most=10, wide=True, clauses=3, terms=3),
       batch=st.lists(calls(agents=AGENTS, hosts=HOSTS, bodies=bodies), min_size=1, max_size=8))
def test_condition_sliced_evaluation_equals_cedar_on_the_full_set(scratch: Path, texts: list[str],  # noqa: F811
                                                                  batch: list[Call]):
    engine = _engine(scratch, texts)
    options = MappingOptions()
    for call in batch:
        try:
            request = map_call(call, options)
        except MappingError:
            continue
        snapshot = engine.snapshot
        scope = snapshot.scope_of(request.principal, request.action, request.resource)
        sliced = snapshot.slice_for(request.principal, request.action, request.resource,
                                    snapshot.conditions.signature(request.context))
        event("conditions left policies out" if len(sliced.ids) < len(scope.ids) else "conditions kept the scope")
        _agrees(engine, request)
        got = engine.evaluate(request)  # from the cache now
        event(f"decision {got.decision}" + (" with errors" if got.errors else ""))
        # What tools/list shows: "no call could be allowed" (read from the entities and path) must hold.
        if not snapshot.could_allow(request.principal, request.action, request.resource, request.context["path"]):
            event("could_allow: no call could be allowed")
            assert not got.allowed, request


def _refund(agent: str, body: object | None) -> Call:
    headers = {} if body is None else {"Content-Type": "application/json"}
    return Call(agent, "POST", "https", "localhost", 443, "/v1/refunds", headers=headers,
                body=b"" if body is None else json.dumps(body).encode())


def test_per_customer_rules_are_sliced_to_the_customer():
    """Many rules on one action that differ only in the customer: a call is decided against its own."""
    texts = ['@id("all-ok")\npermit (principal, action == Action::"post", resource)\n'
             'when { context.body.tier == 2 };\n']
    texts += [f'@id("rule-{n}")\nforbid (principal, action == Action::"post", resource)\n'
              f'when {{ context.body.customer == "c-{n}" && context.body.tier > {n} }};\n' for n in range(50)]
    with tempfile.TemporaryDirectory() as root:
        engine = _engine(Path(root), texts)
        snapshot = engine.snapshot
        for body, kept in (({"customer": "c-7", "tier": 2}, {"all-ok", "rule-7"}),
                           ({"customer": "nobody", "tier": 2}, {"all-ok"}),
                           ({"customer": 7, "tier": 2}, {"all-ok"}),  # another type: false, no error
                           ({"tier": 2}, {"all-ok", *(f"rule-{n}" for n in range(50))})):  # missing: errors
            request = map_call(_refund("ops-bot", body), MappingOptions())
            sliced = snapshot.slice_for(request.principal, request.action, request.resource,
                                        snapshot.conditions.signature(request.context))
            assert set(sliced.ids) == kept, body
            _agrees(engine, request)


def test_calls_whose_slices_differ_never_share_a_cached_decision():
    """A missing attribute keeps a rule (Cedar raises on it); another value drops it. Then both calls
    hand Cedar the same (empty) context: the decision cache must still tell them apart."""
    texts = ['@id("ok")\npermit (principal, action, resource);\n',
             '@id("acme-only")\nforbid (principal, action, resource) when { context.body.customer == "acme" };\n']
    with tempfile.TemporaryDirectory() as root:
        engine = _engine(Path(root), texts)
        missing = map_call(_refund("ops-bot", None), MappingOptions())  # no body: `context.body` raises
        other = map_call(_refund("ops-bot", {"customer": "globex", "tier": 2}), MappingOptions())
        assert engine.evaluate(missing).errors  # the forbid raised: no allow
        assert not engine.evaluate(other).errors and engine.evaluate(other).allowed
        for request in (missing, other):
            _agrees(engine, request)


def test_leading_tests_stop_where_the_index_cannot_answer():
    def tests(condition: str) -> tuple:
        policy = cedarpy.policies_to_pst(f"permit (principal, action, resource) {condition};")
        return leading_tests(next(iter(policy.static_policies.values())))

    acme = Equals("context", ("customer",), frozenset({("String", "acme")}))
    assert tests('when { "acme" == context.customer && context.n > 1 && context.x == 1 }') == (acme,)
    assert tests('when { context.n > 1 && context.customer == "acme" }') == ()
    assert tests('unless { context.customer == "acme" } when { context.x == 1 }') == (
        Not(acme), Equals("context", ("x",), frozenset({("Long", 1)})))
    assert tests('when { context has customer } when { principal.team == "ops" || principal.team == "dev" }') == (
        Has("context", (), ("customer",)),
        Equals("principal", ("team",), frozenset({("String", "ops"), ("String", "dev")})))
    # Nothing after a path prefix: the index answers it only as false.
    assert tests('when { context.path like "/v1/*" && context.x == 1 }') == (PathPrefix("/v1/"),)
    assert tests('when { context.customer == principal.team }') == ()
    assert tests('unless { context.a == 1 && context.b == 2 }') == ()


PREFIXES = ["/v1/", "/v1/volumes/", "/v", "/v1/volumes/vol-1", "/admin", "/v2"]


@settings(max_examples=300, deadline=None)
@given(path=st.one_of(st.sampled_from([*PREFIXES, "", "/", "/v1", "/v1/volumes", "/v1/volumes/vol-10/x"]),
                      st.builds("".join, st.lists(st.sampled_from(["/", "v", "1", "volumes", "vol-1", "admin",
                                                                  "x", "2"]), max_size=8))))
def test_a_signature_holds_exactly_the_indexed_prefixes_the_path_starts_with(path: str):
    texts = "\n".join(f'@id("p{i}") permit (principal, action, resource) when {{ context.path like "{p}*" }};'
                      for i, p in enumerate(PREFIXES))
    index = ConditionIndex(cedarpy.policies_to_pst(texts).static_policies.values(), lambda uid: {})
    assert index.signature({"path": path})[-1] == {p for p in PREFIXES if path.startswith(p)}
    assert index.signature(None, path)[-1] == {p for p in PREFIXES if path.startswith(p)}
