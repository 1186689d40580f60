"""How long a decision keeps its Cedar request: requests past `cedar_request_retention` are cleared in
bounded batches, newer ones and the decisions themselves stay, and the audit chain is untouched."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import text
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
