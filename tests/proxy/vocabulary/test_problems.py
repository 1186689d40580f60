"""The one catalogue of refusals: every answer cedargate builds takes its type, title, status and next steps
from `proxy.vocabulary.problems`, and no other module spells a problem type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from addons.agent_auth import proxy_auth_required
from addons.error_pages import problem_answer
from proxy.calls.connections import refusal
from proxy.calls.mcp.jsonrpc import read_message
from proxy.calls.mcp.refusals import refusal_text
from proxy.calls.mcp.sse import unreadable_problem
from proxy.decision.upstream import classify
from proxy.vocabulary.problems import CATALOGUE, PROBLEM_BASE, Problem, http_problem, problem_document

ROOT = Path(__file__).resolve().parents[3]


def test_every_problem_is_catalogued_with_a_title_a_status_and_next_steps():
    assert set(CATALOGUE) == set(Problem)
    for problem in Problem:
        entry = problem.entry
        assert entry.title and entry.next_step and entry.step_for_model, problem
        assert 400 <= entry.status < 600, problem
        assert Problem.of_type(problem.uri) is problem


def test_a_problem_document_has_the_catalogues_members():
    document = problem_document(Problem.OVERRIDE_RATE_LIMITED, detail="slow down", retry_after=7)
    assert document == {
        "type": "urn:cedargate:problem:override-rate-limited",
        "title": "Denied by policy; this agent opens override requests too fast",
        "status": 429,
        "detail": "slow down",
        "next_step": "Retry after the seconds in Retry-After.",
        "retry_after": 7,
    }
    assert problem_document(Problem.MAPPING_ERROR, 415, "not UTF-8")["status"] == 415  # the call's own status


def test_a_type_not_cedargates_is_no_problem_of_the_catalogue():
    assert Problem.of_type("about:blank") is None
    assert Problem.of_type(PROBLEM_BASE + "no-such-problem") is None


@pytest.mark.parametrize("answer, problem, status", [
    (json.loads(proxy_auth_required("missing").content), Problem.PROXY_AUTH_REQUIRED, 407),
    (json.loads(problem_answer(400, "Bad request line").content), Problem.HTTP_ERROR, 400),
    (json.loads(refusal(Problem.REQUEST_TOO_LARGE, 413, "too big")), Problem.REQUEST_TOO_LARGE, 413),
    (unreadable_problem(), Problem.UPSTREAM_ANSWER, 502),
])
def test_each_builder_answers_with_the_catalogues_entry(answer, problem, status):
    entry = problem.entry
    assert (answer["type"], answer["title"], answer["status"]) == (problem.uri, entry.title, status)
    assert answer["next_step"] == entry.next_step and answer["detail"]


def test_an_upstream_failure_is_answered_with_its_problems_status():
    from proxy.decision.upstream import _PROBLEMS, FailureKind

    for kind, problem in _PROBLEMS.items():
        if kind is not FailureKind.CLIENT_CLOSED:
            assert problem.entry.status in (403, 502, 504)
    assert classify("connect timed out", sent=False).kind is FailureKind.CONNECT_TIMEOUT


@pytest.mark.parametrize("problem", list(Problem))
def test_a_model_is_told_the_catalogues_next_step(problem):
    message = read_message({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                            "params": {"name": "delete_repository"}}, "the body")
    text = refusal_text({**problem_document(problem, detail="why"), "decision_id": "d-1"}, message)
    assert text.splitlines() == [
        f"cedargate refused tool 'delete_repository': {problem.entry.title}.",
        "Why: why",
        problem.entry.step_for_model,
        "Decision id: d-1.",
    ]


def test_the_override_apis_errors_are_about_blank_titled_by_their_status():
    assert http_problem(404, "no override request x") == {
        "type": "about:blank", "title": "Not Found", "status": 404, "detail": "no override request x"}
    assert http_problem(599, "odd")["title"] == "Error"


def test_no_module_but_the_catalogue_spells_a_problem_type():
    sources = [p for d in ("proxy", "addons", "override_api") for p in (ROOT / d).rglob("*.py")]
    spelled = [str(p.relative_to(ROOT)) for p in sources
               if PROBLEM_BASE in p.read_text(encoding="utf-8") and p.name != "problems.py"]
    assert spelled == []
