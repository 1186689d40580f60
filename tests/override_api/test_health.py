"""/healthz and /status as an operator (or a load balancer) reads them, against a real running core."""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from sqlmodel import Session

from override_api.main import create_app
from proxy.calls.mapping import Call
from proxy.cedar.escalation import Escalation, Requirement, Tier
from proxy.oversight.overrides import Override, aware
from proxy.runtime import Runtime
from proxy.settings.agents import hash_token
from proxy.settings.config import ApproverCredential
from tests.support.runtime import started_runtime
from tests.support.waiting import wait_until


def decide_and_record(runtime: Runtime) -> None:
    """One call through the gate, finished as the enforcer finishes it once the upstream answered."""
    call = Call(
        agent="ops-bot", method="GET", scheme="http", host="localhost", port=9000, path="/v1/instances"
    )
    runtime.gate.finish(runtime.gate.decide(call), 200)


def drop_decisions_table(runtime: Runtime) -> tuple[Path, list[str]]:
    """Break the record as a bad migration or an operator's mistake would; returns what restores it."""
    database = Path(runtime.settings.state_dir) / "cedargate.db"
    db = sqlite3.connect(database)
    try:
        with db:
            schema = [sql for (sql,) in db.execute(
                "SELECT sql FROM sqlite_master"
                " WHERE tbl_name = 'decisions' AND sql IS NOT NULL ORDER BY type DESC"
            )]
            db.execute("DROP TABLE decisions")
    finally:
        db.close()
    return database, schema


def restore(database: Path, schema: list[str]) -> None:
    db = sqlite3.connect(database)
    try:
        with db:
            for sql in schema:
                db.execute(sql)
    finally:
        db.close()


