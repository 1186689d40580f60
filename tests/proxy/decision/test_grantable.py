"""Escalation needs a permit beneath it: a denial is grantable only if the call would be allowed were its
`@escalate` forbids lifted (a permit matches, no other forbid does, nothing errors).

The engine's lifted evaluation and its caches, the gate's hard deny versus escalation, the same rule at
release (held calls and an agent's retry of a granted call), and what `cedargate explain` says about it.
All with real cedarpy, real files and a real SQLite store, as the rest of the core's tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import cedarpy
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from proxy_support import POLICIES, make_call, write_policy_file

import tests.proxy.cedar.test_slicing as slicing
from proxy.calls.mapping import MappingError, MappingOptions, map_call
from proxy.cedar.engine import Engine
from proxy.cedar.escalation import is_escalatable
from proxy.cedar.policy import PolicyInfo, policy_set_of
from proxy.cli.explain import explain
from proxy.decision.gate import Gate, Outcome
from proxy.record.store import Recorder
from proxy.runtime import Runtime
from proxy.settings.config import AgentCredential, ApproverCredential
from proxy.vocabulary.problems import Problem

LOW_CONFIDENCE = {"X-Agent-Confidence": "0.1"}
# No permit allows a PUT of an instance; low-confidence-writes (@escalate) matches it all the same.
UNPERMITTED_PUT = ("PUT", "http://localhost:9000/v1/instances/i-1")
STOP_DEV = ("POST", "http://localhost:9000/v1/instances/i-1/stop")
STOP_PROD = ("POST", "http://127.0.0.1:9000/v1/instances/i-1/stop")
LIST = ("GET", "http://127.0.0.1:9000/v1/instances")
OPS_STOP_PERMIT = '''@id("ops-stop-instance")
permit (principal in Team::"ops", action == Action::"post", resource)
when { context.path like "/v1/instances/*/stop" };
'''


def request_of(method: str, url: str, agent: str = "ops-bot", headers: dict[str, str] | None = None):
    return map_call(make_call(method, url, agent=agent, headers=headers), MappingOptions())


def decided(evaluation) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    return evaluation.decision, evaluation.determining, evaluation.errors


def without_ops_stop_permit(policy_dir: Path) -> None:
    ops = policy_dir / "ops.cedar"
    text = ops.read_text()
    assert OPS_STOP_PERMIT in text
    write_policy_file(ops, text.replace(OPS_STOP_PERMIT, ""))


# --- escalation: which policies a grant may lift -----------------------------------------------------


@pytest.mark.parametrize("effect, annotations, expected", [
    ("forbid", {"escalate": "security"}, True),
    ("forbid", {"reason": "never"}, False),
    ("permit", {}, False),
])
def test_only_a_forbid_with_escalate_can_be_lifted(effect: str, annotations: dict, expected: bool):
    assert is_escalatable(PolicyInfo("p", effect, "x.cedar", 1, {"id": "p", **annotations})) is expected


# --- engine: the lifted evaluation -------------------------------------------------------------------


def test_the_lifted_evaluation_leaves_out_the_escalatable_forbids_and_nothing_else(engine: Engine):
    assert engine.snapshot.escalatable == {"protect-production-instances", "no-volume-deletion", "staging-after-hours",
                                           "low-confidence-writes", "large-refunds", "no-repository-deletion"}
    stop = request_of(*STOP_PROD)
    assert decided(engine.evaluate(stop)) == ("Deny", ("protect-production-instances",), ())
    lifted = engine.evaluate(stop, lifted=True)
    assert decided(lifted) == ("Allow", ("ops-stop-instance",), ())
    assert lifted.allowed and [p.policy_id for p in lifted.policies] == ["ops-stop-instance"]

    put = request_of(*UNPERMITTED_PUT, headers=LOW_CONFIDENCE)
    assert decided(engine.evaluate(put)) == ("Deny", ("low-confidence-writes",), ())
    assert decided(engine.evaluate(put, lifted=True)) == ("Deny", (), ())  # nothing beneath: no permit


@pytest.mark.parametrize("first", [False, True], ids=["full-first", "lifted-first"])
def test_full_and_lifted_decisions_are_cached_apart(policy_dir: Path, first: bool):
    engine = Engine(policy_dir)  # a fresh snapshot: empty caches
    stop = request_of(*STOP_PROD)
    answers = {first: engine.evaluate(stop, lifted=first)}
    answers[not first] = engine.evaluate(stop, lifted=not first)

    assert answers[False].decision == "Deny" and answers[True].decision == "Allow"
    # Asked again, each comes from the cache, and never the other's answer.
    assert engine.evaluate(stop) is answers[False]
    assert engine.evaluate(stop, lifted=True) is answers[True]


@pytest.mark.parametrize("first", [False, True], ids=["full-first", "lifted-first"])
def test_the_lifted_slice_is_the_scope_slice_without_escalatable_forbids(policy_dir: Path, first: bool):
    snapshot = Engine(policy_dir).snapshot
    key = (("Agent", "ops-bot"), ("Action", "delete"), ("Host", "localhost"), "/v1/volumes/v-1")

    def ids(lifted: bool) -> set[str]:
        return set(snapshot.policies_for(*key, lifted=lifted).to_pst().static_policies)

    slices = {first: ids(first)}
    slices[not first] = ids(not first)
    assert slices[False] == {"ops-delete-volumes", "no-volume-deletion", "low-confidence-writes"}
    assert slices[True] == {"ops-delete-volumes"}
    assert (ids(False), ids(True)) == (slices[False], slices[True])  # cached, each its own


def _escalating(texts: list[str], marks: list[bool]) -> list[str]:
    """Put @escalate on the generated forbids that `marks` picks."""
    return [f'@escalate("security")\n{text}' if mark and "\nforbid " in text else text
            for text, mark in zip(texts, marks, strict=False)]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=slicing.policy_texts(), marks=st.lists(st.booleans(), min_size=8, max_size=8),
       batch=st.lists(slicing.calls(), min_size=1, max_size=5))
def test_lifted_evaluation_equals_cedar_on_the_set_without_escalatable_forbids(texts, marks, batch):
    with tempfile.TemporaryDirectory(prefix="cedargate-lifted-") as root:
        engine = Engine(slicing._policy_dir(Path(root), _escalating(texts, marks)))
    snapshot = engine.snapshot
    remaining = policy_set_of([t for i, t in snapshot.bundle.templates.items() if i not in snapshot.escalatable])
    for call in batch:
        try:
            request = map_call(call, MappingOptions())
        except MappingError:
            continue
        full = engine.evaluate(request)
        got = engine.evaluate(request, lifted=True)
        want = cedarpy.is_authorized(request.as_cedarpy(), remaining,
                                     snapshot.entities_for(request.principal, request.resource))
        event(f"full {full.decision}, lifted {got.decision}")
        assert got.decision == want.decision.value, (call, texts, marks)
        assert set(got.determining) == set(want.diagnostics.reasons), (call, texts, marks)
        assert set(got.errors) == set(want.diagnostics.errors), (call, texts, marks)
        assert engine.evaluate(request) is full  # the lifted answer never took the full one's place


# --- gate: hard deny or escalation --------------------------------------------------------------------


def test_low_confidence_on_a_call_no_permit_allows_is_a_hard_deny(gate: Gate):
    verdict = gate.decide(make_call(*UNPERMITTED_PUT, headers=LOW_CONFIDENCE))

    assert verdict.outcome is Outcome.DENY and verdict.escalation is None and verdict.beneath == ()
    body = verdict.problem_body()
    assert body["type"] == Problem.NO_PERMIT.uri and body["status"] == 403
    assert body["title"] == "No policy permits this call"
    assert body["detail"] == (
        "no policy permits ops-bot to PUT http://localhost:9000/v1/instances/i-1 (default deny). The matching "
        'escalatable forbid "low-confidence-writes" cannot make it grantable: an override lifts a forbid, '
        "it never stands in for a permit."
    )
    # Cedar's determining forbid stays on the record, so an operator sees what the agent tripped.
    assert [p["id"] for p in body["policies"]] == ["low-confidence-writes"]


def test_low_confidence_on_a_permitted_write_escalates(gate: Gate):
    verdict = gate.decide(make_call(*STOP_DEV, headers=LOW_CONFIDENCE))

    assert verdict.outcome is Outcome.ESCALATE and verdict.problem is Problem.POLICY_DENIED
    assert [p.policy_id for p in verdict.determining] == ["low-confidence-writes"]
    assert [p.policy_id for p in verdict.beneath] == ["ops-stop-instance"]
    assert verdict.escalation is not None and verdict.escalation.roles == {"engineering-manager"}


def test_another_teams_agent_tripping_an_escalatable_forbid_gets_no_permit(gate: Gate):
    for agent in ("billing-bot", "stranger"):
        verdict = gate.decide(make_call("DELETE", "http://localhost:9000/v1/volumes/v-1", agent=agent))
        assert (verdict.outcome, verdict.problem) == (Outcome.DENY, Problem.NO_PERMIT), agent
        assert [p.policy_id for p in verdict.determining] == ["no-volume-deletion"]


def test_a_forbid_without_escalate_beside_an_escalatable_one_is_policy_denied(
    policy_dir: Path, recorder: Recorder,
):
    (policy_dir / "puts.cedar").write_text(
        '@id("ops-put")\npermit (principal in Team::"ops", action == Action::"put", resource);\n'
        '@id("no-put-on-production")\n@reason("Production instances are changed by the release pipeline.")\n'
        'forbid (principal, action == Action::"put", resource)\n'
        'when { resource.tags.contains("production-critical") };\n'
    )
    gate = Gate(Engine(policy_dir), recorder)

    prod = gate.decide(make_call("PUT", "http://127.0.0.1:9000/v1/instances/i-1", headers=LOW_CONFIDENCE))
    assert (prod.outcome, prod.problem, prod.escalation) == (Outcome.DENY, Problem.POLICY_DENIED, None)
    assert {p.policy_id for p in prod.determining} == {"low-confidence-writes", "no-put-on-production"}
    # The same call where the permit stands alone beneath the escalatable forbid: grantable.
    dev = gate.decide(make_call(*UNPERMITTED_PUT, headers=LOW_CONFIDENCE))
    assert dev.outcome is Outcome.ESCALATE and [p.policy_id for p in dev.beneath] == ["ops-put"]


class _CountingEngine(Engine):
    lifted_calls = 0

    def evaluate(self, request, snapshot=None, *, lifted=False):
        self.lifted_calls += lifted
        return super().evaluate(request, snapshot, lifted=lifted)


@pytest.mark.parametrize("method, url, headers, lifted_calls", [
    (*LIST, {}, 0),                                # allowed
    (*UNPERMITTED_PUT, {}, 0),                     # no forbid at all: plain default deny
    ("POST", "http://mcp.github.example/mcp", {}, 0),  # a transfer: a forbid without @escalate
    (*STOP_PROD, {}, 1),                           # only escalatable forbids: what is beneath decides
    (*UNPERMITTED_PUT, LOW_CONFIDENCE, 1),
])
def test_the_lifted_set_is_asked_only_when_every_determining_forbid_is_escalatable(
    policy_dir: Path, recorder: Recorder, method: str, url: str, headers: dict, lifted_calls: int,
):
    engine = _CountingEngine(policy_dir)
    body = b""
    if url.endswith("/mcp"):
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                           "params": {"name": "transfer_repository", "arguments": {"repo": "acme/web"}}}).encode()
        headers = {"Content-Type": "application/json"}
    Gate(engine, recorder).decide(make_call(method, url, headers=headers, body=body))
    assert engine.lifted_calls == lifted_calls


def test_removing_the_permit_beneath_turns_an_escalation_into_a_hard_deny(policy_dir: Path, recorder: Recorder):
    engine = Engine(policy_dir)
    gate = Gate(engine, recorder)
    assert gate.decide(make_call(*STOP_PROD)).outcome is Outcome.ESCALATE

    without_ops_stop_permit(policy_dir)
    assert engine.reload()

    verdict = gate.decide(make_call(*STOP_PROD))
    assert (verdict.outcome, verdict.problem) == (Outcome.DENY, Problem.NO_PERMIT)
    assert [p.policy_id for p in verdict.determining] == ["protect-production-instances"]


# --- oversight: the same rule at release ---------------------------------------------------------------


@pytest.fixture
def runtime_settings() -> dict[str, Any]:
    def sha(name: str) -> str:
        return hashlib.sha256(name.encode()).hexdigest()

    return {
        "approvers": {"erin": ApproverCredential(token_sha256=sha("erin"), roles=("engineering-manager",))},
        "agents": {"ops-bot": AgentCredential(token_sha256=sha("ops-bot"))},
    }


def granted_stop(runtime: Runtime):
    """The production stop, escalated, its override opened without holding, and granted by erin."""
    verdict = runtime.gate.decide(make_call(*STOP_PROD))
    assert verdict.outcome is Outcome.ESCALATE
    opened = asyncio.run(runtime.oversight.resolve(verdict, 0, None, client_alive=lambda: True))
    assert opened.verdict.problem is Problem.OVERRIDE_PENDING
    override, changed = runtime.workflow.vote(opened.override_id, "erin", runtime.roles_of("erin"),
                                               "approve", "ok")
    assert changed and override.status == "granted"
    return verdict, override.id


def test_a_granted_call_whose_permit_was_removed_is_refused_at_release(runtime: Runtime, policy_dir: Path):
    verdict, override_id = granted_stop(runtime)
    without_ops_stop_permit(policy_dir)
    assert runtime.engine.reload()

    # The held call (decided before the change) reaches the release, which decides it again.
    resolution = asyncio.run(runtime.oversight.resolve(verdict, 5, None, client_alive=lambda: True))

    assert not resolution.release and resolution.override_id == override_id
    body = resolution.verdict.problem_body()
    assert body["type"] == Problem.RELEASE_REFUSED.uri and body["status"] == 403
    assert body["detail"].startswith("the override was granted, but the current policies refuse the call: "
                                     "no policy permits ops-bot to POST")
    assert runtime.overrides.get(override_id).status == "release_refused"


def test_a_retry_of_a_granted_call_that_policy_now_hard_denies_spends_the_grant(
    runtime: Runtime, policy_dir: Path,
):
    _, override_id = granted_stop(runtime)
    without_ops_stop_permit(policy_dir)
    assert runtime.engine.reload()

    retry = runtime.gate.decide(make_call(*STOP_PROD))
    assert (retry.outcome, retry.problem) == (Outcome.DENY, Problem.NO_PERMIT)  # never reaches a hold
    refused = asyncio.run(runtime.oversight.refuse_grant(retry))

    assert refused is not None and not refused.release and refused.override_id == override_id
    body = refused.verdict.problem_body()
    assert body["type"] == Problem.RELEASE_REFUSED.uri and body["decision_id"] == retry.decision_id
    assert body["override_id"] == override_id and body["override_status"] == "release_refused"
    assert "no policy permits ops-bot to POST" in body["detail"]
    assert runtime.overrides.get(override_id).status == "release_refused"
    # Spent: the permit coming back later does not revive the grant.
    assert asyncio.run(runtime.oversight.refuse_grant(runtime.gate.decide(make_call(*STOP_PROD)))) is None
    assert runtime.overrides.granted_for(make_call(*STOP_PROD)) is None


def test_refuse_grant_leaves_calls_without_a_grant_and_other_outcomes_alone(runtime: Runtime):
    hard = runtime.gate.decide(make_call(*UNPERMITTED_PUT, headers=LOW_CONFIDENCE))
    assert hard.outcome is Outcome.DENY
    assert asyncio.run(runtime.oversight.refuse_grant(hard)) is None
    assert runtime.overrides.list() == []  # a hard deny opens nothing

    _, override_id = granted_stop(runtime)
    escalated = runtime.gate.decide(make_call(*STOP_PROD))  # still escalatable: the release decides
    assert asyncio.run(runtime.oversight.refuse_grant(escalated)) is None
    assert runtime.overrides.get(override_id).status == "granted"


# --- explain ----------------------------------------------------------------------------------------------


def test_explain_says_why_a_call_is_a_hard_deny_or_grantable(engine: Engine):
    hard = explain(engine, make_call(*UNPERMITTED_PUT, headers=LOW_CONFIDENCE))
    assert hard["decision"] == "deny" and hard["problem"] == Problem.NO_PERMIT.uri
    assert hard["grantable"] == {
        "grantable": False, "lifts": ["low-confidence-writes"], "permitted_by": [],
        "why": "forbid low-confidence-writes carries @escalate, but with it lifted no permit allows the call; "
               "a grant lifts a forbid, it never stands in for a permit",
    }
    assert "escalation" not in hard

    grantable = explain(engine, make_call(*STOP_DEV, headers=LOW_CONFIDENCE))
    assert grantable["decision"] == "escalate"
    assert grantable["grantable"] == {
        "grantable": True, "lifts": ["low-confidence-writes"], "permitted_by": ["ops-stop-instance"],
        "why": "with the @escalate forbid lifted, permit ops-stop-instance allows the call",
    }

    plain = explain(engine, make_call(*UNPERMITTED_PUT))
    assert plain["grantable"]["why"] == "no permit allows the call (default deny)"
    assert "grantable" not in explain(engine, make_call(*LIST))


def test_explain_prints_the_reason_for_a_hard_deny(tmp_path: Path):
    policy_dir = tmp_path / "policies"
    shutil.copytree(POLICIES, policy_dir, ignore=shutil.ignore_patterns("tests"))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "cedargate"), "explain", *UNPERMITTED_PUT, "--agent", "ops-bot",
         "-H", "X-Agent-Confidence: 0.1", "--policy-dir", str(policy_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert "decision  DENY  (urn:cedargate:problem:no-permit)" in done.stdout
    assert ("hard deny, no human can override it: forbid low-confidence-writes carries @escalate, but with it "
            "lifted no permit allows the call") in done.stdout
    assert "escalates to" not in done.stdout
