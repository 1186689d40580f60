"""The report over a history made through the real workflow on a real core (the bundled policies, real
cedarpy, a SQLite record): calls decided and recorded by the gate, requests opened as a held call opens
them, votes as reviewers cast them (approve, approve with changes, deny), a request expired by the job.
Small thresholds stand in for 99% of 500."""

from __future__ import annotations

from datetime import timedelta

import cedarpy
import pytest

from proxy.cedar.policy import load_bundle
from proxy.oversight.report import Report, build_report, percentile
from proxy.record.store import utcnow
from proxy.runtime import Runtime
from tests.support.approvers import credentials
from tests.support.review_history import REVIEWERS, make_history, production_stop


@pytest.fixture
def runtime_settings(database_url: str) -> dict:
    """On both stores: the window is compared with times SQLite keeps without an offset, PostgreSQL with one."""
    return {"approvers": credentials(REVIEWERS), "database_url": database_url}


@pytest.fixture
def history(runtime: Runtime) -> Runtime:
    make_history(runtime)
    return runtime


def report_of(runtime: Runtime, **options) -> Report:
    now = utcnow()
    return build_report(runtime.recorder.engine, now - timedelta(days=7), now + timedelta(seconds=1),
                        bundle=runtime.engine.snapshot.bundle,
                        approver_roles={n: frozenset(a.roles) for n, a in runtime.settings.approvers.items()},
                        **options)


def test_rates_per_policy_and_per_reviewer(history: Runtime):
    report = report_of(history, threshold=0.8, min_requests=4)
    assert (report.decisions, report.escalations, report.requests) == (14, 11, 11)
    stop, refunds = ({p.policy: p for p in report.policies}[name]
                     for name in ("protect-production-instances", "large-refunds"))
    assert (stop.escalations, stop.requests, stop.approved, stop.approved_with_changes, stop.denied,
            stop.expired, stop.open) == (7, 7, 5, 0, 1, 1, 0)
    assert stop.escalation_rate == 7 / 14
    assert stop.approval_rate == 5 / 6 and stop.change_rate == 0 and stop.unchanged_approval_rate == 5 / 6
    assert (refunds.approved, refunds.approved_with_changes, refunds.denied) == (3, 2, 1)
    assert refunds.approval_rate == 3 / 4 and refunds.change_rate == 2 / 3 and refunds.unchanged_approval_rate == 1 / 4
    assert stop.latency_p50_s is not None and 0 <= stop.latency_p50_s <= stop.latency_p95_s < 60

    reviewers = {r.reviewer: r for r in report.reviewers}
    assert (reviewers["erin"].votes, reviewers["erin"].approval_rate, reviewers["erin"].expiries) == (5, 1.0, 1)
    assert (reviewers["max"].votes, reviewers["max"].approval_rate, reviewers["max"].expiries) == (1, 0.0, 1)
    assert (reviewers["fran"].votes, reviewers["fran"].approval_rate, reviewers["fran"].change_rate) == (4, 0.75, 2 / 3)
    assert reviewers["fran"].expiries == 0
    assert (reviewers["idle"].votes, reviewers["idle"].expiries) == (0, 1)  # configured, never voted


def test_rubber_stamp_candidates_and_flagged_reviewers_follow_the_thresholds(history: Runtime):
    report = report_of(history, threshold=0.8, min_requests=4)
    assert [c.policy for c in report.candidates] == ["protect-production-instances"]
    assert report.flagged_reviewers == ["erin"]  # 5 of 5; fran approved 3 of 4, max voted once
    assert report_of(history, threshold=0.8, min_requests=7).candidates == []  # 6 decided: too few
    assert report_of(history, threshold=0.9, min_requests=4).candidates == []  # 83% approved as sent
    assert report_of(history, threshold=0.8, min_requests=6).flagged_reviewers == []  # erin cast 5 votes
    lenient = report_of(history, threshold=0.25, min_requests=4)
    assert {c.policy for c in lenient.candidates} == {"protect-production-instances", "large-refunds"}
    assert set(lenient.flagged_reviewers) == {"erin", "fran"}


def test_the_suggested_forbid_stops_asking_for_what_was_approved_and_validates(history: Runtime):
    [candidate] = report_of(history, threshold=0.8, min_requests=4).candidates
    assert candidate.suggestion is not None and candidate.file == "ops.cedar"
    assert (candidate.decided, candidate.approved_unchanged, candidate.exact) == (6, 5, True)
    # The denied stop was the same agent on the same host: the narrowed forbid would have let it through.
    assert candidate.denied_exempted == 1
    bundle = load_bundle(history.settings.policy_dir)
    assert cedarpy.validate_policies(candidate.suggestion, bundle.schema).validation_passed
    assert 'unless {\n  (principal == Agent::"ops-bot" && action == Action::"post" && resource == Host::"127.0.0.1")' \
        in candidate.suggestion
    assert '@id("protect-production-instances")' in candidate.suggestion
    # In place of the original, the policy set validates and the approved call is no longer escalated.
    ops = (history.settings.policy_dir / "ops.cedar")
    original = next(s for s in ops.read_text().split(";") if '@id("protect-production-instances")' in s) + ";"
    ops.write_text(ops.read_text().replace(original.lstrip("\n"), candidate.suggestion))
    assert history.engine.reload()
    assert history.gate.decide(production_stop(99)).allowed


def test_a_candidate_whose_policy_is_gone_is_reported_without_a_suggestion(history: Runtime):
    now = utcnow()
    report = build_report(history.recorder.engine, now - timedelta(days=7), now + timedelta(seconds=1),
                          threshold=0.8, min_requests=4, bundle=None)
    [candidate] = report.candidates
    assert candidate.suggestion is None and "policy directory" in (candidate.why_no_suggestion or "")


def test_an_empty_window_reports_no_rates(runtime: Runtime):
    report = report_of(runtime, threshold=0.8, min_requests=1)
    assert (report.decisions, report.escalation_rate, report.policies, report.candidates) == (0, None, [], [])
    assert all(r.votes == 0 and r.approval_rate is None and not r.flagged for r in report.reviewers)


def test_percentiles_are_values_that_occurred():
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([1.0, 2.0, 3.0, 4.0], 0.95) == 4.0
