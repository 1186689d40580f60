"""The gate: one call in, one verdict out, the refusal an agent reads, and the row an operator reads."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from proxy_support import make_call, sqlite_rows, wait_until, write_policy_file
from sqlmodel import SQLModel

from proxy.cedar.context import time_context
from proxy.cedar.engine import Engine
from proxy.decision.gate import Gate, Outcome
from proxy.record.store import Recorder, make_engine
from proxy.vocabulary.problems import PROBLEM_BASE, Problem

LIST = ("GET", "http://127.0.0.1:9000/v1/instances")
STOP_DEV = ("POST", "http://localhost:9000/v1/instances/i-1/stop")
STOP_PROD = ("POST", "http://127.0.0.1:9000/v1/instances/i-1/stop")
DELETE_VOLUME = ("DELETE", "http://localhost:9000/v1/volumes/v-1")


def test_allowed_call(gate: Gate):
    verdict = gate.decide(make_call(*LIST))
    assert verdict.allowed and verdict.outcome is Outcome.ALLOW
    assert verdict.status == 200 and verdict.problem is None
    assert [p.policy_id for p in verdict.determining] == ["ops-read"]
    assert verdict.revision == gate.engine.status.revision
    assert (verdict.action, verdict.resource) == ('Action::"get"', 'Host::"127.0.0.1"')


def test_stop_on_dev_host_is_allowed(gate: Gate):
    verdict = gate.decide(make_call(*STOP_DEV))
    assert verdict.allowed
    assert [p.policy_id for p in verdict.determining] == ["ops-stop-instance"]


def test_denied_by_forbid_carries_the_reason_in_an_rfc9457_body(gate: Gate):
    verdict = gate.decide(make_call(*STOP_PROD))
    assert not verdict.allowed and verdict.outcome is Outcome.ESCALATE
    body = verdict.problem_body()

    assert body["type"] == PROBLEM_BASE + "policy-denied" == Problem.POLICY_DENIED.uri
    assert body["title"] == "Denied by policy"
    assert body["status"] == 403
    assert body["detail"] == "Stopping an instance on a production-critical host needs a human decision."
    assert body["decision_id"] == verdict.decision_id and len(body["decision_id"]) == 36
    assert body["policies"] == [
        {
            "id": "protect-production-instances",
            "effect": "forbid",
            "reason": "Stopping an instance on a production-critical host needs a human decision.",
        }
    ]
    assert body["policy_revision"] == gate.engine.status.revision
    assert body["errors"] == []
    assert (body["agent"], body["action"], body["resource"]) == (
        "ops-bot",
        'Action::"post"',
        'Host::"127.0.0.1"',
    )
    assert json.loads(verdict.problem_json()) == body


def test_forbid_without_reason_names_the_policy(policy_dir: Path, recorder: Recorder):
    ops = policy_dir / "ops.cedar"
    ops.write_text(ops.read_text().replace('@reason("Deleting a volume destroys its data for good.")\n', ""))
    verdict = Gate(Engine(policy_dir), recorder).decide(make_call(*DELETE_VOLUME))
    assert verdict.problem is Problem.POLICY_DENIED
    assert verdict.detail == 'forbidden by policy "no-volume-deletion"'
    assert verdict.problem_body()["policies"] == [
        {"id": "no-volume-deletion", "effect": "forbid", "reason": None}
    ]


def test_no_matching_permit_is_a_default_deny(gate: Gate):
    verdict = gate.decide(make_call("PUT", "http://localhost:9000/v1/instances/i-1?x=1"))
    assert verdict.outcome is Outcome.DENY
    body = verdict.problem_body()
    assert body["type"] == "urn:cedargate:problem:no-permit"
    assert body["title"] == "No policy permits this call"
    assert body["status"] == 403
    assert (
        body["detail"]
        == "no policy permits ops-bot to PUT http://localhost:9000/v1/instances/i-1?x=1 (default deny)"
    )
    assert body["policies"] == []


def test_unknown_agent_is_default_denied(gate: Gate):
    verdict = gate.decide(make_call(*LIST, agent="intruder"))
    assert verdict.problem is Problem.NO_PERMIT
    assert "intruder" in verdict.detail and "default deny" in verdict.detail


OVERFLOWING_FORBID = """
@id("allow-ops")
permit (principal in Team::"ops", action, resource);

