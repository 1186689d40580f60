"""The bundled policies against their test cases, kept as data the way cedar-examples does.

Each file under policies/tests/ALLOW, DENY (hard deny) and ESCALATE (a denial a human may override) is
one agent call:

    {"description": "...", "agent": "ops-bot", "method": "POST", "url": "http://127.0.0.1:9000/v1/...",
     "headers": {...}, "body": <any JSON, sent as application/json>,
     "expect_policies": ["protect-production-instances"], "expect_problem": "policy-denied"}

`expect_policies` (the determining policies, in any order), `expect_problem` (the problem type of a
refusal) and `expect_roles` (the roles an escalation needs) are checked when given. `at` (ISO 8601, with
its offset) is when the call is decided, on the clock of the bundled cedargate.yaml's `time_zone`; a case
without one is decided on a Wednesday at 10:00 there, so no case depends on when the suite runs. Add a
case by adding a file.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from proxy_support import POLICIES, REPO, make_call

from proxy.calls.mapping import MappingOptions
from proxy.cedar.engine import Engine
from proxy.decision.gate import Gate, Outcome
from proxy.settings.config import load_settings

CASES = POLICIES / "tests"
KNOWN_KEYS = {"description", "agent", "method", "url", "headers", "body", "at", "expect_policies",
              "expect_problem", "expect_roles"}
WEDNESDAY_MORNING = "2026-12-02T10:00:00+01:00"
EXPECTED = {"ALLOW": Outcome.ALLOW, "DENY": Outcome.DENY, "ESCALATE": Outcome.ESCALATE}


def _cases() -> list[tuple[str, Path]]:
    return [
        (folder, path) for folder in EXPECTED for path in sorted((CASES / folder).glob("*.json"))
    ]


def test_there_are_cases_of_both_kinds():
    folders = [folder for folder, _ in _cases()]
    assert folders.count("ALLOW") >= 4 and folders.count("DENY") >= 4 and folders.count("ESCALATE") >= 3


@pytest.fixture(scope="module")
def zone() -> ZoneInfo:
    return ZoneInfo(load_settings(REPO / "cedargate.yaml").time_zone)


@pytest.mark.parametrize("folder, path", _cases(), ids=[f"{f}/{p.stem}" for f, p in _cases()])
def test_case(engine: Engine, zone: ZoneInfo, folder: str, path: Path):
    case = json.loads(path.read_text(encoding="utf-8"))
    at = datetime.fromisoformat(case.get("at", WEDNESDAY_MORNING))
    gate = Gate(engine, None, MappingOptions(time_zone=zone), clock=lambda: at)
    assert set(case) <= KNOWN_KEYS, f"{path.name}: unknown keys {set(case) - KNOWN_KEYS}"
    headers = dict(case.get("headers", {}))
    body = b""
    if "body" in case:
        body = json.dumps(case["body"]).encode()
        if not any(k.lower() == "content-type" for k in headers):
            headers["content-type"] = "application/json"
    call = make_call(case["method"], case["url"], agent=case["agent"], headers=headers, body=body)

    verdict = gate.decide(call)

    expected = EXPECTED[folder]
    assert verdict.outcome is expected, f"{path.name}: {verdict.outcome.value}: {verdict.detail}"
    assert not verdict.errors
    if "expect_policies" in case:
        assert sorted(p.policy_id for p in verdict.determining) == sorted(case["expect_policies"])
    if "expect_problem" in case:
        assert verdict.problem is not None and verdict.problem.value == case["expect_problem"]
    if "expect_roles" in case:
        assert verdict.escalation is not None and sorted(verdict.escalation.roles) == sorted(case["expect_roles"])
