"""`cedargate report` on a store with a history made through the real workflow: the table for people,
`--json` for machines, the narrowed forbid printed for review, and clear refusals of bad options."""

from __future__ import annotations

import json
from pathlib import Path

import cedarpy
import pytest
import yaml

from proxy.cedar.policy import load_bundle
from proxy.cli.main import main
from proxy.runtime import Runtime
from tests.support.approvers import credentials
from tests.support.review_history import REVIEWERS, make_history


@pytest.fixture
def runtime_settings() -> dict:
    return {"approvers": credentials(REVIEWERS)}


@pytest.fixture
def config(runtime: Runtime, tmp_path: Path) -> Path:
    """The config `cedargate run` had: its state dir (and so its store), policies and approvers."""
    make_history(runtime)
    path = tmp_path / "cedargate.yaml"
    path.write_text(yaml.safe_dump({
        "state_dir": str(runtime.settings.state_dir), "policy_dir": str(runtime.settings.policy_dir),
        "approvers": {name: a.model_dump() for name, a in runtime.settings.approvers.items()}}))
    return path


def test_json_report_has_the_rates_the_candidate_and_the_flagged_reviewer(config: Path, capsys):
    code = main(["report", "--config", str(config), "--since", "1d", "--threshold", "80%", "--min-requests", "4",
                 "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["decisions"], report["escalations"], report["threshold"], report["min_requests"]) == (14, 11, 0.8, 4)
    policies = {p["policy"]: p for p in report["policies"]}
    assert policies["large-refunds"]["change_rate"] == pytest.approx(2 / 3)
    [candidate] = report["candidates"]
    assert candidate["policy"] == "protect-production-instances" and report["flagged_reviewers"] == ["erin"]
    schema = load_bundle(yaml.safe_load(config.read_text())["policy_dir"]).schema
    assert cedarpy.validate_policies(candidate["suggestion"], schema).validation_passed


def test_the_table_prints_each_policy_reviewer_and_the_suggested_cedar(config: Path, capsys):
    assert main(["report", "--config", str(config), "--threshold", "0.8", "--min-requests", "4"]) == 0
    out = capsys.readouterr().out
    assert "14 calls decided, 11 escalated (78.6%), 11 override requests" in out
    stop_row = next(line for line in out.splitlines() if line.startswith("protect-production-instances "))
    assert stop_row.split()[1:10] == ["7", "50.0%", "7", "5", "0", "1", "1", "0", "83.3%"]
    assert next(line for line in out.splitlines() if line.startswith("erin (flagged)")).split()[2:4] == ["5", "5"]
    assert "Rubber-stamp candidates (approved without changes at or above 80% of at least 4 decided requests): 1" in out
    assert '    forbid (principal, action == Action::"post", resource)' in out
    assert "would also have let through 1 of the requests reviewers denied" in " ".join(out.split())
    assert "Flagged reviewers (approved at or above 80% of at least 4 votes): erin (100.0% of 5)" in out


def test_with_the_defaults_nothing_is_judged_on_a_handful_of_requests(config: Path, capsys):
    assert main(["report", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "at least 500 decided requests): none" in out and "of at least 500 votes): none" in out


@pytest.mark.parametrize("argv, message", [
    (["--threshold", "150%"], "threshold '150%' is outside (0, 1]"),
    (["--threshold", "most"], "threshold 'most' is not a share: write 99% or 0.99"),
    (["--since", "a week"], "--since 'a week'"),
    (["--min-requests", "0"], "--min-requests 0: give at least 1"),
])
def test_a_bad_option_is_refused_saying_what_to_write(config: Path, capsys, argv: list[str], message: str):
    assert main(["report", "--config", str(config), *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_store_is_refused(tmp_path: Path, capsys):
    assert main(["report", "--state-dir", str(tmp_path / "nowhere")]) == 2
    assert "no decision store" in capsys.readouterr().err