def test_healthz_is_ok_while_the_proxy_can_decide_and_record(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_status_shows_the_live_policy_revision_and_a_healthy_store(client, runtime, policy_dir):
    response = client.get("/status")
    assert response.status_code == 200
    status = response.json()
    assert status["status"] == "ok"
    policies = status["policies"]
    assert re.fullmatch(r"[0-9a-f]{64}", policies["revision"])
    assert policies["revision"] == runtime.engine.status.revision
    assert policies["policies"] == 14
    assert sorted(policies["files"]) == ["actions.cedarschema", "actions.yaml", "entities.json", "github.cedar",
                                         "ops.cedar", "payments.cedar", "schema.cedarschema"]
    assert policies["directory"] == str(policy_dir)
    assert policies["loaded_at"] is not None
    assert policies["last_reload_error"] is None
    assert status["store"]["healthy"] is True
    assert status["store"]["last_error"] is None


def test_status_counts_the_records_written(client, runtime):
    decide_and_record(runtime)
    assert runtime.recorder.flush()
    assert client.get("/status").json()["store"]["records_written"] == 1


def test_status_counts_the_dead_journal_segments_waiting_and_the_rows_set_aside(client, runtime, monkeypatch):
    """A stopped process's journal segment holding a good row and one the store refuses (a NOT NULL column
    missing). While another connection holds the store's write lock the look for dead journals cannot replay
    it: /status counts the segment waiting; once it can, the good row is committed and the other set aside."""
    from proxy.record import journal, store  # noqa: PLC0415  (only this test needs them)

    monkeypatch.setattr(store, "BUSY_TIMEOUT", 0.1)  # the look waits this long for the write lock
    recorder = runtime.recorder
    assert recorder._journal_dir is not None
    good = {"decision_id": str(uuid.uuid4()), "at": datetime.now(UTC), "agent": "ops-bot", "method": "GET",
            "scheme": "http", "host": "localhost", "port": 9000, "path": "/v1/instances", "action": 'Action::"get"',
            "resource": 'Host::"localhost"', "decision": "allow", "errors": "[]"}
    bad = {**good, "decision_id": str(uuid.uuid4())}
    del bad["method"]
    segment = Path(recorder._journal_dir) / f"1-1-deadbeef{journal.SUFFIX}"
    segment.write_bytes(journal.encode(good) + journal.encode(bad))
    segment.chmod(0o600)
    holder = sqlite3.connect(recorder._journal_dir[:-len(".journal")], isolation_level=None)
    try:
        with recorder._writing:  # as the writer looks, every few seconds
            holder.execute("BEGIN IMMEDIATE")
            assert recorder._replay_dead() == 0
            holder.execute("ROLLBACK")
            waiting = client.get("/status").json()["store"]
            assert recorder._replay_dead() == 1
    finally:
        holder.close()
    assert (waiting["journal_segments_waiting"], waiting["journal_rows_set_aside"]) == (1, 0)
    after = client.get("/status").json()["store"]
    assert (after["journal_segments_waiting"], after["journal_rows_set_aside"]) == (0, 1)
    assert not segment.exists()


def test_failed_reload_is_reported_while_the_previous_revision_stays_live(client, runtime, policy_dir):
    live = client.get("/status").json()["policies"]
    (policy_dir / "broken.cedar").write_text('@id("half-written")\npermit (principal, action, resource\n')

    assert runtime.engine.reload() is False

    status = client.get("/status").json()
    assert status["status"] == "degraded"
    policies = status["policies"]
    assert "broken.cedar" in policies["last_reload_error"]
    assert policies["last_reload_error_at"] is not None
    assert policies["revision"] == live["revision"]
    assert policies["policies"] == live["policies"]
    assert policies["files"] == live["files"]
    # The old set still decides every call, so the proxy is still serving.
    assert client.get("/healthz").status_code == 200


def test_fixed_policies_clear_the_reload_error(client, runtime, policy_dir):
    live = client.get("/status").json()["policies"]["revision"]
    broken = policy_dir / "broken.cedar"
    broken.write_text('@id("half-written")\npermit (principal, action, resource\n')
    assert runtime.engine.reload() is False
    broken.unlink()

    assert runtime.engine.reload() is True

    status = client.get("/status").json()
    assert status["status"] == "ok"
    assert status["policies"]["last_reload_error"] is None
    assert status["policies"]["revision"] == live


def test_healthz_is_503_while_the_store_fails_and_recovers_with_it(client, runtime):
    database, schema = drop_decisions_table(runtime)
    decide_and_record(runtime)
    wait_until(runtime.recorder.unavailable_reason, "the recorder to report the store failing")

    response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert "decision store" in body["detail"]
    assert "no such table: decisions" in body["detail"]
    store = client.get("/status").json()
    assert store["status"] == "degraded"
    assert store["store"]["healthy"] is False
    assert "no such table: decisions" in store["store"]["last_error"]

    restore(database, schema)
    assert runtime.recorder.flush(timeout=20), "the held-back row was not written after the store recovered"

    assert client.get("/healthz").json() == {"status": "ok"}
    db = sqlite3.connect(database)
    try:
        assert db.execute("SELECT agent, method, path, upstream_status FROM decisions").fetchall() == [
            ("ops-bot", "GET", "/v1/instances", 200)
        ]
    finally:
        db.close()


def test_status_counts_rows_held_back_by_a_failing_store_as_pending(client, runtime):
    database, schema = drop_decisions_table(runtime)
    decide_and_record(runtime)
    wait_until(runtime.recorder.unavailable_reason, "the recorder to report the store failing")
    try:
        assert client.get("/status").json()["store"]["pending_records"] == 1
    finally:
        restore(database, schema)
        assert runtime.recorder.flush(timeout=20)


def test_openapi_document_is_served(client: TestClient):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["info"]["title"] == "cedargate override API"
    assert {"/healthz", "/status"} <= set(document["paths"])


def test_status_names_the_escalations_no_approver_could_grant(client):
    # This core knows no approvers at all: every escalating policy waits for nobody.
    unreachable = {u["policy_id"]: u for u in client.get("/status").json()["unreachable_escalations"]}
    assert set(unreachable) == {"protect-production-instances", "no-volume-deletion", "low-confidence-writes",
                                "large-refunds", "no-repository-deletion", "staging-after-hours"}
    assert unreachable["no-volume-deletion"]["roles"] == ["security", "lead-engineer"]
    assert unreachable["large-refunds"]["why"] == 'no configured approver holds role "finance"'
    assert unreachable["large-refunds"]["file"] == "payments.cedar"


def test_status_names_only_the_role_nobody_with_a_token_holds(tmp_path: Path, policy_dir: Path, caplog):
    approvers = {name: ApproverCredential(token_sha256=hash_token(name), roles=roles) for name, roles in
                 {"erin": ("engineering-manager", "on-call"), "sam": ("security",),
                  "lee": ("lead-engineer",), "sid": ("secondary-on-call",)}.items()}
    approvers["fran"] = ApproverCredential(token_env="CEDARGATE_TEST_UNSET_FRAN_TOKEN", roles=("finance",))
    with caplog.at_level(logging.WARNING), \
            started_runtime(policy_dir, tmp_path / "state", approvers=approvers) as runtime, \
            TestClient(create_app(runtime)) as client:
        unreachable = client.get("/status").json()["unreachable_escalations"]
    assert [(u["policy_id"], u["roles"]) for u in unreachable] == [("large-refunds", ["finance"])]
    assert "held only by fran, without a token" in unreachable[0]["why"]
    # Start-up said so too, naming the policy and the role.
    warned = [r.getMessage() for r in caplog.records if "escalates to nobody" in r.getMessage()]
    assert len(warned) == 1 and 'policy "large-refunds"' in warned[0] and 'role "finance"' in warned[0]


def test_a_reloaded_policy_escalating_to_nobody_is_warned_about_and_listed(client, runtime, policy_dir, caplog):
    (policy_dir / "extra.cedar").write_text(
        '@id("ask-the-board")\n@reason("Only the board decides.")\n@escalate("board")\n'
        'forbid (principal, action == Action::"delete", resource) when { context.path like "/v1/boards/*" };\n')
    with caplog.at_level(logging.WARNING):
        assert runtime.engine.reload()
    assert any('policy "ask-the-board" (extra.cedar:1)' in r.getMessage()
               and 'no configured approver holds role "board"' in r.getMessage() for r in caplog.records)
    listed = [u["policy_id"] for u in client.get("/status").json()["unreachable_escalations"]]
    assert "ask-the-board" in listed


def test_status_shows_each_notification_channel_owing_and_failing_without_its_secret(
        tmp_path: Path, policy_dir: Path, monkeypatch, caplog):
    """A webhook whose receiver is down: the request opens all the same, the channel owes its message,
    and /status says since when it fails and why (the host, never the URL's path or the secret)."""
    import socket
    import uuid

    from proxy.cedar.escalation import Escalation, Requirement

    with socket.socket() as probe:  # a port nothing listens on: the receiver is down
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("CEDARGATE_TEST_HOOK_SECRET", "s3cret-hook")
    notifications = {
        "channels": {"ops-hook": {"type": "webhook", "url": f"http://127.0.0.1:{port}/hook?token=abc",
                                  "secret_env": "CEDARGATE_TEST_HOOK_SECRET"},
                     "mail": {"type": "email", "from": "cedargate@example.test", "host_env": "CEDARGATE_TEST_NO_SMTP",
                              "to": ["oncall@example.test"]}},
        "routes": [{"events": ["opened"], "channels": ["ops-hook", "mail"]}],
    }
    with caplog.at_level(logging.WARNING), \
            started_runtime(policy_dir, tmp_path / "state", notifications=notifications) as runtime, \
            TestClient(create_app(runtime)) as client:
        assert client.get("/status").json()["notifications"]["ops-hook"]["pending"] == 0
        call = Call(agent="ops-bot", method="POST", scheme="http", host="127.0.0.1", port=9000,
                    path="/v1/instances/i-1/stop")
        runtime.workflow.open(call, decision_id=str(uuid.uuid4()),
                              escalation=Escalation((Requirement("p", ("engineering-manager",), 1),), 600),
                              policies=[{"id": "p", "reason": None, "annotations": {}}],
                              cedar_request={"action": 'Action::"post"', "resource": 'Host::"127.0.0.1"'},
                              revision="r", justification=None)
        assert runtime.notifier is not None
        runtime.notifier.sweep()
        shown = client.get("/status").json()["notifications"]
    hook, mail = shown["ops-hook"], shown["mail"]
    assert (hook["pending"], hook["delivered"], hook["failed"]) == (1, 0, 0)
    assert hook["failing_since"] is not None and hook["retry_at"] is not None
    assert hook["last_error"].startswith(f"http://127.0.0.1:{port} could not be reached")
    assert "token" not in hook["last_error"] and "s3cret" not in hook["last_error"]
    assert mail["pending"] == 1 and "CEDARGATE_TEST_NO_SMTP" in mail["last_error"]
    # Start-up warned of the variable that is not set.
    assert any("notification channel mail: environment variable CEDARGATE_TEST_NO_SMTP" in r.getMessage()
               for r in caplog.records)


def test_status_has_no_notifications_when_none_are_configured(client):
    assert client.get("/status").json()["notifications"] == {}


def test_status_shows_the_clock_policies_read_and_the_tool_hints_kept(client, runtime):
    runtime.gate.clock = lambda: datetime(2026, 12, 5, 21, 30, tzinfo=UTC)
    runtime.gate.hints.observe("tools", {"jsonrpc": "2.0", "id": 1, "result": {"tools": [
        {"name": "wipe", "annotations": {"destructiveHint": True}}, {"name": "peek"}]}})
    status = client.get("/status").json()
    assert status["clock"] == {"time_zone": "UTC", "now": "2026-12-05T21:30:00Z",
                               "local": {"hour": 21, "minute": 30, "weekday": "saturday", "date": "2026-12-05"}}
    assert status["tool_hints"] == {"tools": 2}


def test_status_says_how_many_requests_climbed_their_chain_and_how_many_steps_are_due(runtime, client):
    assert client.get("/status").json()["escalation_chains"] == {"escalated": 0, "steps_due": 0}
    chain = Requirement("staging-after-hours", ("on-call",), 1, (Tier(600, ("secondary-on-call",)),))
    override, _ = runtime.workflow.open(
        Call(agent="ops-bot", method="POST", scheme="https", host="cloud.staging.example", port=443,
             path="/v1/instances/i-9/stop"),
        decision_id=str(uuid.uuid4()), escalation=Escalation((chain,), 3600),
        policies=[{"id": chain.policy_id, "reason": None, "annotations": {}}],
        cedar_request={"principal": 'Agent::"ops-bot"', "action": 'Action::"post"',
                       "resource": 'Host::"cloud.staging.example"', "context": {}},
        revision="rev-1", justification=None)
    with Session(runtime.overrides.engine) as session:  # eleven minutes later, before the job has run
        row = session.get(Override, override.id)
        assert row is not None
        row.created_at -= timedelta(minutes=11)
        row.next_step_at = aware(row.next_step_at) - timedelta(minutes=11)  # type: ignore[arg-type]
        session.add(row)
        session.commit()
    assert client.get("/status").json()["escalation_chains"] == {"escalated": 0, "steps_due": 1}
    assert [kind for _, kind in runtime.workflow.advance_due()] == ["escalated"]
    assert client.get("/status").json()["escalation_chains"] == {"escalated": 1, "steps_due": 0}


def test_each_proxy_process_and_its_pid_are_shown_to_auditors_only(tmp_path: Path, policy_dir: Path):
    """/status answers anyone who reaches the API: it gives the sums. Each process's figures, with its pid,
    are for an approver holding the auditor role, like the report."""
    approvers = {name: ApproverCredential(token_sha256=hash_token(name), roles=roles) for name, roles in
                 {"erin": ("engineering-manager",), "audra": ("auditor",)}.items()}
    with started_runtime(policy_dir, tmp_path / "state", approvers=approvers) as runtime, \
            TestClient(create_app(runtime)) as client:
        limits = client.get("/status").json()["limits"]
        assert "processes" not in limits and "pid" not in str(limits)
        assert client.get("/status/processes").status_code == 401
        refused = client.get("/status/processes", headers={"Authorization": "Bearer erin"})
        assert refused.status_code == 403 and "auditor" in refused.json()["detail"]
        [here] = client.get("/status/processes", headers={"Authorization": "Bearer audra"}).json()
    assert here["pid"] == os.getpid()
    assert (here["max_held_calls"], here["held_calls"]) == (limits["max_held_calls"], limits["held_calls"])