@id("forbid-overflowing")
forbid (principal, action, resource)
when { context.port + 9223372036854775000 > 0 };
"""


def test_evaluation_error_is_refused_even_with_a_matching_permit(
    policy_dir: Path, recorder: Recorder, db_path: Path
):
    (policy_dir / "ops.cedar").write_text(OVERFLOWING_FORBID)
    gate = Gate(Engine(policy_dir), recorder)
    verdict = gate.decide(make_call("GET", "http://localhost:8080/v1/instances"))

    assert verdict.outcome is Outcome.ERROR and not verdict.allowed
    body = verdict.problem_body()
    assert body["type"] == "urn:cedargate:problem:evaluation-error"
    assert body["status"] == 403
    assert "forbid-overflowing" in body["detail"] and "refused" in body["detail"]
    assert len(body["errors"]) == 1 and "overflow" in body["errors"][0]
    assert [p["id"] for p in body["policies"]] == ["allow-ops"]

    gate.finish(verdict)
    assert recorder.flush()
    (row,) = sqlite_rows(db_path)
    assert row["decision"] == "error"
    recorded_errors = json.loads(row["errors"])
    assert "overflow" in recorded_errors[0] and recorded_errors[-1] == verdict.detail


@pytest.mark.parametrize(
    "call, status, words",
    [
        (make_call("TRACE", "http://localhost/"), 405, "no Cedar action"),
        (
            make_call(
                "POST", "http://localhost/", headers={"Content-Type": "application/json"}, body=b"{oops"
            ),
            400,
            "does not parse",
        ),
        (
            make_call(
                "POST",
                "http://localhost/",
                headers={"Content-Type": "application/json"},
                body=b'{"a": "' + b"x" * 70_000 + b'"}',
            ),
            413,
            "inspection limit",
        ),
        (
            make_call(
                "POST",
                "http://localhost/",
                headers={"Content-Type": "application/json"},
                body=b'{"who": {"__entity": {"type": "Agent", "id": "admin"}}}',
            ),
            400,
            "reserved by Cedar",
        ),
    ],
)
def test_mapping_error_is_refused_with_its_status(gate: Gate, call, status: int, words: str):
    verdict = gate.decide(call)
    assert verdict.outcome is Outcome.ERROR and verdict.problem is Problem.MAPPING_ERROR
    body = verdict.problem_body()
    assert body["type"] == "urn:cedargate:problem:mapping-error"
    assert body["status"] == status and words in body["detail"]
    assert body["action"] is None and body["resource"] is None and body["policy_revision"] is None


def _drop_decisions_table(db_path: Path) -> None:
    con = sqlite3.connect(db_path)
    con.execute("DROP TABLE decisions")
    con.commit()
    con.close()


def test_store_unavailable_refuses_with_503_then_recovers(gate: Gate, recorder: Recorder, db_path: Path):
    assert gate.decide(make_call(*LIST)).allowed

    # Someone drops the table: the next write fails for real.
    _drop_decisions_table(db_path)
    first = gate.decide(make_call(*LIST))
    gate.finish(first, 200)
    wait_until(lambda: recorder.unavailable_reason(), "the recorder to notice the failing store")

    refused = gate.decide(make_call(*LIST))
    assert refused.outcome is Outcome.ERROR and not refused.allowed
    assert refused.status == 503
    assert refused.extra_headers == {"Retry-After": "5"}
    body = refused.problem_body()
    assert body["type"] == "urn:cedargate:problem:store-unavailable"
    assert body["title"] == "Decision record unavailable; call refused"
    assert body["detail"] == "cedargate cannot record decisions right now, so it forwards nothing; retry later"
    assert "no such table" in recorder.unavailable_reason()  # the operator-facing reason
    gate.finish(refused)

    gate.finish(gate.decide(make_call(*LIST)))

    # The table comes back: calls are allowed again and the row kept meanwhile is written; the calls
    # refused for the store's sake are counted (one event per agent), not a row each that would refill
    # the space a full disk needs.
    SQLModel.metadata.create_all(make_engine(f"sqlite:///{db_path}"))
    assert recorder.flush()
    assert recorder.unavailable_reason() is None
    assert gate.decide(make_call(*LIST)).allowed
    rows = sqlite_rows(db_path)
    assert [(r["decision_id"], r["decision"]) for r in rows] == [(first.decision_id, "allow")]
    con = sqlite3.connect(db_path)
    counted = con.execute("SELECT agent, payload FROM audit_log WHERE kind = 'store_refusals'").fetchall()
    con.close()
    assert [(agent, json.loads(payload)["count"]) for agent, payload in counted] == [("ops-bot", 2)]


def test_finish_writes_the_row_an_operator_reads(gate: Gate, recorder: Recorder, db_path: Path):
    allowed = gate.decide(make_call(*LIST))
    gate.finish(allowed, 200)
    denied = gate.decide(make_call(*STOP_PROD))
    gate.finish(denied)
    assert recorder.flush()

    rows = {r["decision_id"]: r for r in sqlite_rows(db_path)}
    assert set(rows) == {allowed.decision_id, denied.decision_id}
    row = rows[allowed.decision_id]
    local = time_context(allowed.at)["local"]  # when it was decided, on the default (UTC) wall clock
    assert {k: row[k] for k in row.keys() if k not in ("id", "at", "duration_ms")} == {
        "decision_id": allowed.decision_id,
        "agent": "ops-bot",
        "method": "GET",
        "scheme": "http",
        "host": "127.0.0.1",
        "port": 9000,
        "path": "/v1/instances",
        "action": 'Action::"get"',
        "resource": 'Host::"127.0.0.1"',
        "decision": "allow",
        "determining_policies": '["ops-read"]',
        "errors": "[]",
        "policy_revision": gate.engine.status.revision,
        "upstream_status": 200,
        "session": None,
        "tool": None,
        "cedar_request": '{"action":{"id":"get","type":"Action"},"context":{"headers":{},"host":"127.0.0.1",'
                         f'"local":{{"date":"{local["date"]}","hour":{local["hour"]},"minute":{local["minute"]},'
                         f'"weekday":"{local["weekday"]}"}},'
                         '"method":"GET","path":"/v1/instances","port":9000,"query":"","scheme":"http",'
                         f'"time":{{"__extn":{{"arg":"{allowed.at:%Y-%m-%dT%H:%M:%SZ}","fn":"datetime"}}}}}},'
                         '"principal":{"id":"ops-bot","type":"Agent"},"resource":{"id":"127.0.0.1","type":"Host"}}',
    }
    assert row["duration_ms"] is not None and row["duration_ms"] >= 0
    # Stored as the decision's UTC moment, not shifted into a local zone.
    assert allowed.at.tzinfo is UTC
    assert datetime.fromisoformat(row["at"]) == allowed.at.replace(tzinfo=None)

    row = rows[denied.decision_id]
    assert (row["decision"], row["determining_policies"], row["upstream_status"], row["path"]) == (
        "escalate",
        '["protect-production-instances"]',
        None,
        "/v1/instances/i-1/stop",
    )


def test_mapping_error_row_records_why(gate: Gate, recorder: Recorder, db_path: Path):
    verdict = gate.decide(make_call("TRACE", "http://localhost/x"))
    gate.finish(verdict)
    assert recorder.flush()
    (row,) = sqlite_rows(db_path)
    assert (row["decision"], row["action"], row["resource"], row["policy_revision"]) == (
        "error",
        "",
        "",
        None,
    )
    assert json.loads(row["errors"]) == [verdict.detail]


# ---- regressions: each was a fail-open or crash before it was fixed -------------------------------


def test_store_failure_detail_does_not_leak_other_agents_calls(gate: Gate, recorder: Recorder, db_path: Path):
    _drop_decisions_table(db_path)
    other = gate.decide(make_call("GET", "http://payroll.internal/v1/employees/4711/salary", agent="hr-bot"))
    gate.finish(other, 200)
    wait_until(lambda: recorder.unavailable_reason(), "the recorder to notice the failing store")

    refused = gate.decide(make_call(*LIST, agent="ops-bot"))
    assert refused.status == 503
    sent = refused.problem_json().decode()
    for secret in ("hr-bot", "payroll.internal", "/v1/employees/4711/salary", other.decision_id):
        assert secret not in sent


class _EngineReloadedMidDecision(Engine):
    """The watcher thread swapping the set between `evaluate` and the gate's policy lookup.

    Forces, deterministically, an interleaving the daemon watcher can produce at any time.
    """

    next_text: str | None = None

    def evaluate(self, request, snapshot=None, *, lifted=False):
        evaluation = super().evaluate(request, snapshot, lifted=lifted)
        if self.next_text is not None:
            write_policy_file(self.policy_dir / "ops.cedar", self.next_text)
            self.next_text = None
            assert self.reload_if_changed()
        return evaluation


def test_a_reload_during_a_decision_does_not_mix_revisions(policy_dir: Path, recorder: Recorder):
    engine = _EngineReloadedMidDecision(policy_dir)
    gate = Gate(engine, recorder)
    old_revision = engine.status.revision
    text = (policy_dir / "ops.cedar").read_text()
    engine.next_text = text.replace('@id("protect-production-instances")', '@id("protect-prod-v2")')

    verdict = gate.decide(make_call(*STOP_PROD))

    assert engine.status.revision != old_revision  # the reload did happen mid-decision
    assert verdict.revision == old_revision
    assert verdict.problem is Problem.POLICY_DENIED
    assert [p.policy_id for p in verdict.determining] == ["protect-production-instances"]


# ---- the proxy's own API, by name at decision time and by address before connecting ---------------


@pytest.mark.parametrize("protected, hosts, port, reaches", [
    ({("127.0.0.1", 8081)}, ["127.0.0.1"], 8081, True),
    ({("127.0.0.1", 8081)}, ["localhost"], 8081, True),
    ({("127.0.0.1", 8081)}, ["::1"], 8081, True),            # another loopback spelling reaches it too
    ({("127.0.0.1", 8081)}, ["127.1"], 8081, True),
    ({("127.0.0.1", 8081)}, ["127.0.0.1"], 8082, False),
    ({("127.0.0.1", 8081)}, ["10.0.0.5", "192.0.2.1"], 8081, False),
    ({("0.0.0.0", 8081)}, ["127.0.0.2"], 8081, True),        # bound to "any": loopback reaches it
    ({("api.internal", 8081)}, ["10.1.1.1"], 8081, False),   # a named API host never raises
    ({("api.internal", 8081)}, ["API.internal."], 8081, True),
])
def test_reaches_own_api(gate: Gate, protected, hosts, port, reaches):
    gate.protected = frozenset(protected)
    assert gate.reaches_own_api(hosts, port) is reaches
