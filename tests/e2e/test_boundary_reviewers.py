"""What reviewers face, end to end: floods of override requests are refused at the door, a reviewer sees
exactly the call they would grant (escaped, its query secrets redacted, only if their roles decide it),
and the state dir holding the record is private.

Real `cedargate run`, a real upstream on loopback, httpx as the agent, the real `cedargate overrides`
CLI as the reviewer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import ssl
import stat
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from e2e_support import APPROVERS, CEDARGATE, REPO, Cedargate, recorded_rows, start_cedargate, write_config

from proxy.calls.mapping import Call
from proxy.cedar.escalation import Escalation, Requirement
from proxy.oversight.overrides import OverrideStore
from proxy.record.store import make_engine

STOP = "/v1/instances/i-{n}/stop"
MANAGER_REASON = "Stopping an instance on a production-critical host needs a human decision."
MANAGER = Requirement("protect-production-instances", ("engineering-manager",), 1)
# The reviewers of these tests: the usual ones and an auditor, who sees every request and decides none.
REVIEWERS = {**APPROVERS, "audra": ("audra-token-7", ["auditor"])}


@pytest.fixture
def start(tmp_path: Path, policy_dir: Path, upstream) -> Iterator[Callable[..., Cedargate]]:
    """Start a cedargate with extra settings; stopped after the test."""
    started: list[Cedargate] = []

    def run(**settings) -> Cedargate:
        approvers = {name: {"token_sha256": _sha256(token), "roles": roles}
                     for name, (token, roles) in REVIEWERS.items()}
        config = write_config(tmp_path / "c.yaml", policy_dir, tmp_path / "state", upstream,
                              approvers=approvers, **settings)
        gate = start_cedargate(config)
        started.append(gate)
        upstream.reset()
        return gate

    yield run
    for gate in started:
        gate.stop()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def agent(gate: Cedargate, **kwargs) -> httpx.Client:
    return httpx.Client(proxy=gate.proxy_url, verify=ssl.create_default_context(cafile=gate.ca_cert),
                        timeout=30, **kwargs)


def api(gate: Cedargate, method: str, path: str, reviewer: str = "erin", **kwargs) -> httpx.Response:
    return httpx.request(method, f"{gate.api_url}{path}", timeout=10,
                         headers={"Authorization": f"Bearer {REVIEWERS[reviewer][0]}"}, **kwargs)


def cli(gate: Cedargate, *args: str, reviewer: str = "erin") -> subprocess.CompletedProcess:
    env = {**os.environ, "CEDARGATE_APPROVER_TOKEN": REVIEWERS[reviewer][0], "CEDARGATE_API": gate.api_url}
    return subprocess.run([str(CEDARGATE), "overrides", *args], capture_output=True, text=True, env=env,
                          timeout=30, cwd=REPO)


def stop_url(upstream, n: object = "0abc") -> str:
    return f"http://127.0.0.1:{upstream.http_port}{STOP.format(n=n)}"


def rows(gate: Cedargate, sql: str, expected: int, timeout: float = 10.0) -> list[dict]:
    """Rows of the record once the batching writer has committed `expected` of them."""
    return recorded_rows(gate, sql, expected, timeout)


def assert_problem(response: httpx.Response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == f"urn:cedargate:problem:{kind}" and problem["status"] == status
    return problem


# --- override floods ------------------------------------------------------------------------------


def test_an_agent_past_its_pending_cap_is_refused_429_with_retry_after(start, upstream):
    gate = start(max_pending_overrides_per_agent=3, override_rate=100)
    with agent(gate, headers={"Prefer": "respond-async"}) as http:
        answers = [http.post(stop_url(upstream, n), json={"grace": 30}) for n in range(5)]
        retry = http.post(stop_url(upstream, 0), json={"grace": 30})

    opened = [assert_problem(a, 403, "override-pending")["override_id"] for a in answers[:3]]
    for refused in answers[3:]:
        problem = assert_problem(refused, 429, "too-many-pending-overrides")
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert problem["retry_after"] == int(refused.headers["retry-after"])
        assert problem["detail"].startswith(MANAGER_REASON) and "override_id" not in problem
    # The identical retry of a pending call still finds its request: it is not a new one.
    assert assert_problem(retry, 403, "override-pending")["override_id"] == opened[0]
    assert sorted(o["id"] for o in api(gate, "GET", "/overrides?status=pending").json()) == sorted(opened)
    assert upstream.calls == []
    # Refused, not held, and recorded: a decision row for every call, and why no request was opened.
    refusals = rows(gate, "SELECT * FROM audit_log WHERE kind = 'override_refused' ORDER BY seq", 2)
    assert [json.loads(r["payload"])["reason"] for r in refusals] == ["too-many-pending"] * 2
    decisions = rows(gate, "SELECT decision_id, decision FROM decisions", 6)
    assert [d["decision"] for d in decisions] == ["escalate"] * 6
    assert {r["decision_id"] for r in refusals} == {a.headers["x-cedargate-decision"] for a in answers[3:]}


def test_an_agent_opening_requests_too_fast_is_refused_429_with_retry_after(start, upstream):
    gate = start(override_rate=2)
    with agent(gate, headers={"Prefer": "respond-async"}) as http:
        answers = [http.post(stop_url(upstream, n)) for n in range(4)]
        retry = http.post(stop_url(upstream, 0))

    first = assert_problem(answers[0], 403, "override-pending")["override_id"]
    assert_problem(answers[1], 403, "override-pending")
    for refused in answers[2:]:
        problem = assert_problem(refused, 429, "override-rate-limited")
        assert 1 <= int(refused.headers["retry-after"]) <= 30  # one new request every 30 s
        assert "override_rate" in problem["detail"]
    assert assert_problem(retry, 403, "override-pending")["override_id"] == first
    assert len(api(gate, "GET", "/overrides").json()) == 2
    assert upstream.calls == []


def test_an_escalated_call_whose_body_is_too_large_to_review_is_refused_413(start, upstream):
    gate = start(max_override_body_bytes=1024)
    with agent(gate, headers={"Prefer": "respond-async"}) as http:
        big = http.post(stop_url(upstream), json={"grace": 30, "note": "x" * 2000})
        small = http.post(stop_url(upstream), json={"grace": 30, "note": "x" * 100})

    problem = assert_problem(big, 413, "override-body-too-large")
    assert "max_override_body_bytes" in problem["detail"] and "retry-after" not in big.headers
    small_id = assert_problem(small, 403, "override-pending")["override_id"]
    # Nothing stored truncated: only the small call waits for review, and whole.
    [pending] = api(gate, "GET", "/overrides").json()
    assert pending["id"] == small_id
    assert json.loads(api(gate, "GET", f"/overrides/{small_id}").json()["body"])["note"] == "x" * 100
    assert upstream.calls == []


# --- what the reviewer is shown -------------------------------------------------------------------

# A DELETE dressed up as a harmless POST: erase the line, return, move up, write a new line; then a
# right-to-left override in the query.
DISGUISED = "/v1/instances/i-1\x1b[2K\r\x1b[1APOST /v1/instances/i-1/harmless"


def test_overrides_list_and_show_escape_what_a_terminal_would_act_on(start, upstream):
    """Inserted through the core, as the proxy would (were it to let such a URL through), so this holds
    whatever the proxy refuses."""
    gate = start()
    database = make_engine(f"sqlite:///{gate.database}")
    try:
        call = Call(agent="ops-bot", method="DELETE", scheme="http", host="127.0.0.1",
                    port=upstream.http_port, path=DISGUISED, query="zone=\u202eatad-doirp")
        override, _ = OverrideStore(database).open_or_attach(
            call, decision_id=str(uuid.uuid4()),
            escalation=Escalation((MANAGER,), 600),
            policies=[{"id": "protect-production-instances", "reason": MANAGER_REASON, "annotations": {}}],
            cedar_request={"principal": 'Agent::"ops-bot"', "action": 'Action::"delete"',
                           "resource": 'Host::"127.0.0.1"', "context": {"path": call.path}},
            revision="rev-1", justification=None,
        )
    finally:
        database.dispose()

    listed = cli(gate, "list")
    assert listed.returncode == 0 and override.id in listed.stdout
    shown = cli(gate, "show", override.id)
    assert shown.returncode == 0 and json.loads(shown.stdout)["url"] == call.url
    for output in (listed.stdout, shown.stdout):
        assert not any(c in output for c in "\x1b\r\u202e")
    assert "DELETE http://127.0.0.1:" in listed.stdout
    assert "i-1\\x1b[2K\\r\\x1b[1APOST /v1/instances/i-1/harmless?zone=\\u202eatad-doirp" in listed.stdout


def test_approvers_see_only_the_requests_their_roles_decide_and_auditors_all(start, upstream):
    # The bundled policies hold a volume deletion for security and a lead engineer (ops-delete-volumes
    # permits it beneath no-volume-deletion), and a production stop for an engineering manager.
    gate = start()
    with agent(gate, headers={"Prefer": "respond-async"}) as http:
        stop_id = assert_problem(http.post(stop_url(upstream)), 403, "override-pending")["override_id"]
        volume = http.delete(f"http://localhost:{upstream.http_port}/v1/volumes/vol-7")
        volume_id = assert_problem(volume, 403, "override-pending")["override_id"]

    def listed(reviewer: str) -> set[str]:
        return {o["id"] for o in api(gate, "GET", "/overrides", reviewer).json()}

    assert listed("erin") == {stop_id}
    assert listed("sam") == listed("lee") == {volume_id}
    assert listed("audra") == {stop_id, volume_id}
    hidden = api(gate, "GET", f"/overrides/{volume_id}", "erin")
    assert hidden.status_code == 404 and hidden.json()["detail"] == f"no override request {volume_id}"
    assert api(gate, "GET", f"/overrides/{stop_id}", "sam").status_code == 404
    assert api(gate, "GET", f"/overrides/{volume_id}", "audra").status_code == 200
    vote = api(gate, "POST", f"/overrides/{stop_id}/approve", "audra", json={"reason": "fine by me"})
    assert vote.status_code == 403  # seeing everything is not deciding anything
    by_cli = cli(gate, "list", reviewer="sam")
    assert volume_id in by_cli.stdout and stop_id not in by_cli.stdout
    assert upstream.calls == []


REPORTS_ROUTE = """
  # For these tests: a route whose typed field comes from a secret query parameter.
  - host: localhost
    unknown: http
    routes:
      - route: GET /v1/reports
        action: read_report
        severity: low
        groups: [read]
        fields:
          key: {from: query, type: Long}
