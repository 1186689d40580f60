"""`cedargate replay` over a history made by real calls through a real cedargate: the exact changes a
candidate policy set would make, grouped by policy with redacted examples, with no upstream contacted;
and what each decision keeps of its Cedar request holds no secret."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.candidates import candidate_policies, start_with
from tests.support.launch import AGENT, CEDARGATE, TOKEN, Cedargate
from tests.support.upstream import Upstream, logging_upstream

QUERY_SECRET = "q-secret-9d81f3"
BEARER_SECRET = "bearer-secret-77ab20"
API_KEY_SECRET = "api-key-secret-3c5e"


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    (tmp_path / "upstream").mkdir()
    with logging_upstream(tmp_path / "upstream") as served:
        yield served


def start(tmp_path: Path, policy_dir: Path) -> Cedargate:
    # Selected for the policy's context, yet credentials never reach it.
    return start_with(tmp_path, policy_dir, context_headers=["content-type", "authorization", "x-api-key"])


def make_history(gate: Cedargate, upstream: Upstream) -> None:
    """Five real calls: an allowed listing carrying secrets, an allowed dev stop, an escalated production
    stop (not waited for), a hard deny, and a method no policy can be consulted on."""
    port = upstream.http_port
    with httpx.Client(proxy=gate.proxy_url, timeout=10) as client:
        listed = client.get(f"http://localhost:{port}/v1/instances?access_token={QUERY_SECRET}&page=2",
                            headers={"Authorization": f"Bearer {BEARER_SECRET}", "X-Api-Key": API_KEY_SECRET})
        assert listed.status_code == 200
        assert client.post(f"http://localhost:{port}/v1/instances/i-1/stop").status_code == 200
        escalated = client.post(f"http://127.0.0.1:{port}/v1/instances/i-1/stop",
                                headers={"Prefer": "respond-async"})
        assert escalated.json()["type"].endswith("override-pending")
        assert client.put(f"http://localhost:{port}/v1/instances/i-1").status_code == 403
        assert client.request("PROPFIND", f"http://localhost:{port}/v1/instances").status_code in (400, 405, 501)


def replay(gate: Cedargate, candidate: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CEDARGATE), "replay", "--policies", str(candidate), "--state-dir",
                           str(gate.state_dir), *extra], capture_output=True, text=True, timeout=60)


def test_replay_reports_exactly_what_a_candidate_set_would_change_and_contacts_no_upstream(
        tmp_path: Path, policy_dir: Path, upstream: Upstream):
    gate = start(tmp_path, policy_dir)
    try:
        make_history(gate, upstream)
    finally:
        assert gate.stop() == 0
    seen = len(upstream.calls)
    assert seen == 2  # the listing and the dev stop went upstream

    candidate = candidate_policies(policy_dir, tmp_path / "candidate")

    result = replay(gate, candidate, "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert (report["decisions"], report["replayed"], report["unchanged"], report["changed"]) == (5, 4, 2, 2)
    assert (report["without_request"], report["not_mapped"]) == (0, 1)
    changes = [{k: c[k] for k in ("from", "to", "count", "recorded_policies", "candidate_policies")}
               for c in report["changes"]]
    assert sorted(changes, key=lambda c: c["from"]) == [
        {"from": "allow", "to": "deny", "count": 1, "recorded_policies": ["ops-read"],
         "candidate_policies": ["no-instance-listing"]},
        {"from": "escalate", "to": "allow", "count": 1, "recorded_policies": ["protect-production-instances"],
         "candidate_policies": ["ops-stop-instance"]},
    ]
    by_change = {c["from"]: c["examples"] for c in report["changes"]}
    assert [(e["agent"], e["method"], e["url"], e["action"]) for e in by_change["allow"]] == [
        (AGENT, "GET", f"http://localhost:{upstream.http_port}/v1/instances?access_token=[redacted]&page=2",
         'Action::"get"')]
    assert [(e["method"], e["url"]) for e in by_change["escalate"]] == [
        ("POST", f"http://127.0.0.1:{upstream.http_port}/v1/instances/i-1/stop")]

    text = replay(gate, candidate)
    assert text.returncode == 1
    assert "allow -> deny: 1 call" in text.stdout and "escalate -> allow: 1 call" in text.stdout
    assert "candidate by  no-instance-listing" in text.stdout
    assert "access_token=[redacted]&page=2" in text.stdout and QUERY_SECRET not in text.stdout
    assert "1 were refused before any policy was consulted" in text.stdout

    unchanged = replay(gate, policy_dir)  # the live set itself: nothing would change
    assert unchanged.returncode == 0, unchanged.stderr
    assert "4 unchanged, 0 would change" in unchanged.stdout
    assert len(upstream.calls) == seen  # replay sent nothing anywhere


def test_the_stored_cedar_request_holds_no_secret(tmp_path: Path, policy_dir: Path, upstream: Upstream):
    gate = start(tmp_path, policy_dir)
    try:
        make_history(gate, upstream)
    finally:
        assert gate.stop() == 0
    with sqlite3.connect(gate.database) as db:
        requests = [json.loads(r) for (r,) in db.execute(
            "SELECT cedar_request FROM decisions WHERE cedar_request IS NOT NULL ORDER BY id")]
        everything = "\n".join(str(row) for table in ("decisions", "audit_log")
                               for row in db.execute(f"SELECT * FROM {table}"))  # noqa: S608 (fixed names)
    assert len(requests) == 4  # the PROPFIND was refused before it became a Cedar request
    listing = requests[0]
    assert listing["principal"] == {"type": "Agent", "id": AGENT}
    assert listing["action"] == {"type": "Action", "id": "get"}
    assert listing["context"]["query"] == "access_token=[redacted]&page=2"
    assert listing["context"]["headers"] == {}  # authorization and x-api-key selected, never kept
    for secret in (QUERY_SECRET, BEARER_SECRET, API_KEY_SECRET, TOKEN):
        assert secret not in everything
    # The upstream got the call as sent: redaction is of the record, not of the call.
    assert upstream.calls[0].path == f"/v1/instances?access_token={QUERY_SECRET}&page=2"
    assert upstream.calls[0].headers["authorization"] == f"Bearer {BEARER_SECRET}"


def test_replay_refuses_an_invalid_candidate_set_saying_why(tmp_path: Path, policy_dir: Path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "cedargate.db").touch()
    broken = tmp_path / "broken"
    shutil.copytree(policy_dir, broken)
    (broken / "ops.cedar").write_text('@id("x")\npermit (principal, action == Action::"nope", resource);\n')
    result = subprocess.run([str(CEDARGATE), "replay", "--policies", str(broken), "--state-dir", str(state)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "candidate policies not loaded" in result.stderr and 'ops.cedar:1: @id("x")' in result.stderr
    bad_since = subprocess.run([str(CEDARGATE), "replay", "--policies", str(policy_dir), "--state-dir", str(state),
                                "--since", "last week"], capture_output=True, text=True, timeout=60)
    assert bad_since.returncode == 2 and "--since 'last week'" in bad_since.stderr


def test_replaying_the_live_set_changes_nothing_whatever_the_agent_puts_in_a_secret_parameter(
        tmp_path: Path, policy_dir: Path, upstream: Upstream):
    """Redaction cuts a query secret out of the query (and of a field taken from it), never out of what the
    mapping sets itself: `?code=<its own path>` cannot make the stored path differ from the one decided, so
    the replay of the live set matches the live gate (review 1, finding 3)."""
    gate = start_with(tmp_path, policy_dir)
    path = "/v1/instances/i-1/stop"
    try:
        with httpx.Client(proxy=gate.proxy_url, timeout=10) as client:
            # A dev stop, allowed live by ops-stop-instance (`context.path like "/v1/instances/*/stop"`).
            assert client.post(f"http://localhost:{upstream.http_port}{path}?code={path}").status_code == 200
    finally:
        assert gate.stop() == 0
    with sqlite3.connect(gate.database) as db:
        (stored,) = db.execute("SELECT cedar_request FROM decisions").fetchone()
    context = json.loads(stored)["context"]
    assert (context["path"], context["query"]) == (path, "code=[redacted]")
    result = replay(gate, policy_dir, "--json")
    report = json.loads(result.stdout)
    assert (report["replayed"], report["changed"]) == (1, 0), report
