"""How long a decision keeps its Cedar request: requests past `cedar_request_retention` are cleared in
bounded batches, newer ones and the decisions themselves stay, and the audit chain is untouched."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Engine as SAEngine

from proxy.record import audit
from proxy.record.retention import RequestRetention
from proxy.record.store import Recorder, make_engine

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def decision(number: int, age: timedelta) -> dict:
    return {
        "decision_id": f"d-{number}", "at": NOW - age, "agent": "ops-bot", "method": "GET", "scheme": "https",
        "host": "api.example", "port": 443, "path": "/v1/instances", "action": 'Action::"get"',
        "resource": 'Host::"api.example"', "decision": "allow", "determining_policies": '["ops-read"]',
        "errors": "[]", "policy_revision": "r1", "upstream_status": 200, "duration_ms": 1.0,
        "session": None, "tool": None, "cedar_request": f'{{"n":{number}}}',
    }


def kept(database: SAEngine) -> list[str]:
    with database.connect() as conn:
        return list(conn.execute(text(
            "SELECT decision_id FROM decisions WHERE cedar_request IS NOT NULL ORDER BY id")).scalars())


def test_requests_past_their_retention_are_cleared_in_bounded_batches(database_url: str):
    database = make_engine(database_url)
    recorder = Recorder(database, retry_interval=0.05)
    try:
        old = [decision(i, timedelta(days=31, minutes=i)) for i in range(7)]
        new = [decision(100 + i, timedelta(days=29)) for i in range(2)]
        for row in old + new:
            recorder.record(row)
        assert recorder.flush()

        retention = RequestRetention(recorder, timedelta(days=30).total_seconds(), batch_size=3, max_batches=2,
                                     clock=lambda: NOW)
        assert retention.run() == 6  # two batches of three: a run is bounded
        assert kept(database) == ["d-0", "d-100", "d-101"]  # the newest of the old ones waits for the next run
        assert retention.run() == 1
        assert retention.run() == 0
        assert kept(database) == ["d-100", "d-101"]
        recorder.record(decision(7, timedelta(days=40)))  # in the past of where this run stands
        assert recorder.flush()
        restarted = RequestRetention(recorder, timedelta(days=30).total_seconds(), clock=lambda: NOW)
        assert restarted.run() == 1  # a new process walks from the start once
        assert kept(database) == ["d-100", "d-101"]
        with database.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM decisions")).scalar() == 10  # every decision stays
        assert audit.verify(database).ok  # the chain never held the requests
    finally:
        recorder.close()
        database.dispose()


def work_of_a_run_with_nothing_to_clear(path: Path, cleared: int) -> int:
    """SQLite VM instructions (in hundreds) of a retention run after `cleared` requests were cleared long
    ago: counted, so nothing depends on wall time."""
    database = make_engine(f"sqlite:///{path}")
    steps = [0]

    @event.listens_for(database, "connect")
    def _count(dbapi_conn: Any, _record: Any) -> None:
        def tick() -> int:
            steps[0] += 1
            return 0
        dbapi_conn.set_progress_handler(tick, 100)

    recorder = Recorder(database, retry_interval=0.05)
    try:
        with database.begin() as conn:
            conn.execute(text(
                "INSERT INTO decisions (decision_id, at, agent, method, scheme, host, port, path, action,"
                " resource, decision, determining_policies, errors, policy_revision, cedar_request)"
                " VALUES (:id, :at, 'ops-bot', 'GET', 'https', 'api.example', 443, '/v1', 'Action::\"get\"',"
                " 'Host::\"api.example\"', 'allow', '[]', '[]', 'r1', NULL)"),
                [{"id": f"d-{i}", "at": NOW - timedelta(days=400, seconds=-i)} for i in range(cleared)])
        database.dispose()  # every connection from here on counts its instructions
        retention = RequestRetention(recorder, timedelta(days=30).total_seconds(), clock=lambda: NOW)
        retention.run()  # opens the connections
        before = steps[0]
        assert retention.run() == 0
        return steps[0] - before
    finally:
        recorder.close()


def test_a_run_costs_the_same_however_long_the_cleared_history(tmp_path: Path):
    """Decisions are kept for good: a run (every minute, and the first after each restart) must not walk the
    requests it cleared before, which would hold back the calls waiting on the store (review 1, finding 2)."""
    small = work_of_a_run_with_nothing_to_clear(tmp_path / "small.db", 500)
    large = work_of_a_run_with_nothing_to_clear(tmp_path / "large.db", 10_000)
    assert large < 2 * small + 50, f"{large} x100 instructions on 10,000 cleared decisions, {small} on 500"
