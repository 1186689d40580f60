"""`cedargate explain --decision ID`: a decision recorded by a real cedargate, explained from its stored
Cedar request and decided again under the policies given; and the clear refusals when it cannot be."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.candidates import candidate_policies, start_with
from tests.support.launch import CEDARGATE, Cedargate
from tests.support.upstream import Upstream, logging_upstream


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    (tmp_path / "upstream").mkdir()
    with logging_upstream(tmp_path / "upstream") as served:
        yield served


def explain(gate: Cedargate, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CEDARGATE), "explain", "--state-dir", str(gate.state_dir), *args],
                          capture_output=True, text=True, timeout=60)


def test_a_recorded_decision_is_explained_and_decided_again(tmp_path: Path, policy_dir: Path, upstream: Upstream):
    gate = start_with(tmp_path, policy_dir)
    try:
        with httpx.Client(proxy=gate.proxy_url, timeout=10) as client:
            listing = client.get(f"http://localhost:{upstream.http_port}/v1/instances?token=t0ps3cret&page=2")
            assert listing.status_code == 200
            refused = client.request("PROPFIND", f"http://localhost:{upstream.http_port}/v1/instances")
            assert refused.status_code >= 400
    finally:
        assert gate.stop() == 0
    with sqlite3.connect(gate.database) as db:
        (listed,), (unmapped,) = db.execute("SELECT decision_id FROM decisions ORDER BY id").fetchall()
    seen = len(upstream.calls)
    candidate = candidate_policies(policy_dir, tmp_path / "candidate")

    again = explain(gate, "--decision", listed, "--policy-dir", str(candidate))
    assert again.returncode == 1, again.stderr  # decided otherwise now
    assert again.stdout.startswith("recorded  ALLOW at ")
    assert "by ops-read (revision" in again.stdout
    assert "decision  DENY" in again.stdout and "no-instance-listing" in again.stdout
    assert "token=[redacted]&page=2" in again.stdout and "t0ps3cret" not in again.stdout

    same = explain(gate, "--decision", listed, "--policy-dir", str(policy_dir), "--json")
    assert same.returncode == 0
    report = json.loads(same.stdout)
    assert (report["decision"], report["recorded"]["decision"], report["recorded"]["policies"]) == (
        "allow", "allow", ["ops-read"])
    assert report["action"] == 'Action::"get"' and report["context"]["path"] == "/v1/instances"

    nothing = explain(gate, "--decision", unmapped, "--policy-dir", str(policy_dir))
    assert nothing.returncode == 2 and "refused before any policy was consulted" in nothing.stderr
    unknown = explain(gate, "--decision", "no-such-id", "--policy-dir", str(policy_dir))
    assert unknown.returncode == 2 and "no decision no-such-id in" in unknown.stderr
    both = explain(gate, "GET", "http://localhost/", "--agent", "ops-bot", "--decision", listed)
    assert both.returncode == 2 and "not both" in both.stderr
    assert len(upstream.calls) == seen  # explaining sent nothing anywhere