"""


def test_query_secrets_are_redacted_everywhere_but_the_grant_binds_to_them(start, upstream, policy_dir):
    manifest = policy_dir / "actions.yaml"
    manifest.write_text(manifest.read_text() + REPORTS_ROUTE)
    subprocess.run([str(CEDARGATE), "schema", str(policy_dir)], check=True, capture_output=True, timeout=60)
    gate = start()
    secret, other, key = "tok_live_7f3a9c", "tok_live_0000ff", "sk_live_4b1d2e"
    url = stop_url(upstream) + f"?access_token={secret}&zone=a"
    with agent(gate, headers={"Prefer": "respond-async"}) as http:  # the same on every try: it is bound too
        pending = http.post(url)
        override_id = assert_problem(pending, 403, "override-pending")["override_id"]
        # A refusal whose message quotes a value taken from a secret parameter.
        mistyped = http.get(f"http://localhost:{upstream.http_port}/v1/reports?key={key}")
        assert_problem(mistyped, 400, "mapping-error")

        shown = api(gate, "GET", f"/overrides/{override_id}").json()
        assert shown["url"] == stop_url(upstream) + "?access_token=[redacted]&zone=a"
        assert shown["cedar_request"]["context"]["query"] == "access_token=[redacted]&zone=a"
        listed = cli(gate, "list")
        assert "access_token=[redacted]&zone=a" in listed.stdout and secret not in listed.stdout

        granted = api(gate, "POST", f"/overrides/{override_id}/approve", json={"reason": "ok"})
        assert granted.json()["status"] == "granted"
        another = http.post(url.replace(secret, other))
        assert assert_problem(another, 403, "override-pending")["override_id"] != override_id
        released = http.post(url)

    assert released.status_code == 200
    # The upstream got the call exactly as decided and granted, credential included.
    assert [c.path for c in upstream.calls] == [STOP.format(n="0abc") + f"?access_token={secret}&zone=a"]
    [error] = rows(gate, "SELECT errors FROM decisions WHERE path = '/v1/reports'", 1)
    assert "[redacted]" in error["errors"]
    rows(gate, "SELECT * FROM audit_log WHERE kind = 'release'", 1)
    with sqlite3.connect(gate.database) as db:
        record = "\n".join(db.iterdump())
    for value in (secret, other, key):
        assert value not in record  # not in decisions, audit payloads or override requests
        assert value not in "".join(gate.output)  # nor in the log
    assert "access_token=[redacted]&zone=a" in "".join(gate.output)  # the log names the call, redacted


# --- the state dir --------------------------------------------------------------------------------


@pytest.mark.parametrize("existing_database", [False, True])
def test_an_existing_state_dir_is_made_private_and_the_store_files_0600(start, tmp_path, existing_database):
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    if existing_database:
        (state / "cedargate.db").touch()
        os.chmod(state / "cedargate.db", 0o644)
    umask = os.umask(0o022)  # the usual umask, which cedargate inherits: SQLite alone would make 0644
    try:
        gate = start()
    finally:
        os.umask(umask)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()
             if p.name.startswith("cedargate.db")}
    assert set(files) >= {"cedargate.db", "cedargate.db-wal", "cedargate.db-shm", "cedargate.db.journal"}
    # The journal of rows not yet committed is a directory (0700) of segment files (0600).
    assert files == {name: 0o700 if name == "cedargate.db.journal" else 0o600 for name in files}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (state / "cedargate.db.journal").iterdir())
    assert gate.process.poll() is None
