"""A commit whose acknowledgement is lost: the server committed, the client saw its connection cut.

Injected with a real TCP proxy in front of the real PostgreSQL (`tests.support.pg_faults`), which
forwards a chosen COMMIT, lets the server carry it out, and cuts the client off before the answer. The
record must neither wedge nor write anything twice nor lose anything, and an override's state change
must count exactly once: a release whose acknowledgement was lost has consumed its grant, so the held
call goes; one that did not land leaves the grant for it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from proxy_support import make_call
from sqlalchemy import text

from proxy.cedar.escalation import Escalation, Requirement
from proxy.oversight.holds import Holds
from proxy.oversight.overrides import Override, OverrideStatus, OverrideStore
from proxy.oversight.workflow import OverrideWorkflow
from proxy.record import audit
from proxy.record.store import UNSURE_READS, Recorder, make_engine
from tests.support.pg_faults import PgFaults, pg_fault_proxy

pytestmark = pytest.mark.postgres

MANAGER = Requirement("protect-production-instances", ("engineering-manager",), 1)


def _row(path: str) -> dict:
    return {
        "decision_id": str(uuid.uuid4()), "at": datetime.now(UTC), "agent": "ops-bot", "method": "GET",
        "scheme": "http", "host": "localhost", "port": 9000, "path": path, "action": 'Action::"get"',
        "resource": 'Host::"localhost"', "decision": "allow", "determining_policies": "[]", "errors": "[]",
        "policy_revision": "r", "upstream_status": None, "duration_ms": 0.5,
    }


@pytest.fixture
def faults() -> Iterator[PgFaults]:
    with pg_fault_proxy() as proxy:
        yield proxy


@pytest.fixture
def workflow(faults: PgFaults, pg_url: str) -> Iterator[OverrideWorkflow]:
    database = make_engine(faults.url(pg_url))
    recorder = Recorder(database, retry_interval=0.05)
    try:
        yield OverrideWorkflow(OverrideStore(database), recorder, Holds())
    finally:
        recorder.close(timeout=2)
        database.dispose()


def _log(workflow: OverrideWorkflow, sql: str) -> list:
    with workflow.store.engine.connect() as conn:
        return list(conn.execute(text(sql)).all())


def test_lost_acknowledgements_of_batches_write_nothing_twice_and_lose_nothing(workflow: OverrideWorkflow,
                                                                              faults: PgFaults):
    recorder = workflow.recorder
    rows = [_row(f"/v1/{i}") for i in range(30)]
    marker = uuid.uuid4().hex
    faults.cut_commit(rows[7]["decision_id"].encode())  # a batch of decisions, as calls about to go upstream
    waits = [recorder.commit(row) for row in rows[:15]]
    for future in waits:
        future.result(10)  # every call's record held: none would be refused
    faults.cut_commit(marker.encode())  # a batch of events only
    recorder.record_event({"kind": "approval", "override_id": "ovr-1", "actor": "erin", "payload": {"m": marker}})
    assert recorder.flush(10)
    faults.cut_commit(rows[20]["decision_id"].encode())  # and outcomes in a batch with decisions
    for row in rows[15:]:
        recorder.record(row)
    for row in rows[:15]:
        recorder.record_outcome(row["decision_id"], "ops-bot", {"upstream_status": 200, "duration_ms": 2.0,
                                                                "errors": "[]"})
    assert recorder.flush(10)
    assert faults.wait_cut(10, count=3)

    # Not wedged: it records on, healthy.
    recorder.commit(_row("/after")).result(10)
    assert recorder.unavailable_reason() is None
    decisions = _log(workflow, "SELECT decision_id, upstream_status FROM decisions")
    assert sorted(d for d, _ in decisions) == sorted([r["decision_id"] for r in rows] + [
        d for d, _ in decisions if d not in {r["decision_id"] for r in rows}])
    assert len(decisions) == 31
    assert {d: s for d, s in decisions if d in {r["decision_id"] for r in rows[:15]}} == {
        r["decision_id"]: 200 for r in rows[:15]}
    kinds = _log(workflow, "SELECT kind, count(*), count(DISTINCT decision_id) FROM audit_log GROUP BY kind")
    assert sorted(tuple(k) for k in kinds) == [("approval", 1, 0), ("decision", 31, 31), ("outcome", 15, 15)]
    result = audit.verify(workflow.store.engine)
    assert result.ok and result.rows_checked == 47, result.reason


def _open(workflow: OverrideWorkflow) -> Override:
    call = make_call("POST", "http://127.0.0.1:9000/v1/instances/i-1/stop", body=b'{"grace": 30}')
    override, created = workflow.open(
        call, decision_id=str(uuid.uuid4()), escalation=Escalation((MANAGER,), 1800),
        policies=[{"id": MANAGER.policy_id, "reason": None, "annotations": {}}],
        cedar_request={"principal": 'Agent::"ops-bot"', "action": 'Action::"post"',
                       "resource": 'Host::"127.0.0.1"', "context": {}},
        revision="rev-1", justification="instance is wedged",
    )
    assert created
    return override


def _events(workflow: OverrideWorkflow, override_id: str) -> list[tuple[str, str | None]]:
    assert workflow.recorder.flush(10)
    with workflow.store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT kind, decision_id FROM audit_log WHERE override_id = :id ORDER BY seq"), {"id": override_id})]


def test_an_approval_and_a_release_whose_acknowledgements_were_lost_count_once(workflow: OverrideWorkflow,
                                                                              faults: PgFaults):
    override = _open(workflow)
    reason = f"approved {uuid.uuid4().hex}"
    faults.cut_commit(reason.encode())
    voted, decided = workflow.vote(override.id, "erin", frozenset({"engineering-manager"}), "approve", reason)
    assert decided and voted.status == OverrideStatus.GRANTED.value

    released_by = str(uuid.uuid4())
    faults.cut_commit(released_by.encode())
    # The release committed though the workflow's connection was cut: the grant is spent, so the call goes.
    assert workflow.release(voted, decision_id=released_by, payload={}) is True
    assert faults.wait_cut(10, count=2)
    # ...and it was spent once: an identical call's release finds nothing to consume.
    assert workflow.release(voted, decision_id=str(uuid.uuid4()), payload={}) is False

    stored = workflow.store.get(override.id)
    assert stored is not None
    assert (stored.status, stored.release_decision_id) == (OverrideStatus.RELEASED.value, released_by)
    assert _events(workflow, override.id) == [
        ("override_created", override.decision_id), ("approval", None), ("grant", None), ("release", released_by)]
    assert audit.verify(workflow.store.engine).ok


def test_a_release_whose_outcome_cannot_be_read_from_the_log_is_learnt_from_the_request(
        workflow: OverrideWorkflow, faults: PgFaults):
    override = _open(workflow)
    granted, _ = workflow.vote(override.id, "erin", frozenset({"engineering-manager"}), "approve", "ok")
    released_by = str(uuid.uuid4())
    faults.cut_commit(released_by.encode())
    # The recorder's every try to read the log after the cut fails; the workflow's own re-read then works.
    faults.refuse_connections(UNSURE_READS)
    assert workflow.release(granted, decision_id=released_by, payload={}) is True
    assert faults.wait_cut(10)
    assert [kind for kind, _ in _events(workflow, override.id)].count("release") == 1
    assert workflow.release(granted, decision_id=str(uuid.uuid4()), payload={}) is False
