"""Shadow policies through a real cedargate: judged beside the live set on real calls and never enforced
(the upstream sees what the live set decided), their disagreements recorded with both sides' policies and
shown in /status; a broken shadow set leaves live traffic untouched, says why in /status, and is taken up
once it is mended."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.candidates import candidate_policies, start_with
from tests.support.launch import Cedargate
from tests.support.upstream import Upstream, logging_upstream


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    (tmp_path / "upstream").mkdir()
    with logging_upstream(tmp_path / "upstream") as served:
        yield served


def status(gate: Cedargate) -> dict[str, Any]:
    return httpx.get(f"{gate.api_url}/status", timeout=10).json()


def eventually(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout} s: {what}")
        time.sleep(0.05)
    return found


def disagreements(gate: Cedargate) -> list[tuple]:
    with sqlite3.connect(gate.database) as db:
        return db.execute("SELECT s.agent, s.action, s.live_decision, s.shadow_decision, s.live_policies,"
                          " s.shadow_policies, d.path FROM shadow_disagreements s"
                          " JOIN decisions d ON d.decision_id = s.decision_id ORDER BY s.id").fetchall()


def test_shadow_disagreements_are_recorded_for_real_calls_and_never_enforced(
        tmp_path: Path, policy_dir: Path, upstream: Upstream):
    shadow = candidate_policies(policy_dir, tmp_path / "shadow")
    gate = start_with(tmp_path, policy_dir, shadow_policy_dir=str(shadow))
    try:
        port = upstream.http_port
        with httpx.Client(proxy=gate.proxy_url, timeout=10) as client:
            # Live allows, shadow would deny: the call goes upstream all the same.
            assert client.get(f"http://localhost:{port}/v1/instances").status_code == 200
            # Live escalates, shadow would allow: the call is not forwarded all the same.
            held = client.post(f"http://127.0.0.1:{port}/v1/instances/i-1/stop", headers={"Prefer": "respond-async"})
            assert held.status_code == 403 and held.json()["type"].endswith("override-pending")
            # Both deny: no disagreement.
            assert client.put(f"http://localhost:{port}/v1/instances/i-1").status_code == 403
        assert [(c.method, c.path) for c in upstream.calls] == [("GET", "/v1/instances")]

        shown = eventually(lambda: (s := status(gate)["shadow"]) and s["evaluated"] == 3 and s, "3 calls judged")
        assert shown["directory"] == str(shadow) and shown["revision"] and shown["last_error"] is None
        assert shown["disagreements"] == 2 and shown["skipped"] == 0
        scraped = httpx.get(f"{gate.api_url}/metrics", timeout=10).text
        assert 'cedargate_shadow_disagreements_total{live="allow",shadow="deny"} 1.0' in scraped
        assert 'cedargate_shadow_disagreements_total{live="escalate",shadow="allow"} 1.0' in scraped
        rows = eventually(lambda: len(found := disagreements(gate)) == 2 and found, "2 disagreements recorded")
        assert rows == [
            ("ops-bot", 'Action::"get"', "allow", "deny", '["ops-read"]', '["no-instance-listing"]', "/v1/instances"),
            ("ops-bot", 'Action::"post"', "escalate", "allow", '["protect-production-instances"]',
             '["ops-stop-instance"]', "/v1/instances/i-1/stop"),
        ]
    finally:
        assert gate.stop() == 0
    assert gate.audit_verify().returncode == 0


def test_a_broken_shadow_set_leaves_live_traffic_untouched_and_shows_in_status(
        tmp_path: Path, policy_dir: Path, upstream: Upstream):
    shadow = candidate_policies(policy_dir, tmp_path / "shadow")
    good = (shadow / "ops.cedar").read_text()
    (shadow / "ops.cedar").write_text(good + '\n@id("broken")\npermit (principal, action, resource) when { nope };\n')
    gate = start_with(tmp_path, policy_dir, shadow_policy_dir=str(shadow))
    try:
        port = upstream.http_port
        with httpx.Client(proxy=gate.proxy_url, timeout=10) as client:
            assert client.get(f"http://localhost:{port}/v1/instances").status_code == 200
            assert client.put(f"http://localhost:{port}/v1/instances/i-1").status_code == 403
            shown = status(gate)
            assert shown["status"] == "ok" and shown["policies"]["last_reload_error"] is None
            assert shown["shadow"]["revision"] is None and "ops.cedar" in shown["shadow"]["last_error"]
            assert shown["shadow"]["evaluated"] == 0
            assert any("shadow policies in" in line and "not loaded" in line for line in gate.output)

            (shadow / "ops.cedar").write_text(good)  # mended: taken up as the live set would be
            eventually(lambda: status(gate)["shadow"]["revision"], "the mended shadow set loaded")
            assert client.get(f"http://localhost:{port}/v1/instances").status_code == 200
            eventually(lambda: disagreements(gate), "the listing's disagreement recorded")

            (shadow / "ops.cedar").write_text(good + "\nforbid (principal, action, resource);\n")  # broken again
            broken = eventually(lambda: (s := status(gate)["shadow"])["last_error"] and s, "the reload refused")
            assert "@id" in broken["last_error"] and broken["revision"]  # the last good set stays in use
            assert client.get(f"http://localhost:{port}/v1/instances").status_code == 200
        assert [c.path for c in upstream.calls] == ["/v1/instances"] * 3
        assert json.loads(disagreements(gate)[0][5]) == ["no-instance-listing"]
    finally:
        assert gate.stop() == 0


def test_calls_go_on_when_the_store_refuses_shadow_disagreements_which_status_counts_as_lost(
        tmp_path: Path, policy_dir: Path, upstream: Upstream):
    """A shadow row is written apart from the live decisions: a table gone (a restore of an older schema,
    a role without a grant on it) drops the rows, and never refuses a live call (review 1, finding 1)."""
    shadow = candidate_policies(policy_dir, tmp_path / "shadow")
    gate = start_with(tmp_path, policy_dir, shadow_policy_dir=str(shadow))
    try:
        with sqlite3.connect(gate.database) as db:
            db.execute("DROP TABLE shadow_disagreements")
        url = f"http://localhost:{upstream.http_port}/v1/instances"
        answers = []
        with httpx.Client(proxy=gate.proxy_url, timeout=15) as client:
            for count in range(1, 5):  # live allows each, shadow would deny: a disagreement each time
                answers.append(client.get(url).status_code)
                # The next call comes once this one's row was tried, so it would meet a wedged batch.
                eventually(lambda n=count: status(gate)["shadow"]["lost"] == n, f"{count} rows lost")
        assert answers == [200, 200, 200, 200]
        shown = status(gate)
        assert shown["status"] == "ok" and shown["shadow"]["disagreements"] == 4
        assert len(upstream.calls) == 4
        assert any("shadow disagreements could not be written" in line for line in gate.output)
    finally:
        assert gate.stop() == 0
    assert gate.audit_verify().returncode == 0
    with sqlite3.connect(gate.database) as db:
        assert db.execute("SELECT decision FROM decisions").fetchall() == [("allow",)] * 4


def scrape(gate: Cedargate) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{gate.api_url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def marked(seen: dict, name: str) -> list[str]:
    return sorted(dict(labels)["revision"] for (n, labels), value in seen.items() if n == name and value == 1)


def test_the_shadow_set_reports_under_its_own_metrics_never_as_the_live_policies(
        tmp_path: Path, policy_dir: Path) -> None:
    shadow = candidate_policies(policy_dir, tmp_path / "shadow")
    gate = start_with(tmp_path, policy_dir, shadow_policy_dir=str(shadow))
    try:
        shown = status(gate)
        live, shadow_revision = shown["policies"]["revision"], shown["shadow"]["revision"]
        assert live and shadow_revision and live != shadow_revision
        seen = scrape(gate)
        assert marked(seen, "cedargate_policy_revision") == [live]
        assert marked(seen, "cedargate_shadow_policy_revision") == [shadow_revision]

        # A broken shadow set is a refused shadow reload; an alert on the live set's refusals stays quiet.
        ops = shadow / "ops.cedar"
        ops.write_text(ops.read_text() + "\nforbid (principal, action, resource);\n")
        eventually(lambda: status(gate)["shadow"]["last_error"], "the broken shadow set noticed")
        seen = scrape(gate)
        assert seen.get(("cedargate_policy_reloads_total", (("result", "refused"),)), 0.0) == 0.0
        assert seen[("cedargate_shadow_policy_reloads_total", (("result", "refused"),))] == 1
        assert marked(seen, "cedargate_policy_revision") == [live]
        assert not any("shadow" not in line and "policy reload failed" in line for line in gate.output)
    finally:
        assert gate.stop() == 0
