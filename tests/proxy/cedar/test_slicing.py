"""Differential tests: the proxy decides exactly as Cedar would with the whole policy set.

The engine evaluates each call only against the slice of policies whose scope can match its action
and resource type. That is an optimisation, so it must be invisible: for generated policy sets and
generated calls, `Engine.evaluate` (sliced) must give the same decision, the same determining
policies and the same errors as `cedarpy.is_authorized` on the full `bundle.policy_set` with the same
entities. A second test does the same at the gate, for the bundled example policies.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cedarpy
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from proxy_support import POLICIES

from proxy.calls.mapping import CEDAR_ESCAPES, Call, MappingError, MappingOptions, map_call
from proxy.cedar.engine import Engine
from proxy.cedar.policy import policy_set_of
from proxy.decision.gate import Gate, Outcome
from proxy.record.store import Recorder, make_engine
from proxy.vocabulary.problems import Problem

METHODS = ["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"]
ACTIONS = [m.lower() for m in METHODS]

ENTITIES = [
    {"uid": {"type": "Team", "id": "ops"}, "attrs": {}, "parents": []},
    {"uid": {"type": "Team", "id": "dev"}, "attrs": {}, "parents": []},
    {"uid": {"type": "Agent", "id": "ops-bot"}, "attrs": {}, "parents": [{"type": "Team", "id": "ops"}]},
    {"uid": {"type": "Agent", "id": "dev-bot"}, "attrs": {}, "parents": [{"type": "Team", "id": "dev"}]},
    {
        "uid": {"type": "Agent", "id": "both-bot"},
        "attrs": {},
        "parents": [{"type": "Team", "id": "ops"}, {"type": "Team", "id": "dev"}],
    },
    {"uid": {"type": "Environment", "id": "production"}, "attrs": {}, "parents": []},
    {"uid": {"type": "Environment", "id": "development"}, "attrs": {}, "parents": []},
    {
        "uid": {"type": "Host", "id": "localhost"},
        "attrs": {"tags": ["dev"]},
        "parents": [{"type": "Environment", "id": "development"}],
    },
    {
        "uid": {"type": "Host", "id": "127.0.0.1"},
        "attrs": {"tags": ["production-critical"]},
        "parents": [{"type": "Environment", "id": "production"}],
    },
    {
        "uid": {"type": "Host", "id": "x"},
        "attrs": {"tags": ["dev", "production-critical"]},
        "parents": [
            {"type": "Environment", "id": "production"},
            {"type": "Environment", "id": "development"},
        ],
    },
]
AGENTS = ["ops-bot", "dev-bot", "both-bot", "stranger"]
HOSTS = ["localhost", "127.0.0.1", "x", "unlisted.example"]

# ---- generated policy sets -------------------------------------------------------------------------

PRINCIPAL_SCOPES = [
    "principal",
    'principal in Team::"ops"',
    'principal in Team::"dev"',
    'principal == Agent::"ops-bot"',
    "principal is Agent",
    'principal is Agent in Team::"dev"',
]
ACTION_SCOPES = (
    [
        "action",
        'action in Action::"read"',
        'action in Action::"write"',
        'action in [Action::"read"]',
        'action in [Action::"write"]',
        'action in [Action::"get", Action::"post"]',
        'action in [Action::"read", Action::"delete"]',
    ]
    + [f'action == Action::"{a}"' for a in ACTIONS]
    + [f'action in [Action::"{a}"]' for a in ACTIONS]
)
RESOURCE_SCOPES = [
    "resource",
    "resource is Host",
    'resource == Host::"x"',
    'resource == Host::"127.0.0.1"',
    'resource in Environment::"production"',
    'resource in Environment::"development"',
    'resource is Host in Environment::"production"',
]
CONDITIONS = [
    'context.path like "/v1/*"',
    'context.path like "/v1/instances/*/stop"',
    'context.path == "/"',
    'resource.tags.contains("production-critical")',
    'resource.tags.contains("dev")',
    'principal in Team::"ops"',
    'context.method == "POST"',
    'context.headers has "user-agent" && context.headers["user-agent"] like "*bot*"',
    'context.query like "*force=1*"',
    "context.port == 443",
    # These raise at run time (64-bit overflow) for some ports, though they validate.
    "context.port + 9223372036854775000 > 0",
    "context.port * 4611686018427387904 > 0",
    # The index slices on a leading path `like`; these pin down when that is exact and when it is not.
    'context.path like "/v1/instances/*" && context.port * 4611686018427387904 > 0',
    'context.port * 4611686018427387904 > 0 && context.path like "/v1/volumes/*"',
    'context.path like "/v1/volumes/*" || context.port == 443',
    'context.path like "/v1/*/stop" && resource.tags.contains("dev")',
]


@st.composite
def policy_texts(draw, conditions=CONDITIONS, most=8, wide=False, clauses=2, terms=1) -> list[str]:
    """Up to `most` policies, each with up to `clauses` when/unless clauses of up to `terms` conditions;
    `wide`: mostly the unconstrained scope, so that only their conditions tell the policies apart."""
    texts = []
    for i in range(draw(st.integers(1, most))):
        effect = draw(st.sampled_from(["permit", "forbid"]))
        scope = ", ".join(
            scopes[0] if wide and draw(st.integers(0, 3)) else draw(st.sampled_from(scopes))
            for scopes in (PRINCIPAL_SCOPES, ACTION_SCOPES, RESOURCE_SCOPES)
        )
        text = ""
        for _ in range(draw(st.integers(0, clauses))):
            keyword = draw(st.sampled_from(["when", "unless"]))
            chosen = draw(st.lists(st.sampled_from(conditions), min_size=1, max_size=terms))
            condition = " && ".join(f"({c})" for c in chosen) if len(chosen) > 1 else chosen[0]
            text += f"\n{keyword} {{ {condition} }}"
        texts.append(f'@id("p{i}")\n{effect} ({scope}){text};\n')
    return texts


# ---- generated calls -------------------------------------------------------------------------------

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=False)
    | st.text(max_size=8)
)
_keys = st.text(max_size=6).filter(lambda k: k not in CEDAR_ESCAPES)
json_values = st.recursive(
    _json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=12,
)


@st.composite
def calls(draw, agents=AGENTS, hosts=HOSTS, bodies=json_values) -> Call:
    headers = draw(
        st.dictionaries(
            st.sampled_from(["User-Agent", "accept", "Authorization", "X-Other", "Cookie"]),
            st.sampled_from(["ops-bot/1.0", "curl/8", "*/*", "Bearer s3cret", "robot"]),
            max_size=4,
        )
    )
    body = b""
    if draw(st.booleans()):
        headers["Content-Type"] = draw(
            st.sampled_from(["application/json", "application/merge-patch+json; charset=utf-8"])
        )
        body = json.dumps(draw(bodies)).encode()
    path = draw(
        st.sampled_from(
            [
                "/",
                "/v1/instances",
                "/v1/instances/i-1/stop",
                "/v1/instances/i-2/start",
                "/v1/volumes/v-1",
                "/other",
            ]
        )
    )
    return Call(
        agent=draw(st.sampled_from(agents)),
        method=draw(st.sampled_from(METHODS + [m.lower() for m in METHODS[:2]])),
        scheme=draw(st.sampled_from(["http", "https"])),
        host=draw(st.sampled_from(hosts)),
        port=draw(st.sampled_from([80, 443, 807, 808, 8080, 9000])),
        path=path,
        query=draw(st.sampled_from(["", "force=1", "a=b&force=1"])),
        headers=headers,
        body=body,
    )


def _policy_dir(root: Path, texts: list[str], schema: str | None = None, entities: list | None = None) -> Path:
    directory = Path(tempfile.mkdtemp(dir=root))
    if schema is None:
        shutil.copy2(POLICIES / "schema.cedarschema", directory / "schema.cedarschema")
    else:
        (directory / "schema.cedarschema").write_text(schema)
    (directory / "entities.json").write_text(json.dumps(ENTITIES if entities is None else entities))
    (directory / "generated.cedar").write_text("\n".join(texts))
    return directory


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cedargate-slicing-") as root:
        yield Path(root)


def _direct(engine: Engine, request) -> cedarpy.AuthzResult:
    snapshot = engine.snapshot
    return cedarpy.is_authorized(
        request.as_cedarpy(),
        snapshot.bundle.policy_set,
        snapshot.entities_for(request.principal, request.resource),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=policy_texts(), batch=st.lists(calls(), min_size=1, max_size=6))
def test_sliced_evaluation_equals_cedar_on_the_full_set(scratch: Path, texts: list[str], batch: list[Call]):
    engine = Engine(_policy_dir(scratch, texts))  # a generated set that did not load would fail here
    options = MappingOptions()
    for call in batch:
        try:
            request = map_call(call, options)
        except MappingError:
            event("call refused by mapping")
            continue
        got = engine.evaluate(request)
        want = _direct(engine, request)

        sliced_size = len(
            engine.snapshot.policies_for(
                request.principal, request.action, request.resource, request.context["path"]
            ).to_pst().static_policies
        )
        event("slice smaller than the set" if sliced_size < len(texts) else "slice is the whole set")
        event(f"decision {got.decision}" + (" with errors" if got.errors else ""))
        assert got.decision == want.decision.value, (call, texts)
        assert set(got.determining) == set(want.diagnostics.reasons), (call, texts)
        assert set(got.errors) == set(want.diagnostics.errors), (call, texts)
        assert got.allowed == (want.decision.value == "Allow" and not want.diagnostics.errors)


def test_slicing_really_excludes_policies_and_still_agrees():
    """A fixed case where the slice is smaller and the excluded policy would error: nothing leaks."""
    texts = [
        '@id("p0")\npermit (principal, action, resource);\n',
        # Scoped to delete: excluded from a GET's slice; on a DELETE it errors and must show.
        '@id("p1")\nforbid (principal, action == Action::"delete", resource)\n'
        "when { context.port + 9223372036854775000 > 0 };\n",
    ]
    with tempfile.TemporaryDirectory() as root:
        engine = Engine(_policy_dir(Path(root), texts))
        for method, expect_errors in (("GET", False), ("DELETE", True)):
            request = map_call(Call("ops-bot", method, "http", "x", 8080, "/"), MappingOptions())
            sliced = engine.snapshot.policies_for(
                request.principal, request.action, request.resource, request.context["path"]).to_pst().static_policies
            assert set(sliced) == ({"p0", "p1"} if method == "DELETE" else {"p0"})
            got, want = engine.evaluate(request), _direct(engine, request)
            assert got.decision == want.decision.value == "Allow"
            assert bool(got.errors) is expect_errors
            assert set(got.errors) == set(want.diagnostics.errors)


# ---- the gate against the bundled example policies ------------------------------------------------


@pytest.fixture(scope="module")
def example_gate(scratch: Path) -> Iterator[Gate]:
    directory = scratch / "example"
    directory.mkdir()
    for name in ("schema.cedarschema", "ops.cedar", "entities.json"):
        shutil.copy2(POLICIES / name, directory / name)
    recorder = Recorder(make_engine(f"sqlite:///{scratch / 'gate.db'}"))
    yield Gate(Engine(directory), recorder)
    recorder.close(timeout=2)
    recorder.engine.dispose()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    call=calls(
        agents=["ops-bot", "stranger", "dev-bot"],
        hosts=[
            "localhost",
            "127.0.0.1",
            "cloud.dev.example",
            "cloud.prod.example",
            "unlisted.example",
            "LOCALHOST",
        ],
    )
)
# Denials by escalatable forbids alone, with and without a permit beneath: rare among generated calls.
@example(call=Call("ops-bot", "POST", "http", "127.0.0.1", 9000, "/v1/instances/i-1/stop"))
@example(call=Call("ops-bot", "DELETE", "http", "localhost", 9000, "/v1/volumes/v-1"))
@example(call=Call("stranger", "DELETE", "http", "localhost", 9000, "/v1/volumes/v-1"))
@example(call=Call("ops-bot", "PUT", "http", "localhost", 9000, "/v1/instances", headers={"X-Agent-Confidence": "0.1"}))
def test_gate_allows_exactly_what_cedar_allows_with_the_example_policies(example_gate: Gate, call: Call):
    verdict = example_gate.decide(call)
    try:
        request = map_call(call, example_gate.mapping, at=verdict.at)  # the same second as the verdict
    except MappingError as exc:
        assert verdict.outcome is Outcome.ERROR and verdict.problem is Problem.MAPPING_ERROR
        assert verdict.status == exc.status
        return
    want = _direct(example_gate.engine, request)
    cedar_allows = want.decision.value == "Allow" and not want.diagnostics.errors
    event(f"allowed={cedar_allows}")

    assert verdict.allowed == cedar_allows, call
    assert not want.diagnostics.errors  # the example policies never error
    assert verdict.request == request
    assert sorted(p.policy_id for p in verdict.determining) == sorted(want.diagnostics.reasons)
    if not verdict.allowed:
        assert verdict.status == 403
        # Grantable only if every forbid is escalatable and Cedar allows the call without them.
        snapshot = example_gate.engine.snapshot
        reasons = want.diagnostics.reasons
        grantable = False
        if reasons and set(reasons) <= snapshot.escalatable:
            remaining = policy_set_of(
                [t for i, t in snapshot.bundle.templates.items() if i not in snapshot.escalatable])
            beneath = cedarpy.is_authorized(request.as_cedarpy(), remaining,
                                            snapshot.entities_for(request.principal, request.resource))
            grantable = beneath.decision.value == "Allow" and not beneath.diagnostics.errors
            event(f"escalatable forbids only, grantable={grantable}")
        assert verdict.outcome is (Outcome.ESCALATE if grantable else Outcome.DENY)
        expected = Problem.POLICY_DENIED if reasons and (grantable or not set(reasons) <= snapshot.escalatable) \
            else Problem.NO_PERMIT
        assert verdict.problem is expected
