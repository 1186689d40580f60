"""The decision record: batched writes lose nothing, a failing store is reported and recovered from.

SQLite tests use a temporary file; PostgreSQL tests (marked `postgres`) use the local server, each in
its own schema.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from proxy_support import sqlite_rows, wait_until
from sqlalchemy import text
from sqlmodel import SQLModel

from proxy.record import audit, store
from proxy.record.store import Recorder, StoreUnavailable, count_decisions, make_engine


def _row(i: int = 0, **overrides) -> dict:
    row = {
        "decision_id": str(uuid.uuid4()),
        "at": datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC) + timedelta(seconds=i),
        "agent": "ops-bot",
        "method": "GET",
        "scheme": "http",
        "host": "localhost",
        "port": 9000,
        "path": f"/v1/instances/i-{i}",
        "action": 'Action::"get"',
        "resource": 'Host::"localhost"',
        "decision": ("allow", "deny", "error")[i % 3],
        "determining_policies": '["ops-read"]',
        "errors": "[]",
        "policy_revision": "r" * 64,
        "upstream_status": 200,
        "duration_ms": 1.25,
    }
    row.update(overrides)
    return row


@pytest.fixture
def sqlite_recorder(db_path: Path) -> Iterator[Recorder]:
    rec = Recorder(make_engine(f"sqlite:///{db_path}"), batch_size=500, retry_interval=0.05)
    yield rec
    rec.close(timeout=2)
    rec.engine.dispose()


def test_recorder_creates_the_table_in_a_new_file(sqlite_recorder: Recorder, db_path: Path):
    assert db_path.exists()
    assert sqlite_rows(db_path) == []
    assert sqlite_recorder.healthy and sqlite_recorder.unavailable_reason() is None


def test_batched_writes_keep_every_row(sqlite_recorder: Recorder, db_path: Path):
    rows = [_row(i) for i in range(3001)]
    for row in rows:
        sqlite_recorder.record(row)
    assert sqlite_recorder.flush()

    assert sqlite_recorder.pending == 0
    assert sqlite_recorder.written == 3001
    con = sqlite3.connect(db_path)
    assert con.execute("SELECT count(*), count(DISTINCT decision_id) FROM decisions").fetchone() == (
        3001,
        3001,
    )
    con.close()
    assert count_decisions(sqlite_recorder.engine) == {"allow": 1001, "deny": 1000, "error": 1000}
    (stored,) = sqlite_rows(db_path, "decision_id = ?", (rows[1234]["decision_id"],))
    assert (stored["path"], stored["decision"], stored["upstream_status"], stored["duration_ms"]) == (
        "/v1/instances/i-1234",
        "deny",
        200,
        1.25,
    )
    assert datetime.fromisoformat(stored["at"]) == datetime(2025, 1, 2, 3, 24, 39)  # UTC, as given


def test_sqlite_file_is_in_wal_mode(sqlite_recorder: Recorder, db_path: Path):
    sqlite_recorder.record(_row())
    assert sqlite_recorder.flush()
    con = sqlite3.connect(db_path)
    assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    con.close()


def test_connections_opening_one_new_file_at_once_all_open_it_in_wal_mode(tmp_path: Path):
    # Instances starting together on a new state dir: each connection turns the new file to WAL, and
    # SQLite refuses all but one at once ("database is locked") rather than wait. Without waiting those
    # out, some rounds of this race lost a connection (5 of 60 here), so an instance did not start.
    def open_at_once(url: str, count: int) -> list[object]:
        engines = [make_engine(url) for _ in range(count)]
        together = threading.Barrier(count)
        modes: list[object] = []

        def open_one(engine: Any) -> None:
            together.wait()
            try:
                with engine.connect() as conn:
                    modes.append(conn.exec_driver_sql("PRAGMA journal_mode").scalar())
            except Exception as exc:  # noqa: BLE001 - the failure is the finding
                modes.append(exc)
        threads = [threading.Thread(target=open_one, args=(engine,)) for engine in engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for engine in engines:
            engine.dispose()
        return modes

    for round_ in range(100):
        modes = open_at_once(f"sqlite:///{tmp_path / f'round-{round_}.db'}", 3)
        assert modes == ["wal"] * 3, f"round {round_}: {modes}"


def test_dropped_table_keeps_rows_reports_and_recovers(sqlite_recorder: Recorder, db_path: Path):
    sqlite_recorder.record(_row(0))
    assert sqlite_recorder.flush()

    con = sqlite3.connect(db_path)
    con.execute("DROP TABLE decisions")
    con.commit()
    con.close()
    for i in range(1, 51):
        sqlite_recorder.record(_row(i))
    wait_until(lambda: sqlite_recorder.unavailable_reason(), "the recorder to report the failure")

    assert "no such table: decisions" in sqlite_recorder.unavailable_reason()
    assert not sqlite_recorder.healthy
    assert sqlite_recorder.flush(timeout=0.3) is False
    assert sqlite_recorder.written == 1  # the 50 are held for a retry, not dropped

    SQLModel.metadata.create_all(make_engine(f"sqlite:///{db_path}"))
    assert sqlite_recorder.flush()
    assert sqlite_recorder.unavailable_reason() is None and sqlite_recorder.healthy
    assert [r["path"] for r in sqlite_rows(db_path)] == [f"/v1/instances/i-{i}" for i in range(1, 51)]


def test_locked_database_keeps_rows_reports_and_recovers(sqlite_recorder: Recorder, db_path: Path):
    """Another process holding the write lock (a backup, a migration) past the busy timeout."""
    locker = sqlite3.connect(db_path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(20):
            sqlite_recorder.record(_row(i))
        wait_until(
            lambda: sqlite_recorder.unavailable_reason(), "the recorder to give up waiting for the lock"
        )
        assert "locked" in sqlite_recorder.unavailable_reason()
        assert sqlite_recorder.written == 0
    finally:
        locker.execute("ROLLBACK")
        locker.close()

    assert sqlite_recorder.flush()
    assert sqlite_recorder.unavailable_reason() is None
    assert len(sqlite_rows(db_path)) == 20


def test_backlog_over_max_pending_refuses_new_calls(db_path: Path):
    # batch_size=1: the writer takes exactly the first row, then blocks on the lock (for up to the
    # 5 s busy timeout) while the others pile up behind it.
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), batch_size=1, max_pending=5, retry_interval=0.05)
    locker = sqlite3.connect(db_path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        recorder.record(_row(0))
        wait_until(lambda: recorder._queue.qsize() == 0, "the writer to take the first row off the queue")
        for i in range(1, 5):
            recorder.record(_row(i))
        assert recorder.unavailable_reason() is None  # 4 behind: still admitting calls
        recorder.record(_row(5))
        assert recorder.unavailable_reason() == "the decision store is 5 rows behind"
        assert not recorder.healthy
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert recorder.flush()
    assert recorder.unavailable_reason() is None
    assert len(sqlite_rows(db_path)) == 6
    recorder.close()
    recorder.engine.dispose()


def test_close_writes_what_is_pending(db_path: Path):
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"))
    for i in range(700):
        recorder.record(_row(i))
    recorder.close()
    recorder.engine.dispose()
    assert len(sqlite_rows(db_path)) == 700


# ---- PostgreSQL ------------------------------------------------------------------------------------


@pytest.fixture
def pg_recorder(pg_url: str) -> Iterator[Recorder]:
    rec = Recorder(make_engine(pg_url), batch_size=500, retry_interval=0.05)
    yield rec
    rec.close(timeout=2)
    rec.engine.dispose()


@pytest.mark.postgres
def test_postgres_batched_writes_keep_every_row(pg_recorder: Recorder):
    rows = [_row(i) for i in range(2500)]
    for row in rows:
        pg_recorder.record(row)
    assert pg_recorder.flush()

    assert count_decisions(pg_recorder.engine) == {"allow": 834, "deny": 833, "error": 833}
    with pg_recorder.engine.connect() as con:
        # The recorder's connection lives in the test's own schema.
        schema = con.execute(text("SELECT current_schema()")).scalar_one()
        assert schema.startswith("cg_test_")
        stored = con.execute(
            text("SELECT path, decision, at, upstream_status FROM decisions WHERE decision_id = :d"),
            {"d": rows[7]["decision_id"]},
        ).one()
    assert (stored.path, stored.decision, stored.upstream_status) == ("/v1/instances/i-7", "deny", 200)
    assert stored.at == rows[7]["at"]


@pytest.mark.postgres
def test_postgres_dropped_table_keeps_rows_reports_and_recovers(pg_recorder: Recorder):
    with pg_recorder.engine.begin() as con:
        con.execute(text("DROP TABLE decisions"))
    for i in range(30):
        pg_recorder.record(_row(i))
    wait_until(lambda: pg_recorder.unavailable_reason(), "the recorder to report the failure")
    assert "decisions" in pg_recorder.unavailable_reason()

    SQLModel.metadata.create_all(pg_recorder.engine)
    assert pg_recorder.flush()
    assert pg_recorder.unavailable_reason() is None
    assert sum(count_decisions(pg_recorder.engine).values()) == 30


def _decision_events(engine, decision_id: str) -> int:
    with engine.connect() as con:
        return con.execute(text("SELECT count(*) FROM audit_log WHERE kind = 'decision' AND decision_id = :d"),
                           {"d": decision_id}).scalar_one()


def _recorded_twice_chained_once(recorder: Recorder) -> None:
    """A row committed again (its journal replayed by a sibling meanwhile, say) is stored once by ON CONFLICT
    DO NOTHING; only a row actually inserted gets a decision event, in a later batch or in the same one."""
    row, other, same_batch = _row(0), _row(1), _row(2)
    recorder.record(row)
    assert recorder.flush()
    recorder.record(dict(row))
    recorder.record(other)
    recorder.record(same_batch)
    recorder.record(dict(same_batch))
    assert recorder.flush()
    assert [_decision_events(recorder.engine, r["decision_id"]) for r in (row, other, same_batch)] == [1, 1, 1]
    result = audit.verify(recorder.engine)
    assert result.ok, result.reason


def test_a_row_recorded_twice_is_chained_once(sqlite_recorder: Recorder):
    _recorded_twice_chained_once(sqlite_recorder)


@pytest.mark.postgres
def test_postgres_a_row_recorded_twice_is_chained_once(pg_recorder: Recorder):
    _recorded_twice_chained_once(pg_recorder)


@pytest.mark.postgres
def test_postgres_one_unstorable_row_does_not_wedge_the_record(pg_url: str):
    recorder = Recorder(make_engine(pg_url), retry_interval=0.05)
    try:
        poison = _row(0, path="/v1/instances/i-1\x00/stop")
        recorder.record(poison)
        for i in range(1, 11):
            recorder.record(_row(i))
        recorder.flush(timeout=1.5)

        assert recorder.unavailable_reason() is None
        with recorder.engine.connect() as con:
            ids = set(con.execute(text("SELECT decision_id FROM decisions")).scalars())
        assert poison["decision_id"] in ids and len(ids) == 11
    finally:
        recorder.close(timeout=0.5)
        recorder.engine.dispose()


@pytest.mark.parametrize("url", ["sqlite:///{path}", "sqlite:///file:{path}?uri=true",
                                 "sqlite:///file://localhost{path}?mode=rwc&uri=true"], ids=["path", "uri", "uri-host"])
def test_a_new_sqlite_store_is_private_to_its_owner(tmp_path: Path, url: str):
    database = tmp_path / "new.db"
    old_umask = os.umask(0o022)  # the usual umask: SQLite alone would make the file 0644
    try:
        recorder = Recorder(make_engine(url.format(path=database)))
    finally:
        os.umask(old_umask)
    try:
        recorder.record(_row())
        assert recorder.flush(10)
        files = [p for p in tmp_path.iterdir() if p.name.startswith("new.db")]
        assert {p.name for p in files} >= {"new.db", "new.db-wal", "new.db-shm", "new.db.journal"}
        # The journal is a directory (0700) of segment files (0600), one of them this process's.
        segments = list((tmp_path / "new.db.journal").iterdir())
        assert segments and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in segments)
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {
            p.name: 0o700 if p.is_dir() else 0o600 for p in files}
    finally:
        recorder.close()
        recorder.engine.dispose()


def test_a_file_name_without_uri_true_is_the_file_made_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Review finding 3: `sqlite:///file:rel.db` without `uri=true` is no URI to SQLAlchemy, which opens
    `<cwd>/file:rel.db`: that file (the one with the tables) is the one made 0600, and no other is made."""
    monkeypatch.chdir(tmp_path)
    old_umask = os.umask(0o022)  # the usual umask: SQLite alone would make the file 0644
    try:
        recorder = Recorder(make_engine("sqlite:///file:rel.db"))
    finally:
        os.umask(old_umask)
    try:
        recorder.record(_row())
        assert recorder.flush(10)
        written = tmp_path / "file:rel.db"
        con = sqlite3.connect(written)
        try:
            assert con.execute("SELECT count(*) FROM decisions").fetchone() == (1,)
        finally:
            con.close()
        files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        assert set(files) <= {"file:rel.db", "file:rel.db-wal", "file:rel.db-shm", "file:rel.db-journal",
                              "file:rel.db.journal"}
        assert files == {name: 0o700 if (tmp_path / name).is_dir() else 0o600 for name in files}
        assert "file:rel.db" in files
    finally:
        recorder.close()
        recorder.engine.dispose()


# ---- record before forward: a waited-on commit, outcomes, idempotent rows, draining -----------------


def read(db_path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """The rows `sql` finds in the SQLite file, read through a connection of its own (not the recorder's)."""
    con = sqlite3.connect(db_path)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def _drop_decisions(db_path: Path) -> None:
    con = sqlite3.connect(db_path)
    con.execute("DROP TABLE decisions")
    con.commit()
    con.close()


def test_a_waited_on_row_resolves_once_committed_and_fails_at_once_while_the_store_fails(
        db_path: Path):
    # A call that waits for its commit (without the journal: PostgreSQL's way); with the journal, the row is
    # journaled and its call goes (tests/proxy/record/test_journal.py).
    sqlite_recorder = Recorder(make_engine(f"sqlite:///{db_path}"), retry_interval=0.05, journaled=False)
    try:
        first = _row(1, upstream_status=None)
        assert sqlite_recorder.commit(first).result(5) is None
        assert [r["decision_id"] for r in sqlite_rows(db_path)] == [first["decision_id"]]

        _drop_decisions(db_path)
        second = _row(2, upstream_status=None)
        with pytest.raises(StoreUnavailable, match="no such table"):
            sqlite_recorder.commit(second).result(5)  # the call waiting on it is refused, not kept waiting

        SQLModel.metadata.create_all(make_engine(f"sqlite:///{db_path}"))
        assert sqlite_recorder.flush()  # and the row itself was kept: a refused call is on the record too
        assert [r["decision_id"] for r in sqlite_rows(db_path)] == [second["decision_id"]]
    finally:
        sqlite_recorder.close(timeout=2)
        sqlite_recorder.engine.dispose()


def test_an_outcome_completes_the_row_and_is_chained(sqlite_recorder: Recorder, db_path: Path):
    row = _row(0, upstream_status=None, duration_ms=0.2)
    sqlite_recorder.commit(row).result(5)
    sqlite_recorder.record_outcome(row["decision_id"], "ops-bot", {
        "upstream_status": 502, "duration_ms": 31.5, "errors": '["upstream connection lost"]'})
    assert sqlite_recorder.flush()

    (stored,) = sqlite_rows(db_path)
    assert (stored["upstream_status"], stored["duration_ms"], stored["errors"]) == (
        502, 31.5, '["upstream connection lost"]')
    chained = read(db_path, "SELECT kind, decision_id, payload FROM audit_log ORDER BY seq")
    assert [(kind, decision_id) for kind, decision_id, _ in chained] == [
        ("decision", row["decision_id"]), ("outcome", row["decision_id"])]
    assert json.loads(chained[1][2]) == {"upstream_status": 502, "duration_ms": 31.5,
                                         "errors": '["upstream connection lost"]'}
    assert audit.verify(sqlite_recorder.engine).ok


def test_a_decision_written_twice_is_stored_once(sqlite_recorder: Recorder, db_path: Path):
    row = _row(0)
    sqlite_recorder.record(dict(row))
    assert sqlite_recorder.flush()
    sqlite_recorder.record(dict(row))  # as a retry of a batch whose commit did happen would write it
    assert sqlite_recorder.flush()
    assert len(sqlite_rows(db_path)) == 1
    assert sqlite_recorder.unavailable_reason() is None


def test_close_writes_everything_for_as_long_as_it_makes_progress(db_path: Path):
    # One row a transaction: far longer to write than the close's timeout, which only bounds a stall.
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), batch_size=1)
    for i in range(2000):
        recorder.record(_row(i))
    recorder.close(timeout=0.2)
    recorder.engine.dispose()
    assert len(sqlite_rows(db_path)) == 2000


def test_close_says_loudly_what_it_could_not_write(db_path: Path, caplog: pytest.LogCaptureFixture):
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), retry_interval=0.05)
    _drop_decisions(db_path)
    for i in range(7):
        recorder.record(_row(i))
    recorder.close(timeout=0.3)
    recorder.engine.dispose()
    assert any(r.levelname == "ERROR" and "7 decisions/events NOT written" in r.getMessage()
               for r in caplog.records)


def test_the_wal_is_checkpointed_and_truncated_when_the_writer_is_idle(db_path: Path):
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), wal_limit=64 * 1024)
    try:
        for i in range(3000):
            recorder.record(_row(i))
        assert recorder.flush()
        wal = Path(f"{db_path}-wal")
        wait_until(lambda: wal.stat().st_size <= 64 * 1024, "the idle writer to truncate the WAL")
        # Everything is in the database file itself now: a copy of it alone holds every row.
        copy = db_path.with_name("copy.db")
        copy.write_bytes(db_path.read_bytes())
        assert len(sqlite_rows(copy)) == 3000
    finally:
        recorder.close()
        recorder.engine.dispose()


def test_a_row_enqueued_after_close_is_written_by_its_caller(db_path: Path):
    """A call still finishing while the program shuts down, after the core's record was closed."""
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"))
    recorder.record(_row(0))
    recorder.close()
    late = _row(1, upstream_status=None)
    recorder.commit(late).result(0)  # written before `commit` returned
    recorder.record_outcome(late["decision_id"], "ops-bot", {"upstream_status": 200, "duration_ms": 3.0,
                                                             "errors": "[]"})
    recorder.engine.dispose()
    assert [(r["path"], r["upstream_status"]) for r in sqlite_rows(db_path)] == [
        ("/v1/instances/i-0", 200), ("/v1/instances/i-1", 200)]
    assert audit.verify(make_engine(f"sqlite:///{db_path}")).ok


def test_a_unit_left_queued_at_close_fails_and_the_other_late_rows_are_written(db_path: Path):
    """Review finding 7: a unit of work queued (`transact_soon` passed its closed check) just as the
    writer stopped is never run after close: its future fails with "closed", and the decisions and
    events queued around it are still written by the late writer, none lost."""
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), retry_interval=0.05)
    _with_notes(recorder)
    recorder.record_event({"kind": "approval", "override_id": "o-1", "actor": "erin"})
    assert recorder.flush()
    recorder._stop.set()  # the writer stops before it takes the unit (the window close() leaves)
    recorder._thread.join(5)
    recorder.record(_row(1))
    unit: Future = Future()
    recorder._queue.put_nowait((store._UNIT, {"work": _note}, unit))
    recorder.record_event({"kind": "denial", "override_id": "o-2", "actor": "sam"})
    recorder.close(timeout=1)
    recorder.engine.dispose()

    with pytest.raises(RuntimeError, match="the recorder is closed"):
        unit.result(0)
    assert recorder.pending == 0
    assert read(db_path, "SELECT kind FROM audit_log ORDER BY seq") == [("approval",), ("decision",), ("denial",)]
    assert read(db_path, "SELECT count(*) FROM notes") == [(0,)]
    assert [r["path"] for r in sqlite_rows(db_path)] == ["/v1/instances/i-1"]
    assert audit.verify(make_engine(f"sqlite:///{db_path}")).ok


def test_the_writer_stores_rows_and_chain_byte_for_byte_as_sqlalchemy_does(tmp_path: Path):
    """On SQLite the writer binds its batches through the driver: what it stores must read back the same
    as SQLAlchemy's own binding of the same rows and events (times, defaults, text)."""
    paris = timezone(timedelta(hours=1))
    unset = {"session": None, "tool": None, "cedar_request": None}
    rows = [_row(0, upstream_status=None, **unset), _row(1, at=datetime(2025, 6, 1, 12, 0, 0, tzinfo=paris),
                                                         path="/v1/é", **unset),
            _row(2, session="s-1", tool="t", cedar_request='{"a":1}')]
    del rows[0]["determining_policies"]
    rows[1]["at"] = rows[1]["at"].replace(microsecond=0)
    outcomes = [{"upstream_status": 200 + i, "duration_ms": 1.5 * i, "errors": "[]"} for i in range(3)]

    driver = Recorder(make_engine(f"sqlite:///{tmp_path / 'driver.db'}"))
    try:
        for row in rows:
            driver.record(dict(row))
        assert driver.flush()
        for row, outcome in zip(rows, outcomes, strict=True):
            driver.record_outcome(row["decision_id"], "ops-bot", outcome)
        assert driver.flush()
    finally:
        driver.close()
        driver.engine.dispose()

    # The same through SQLAlchemy: the decisions, then their outcomes, the events chained in that order.
    engine = make_engine(f"sqlite:///{tmp_path / 'sqlalchemy.db'}")
    Recorder(engine).close()
    events = [store._decision_event(dict(row)) for row in rows]
    with engine.begin() as conn:
        conn.execute(store._insert_new(conn), [dict(row, determining_policies=row.get("determining_policies", "[]"))
                                               for row in rows])
        audit.append(conn, events)
    with engine.begin() as conn:
        conn.execute(store._ADD_OUTCOME, [{"b_id": row["decision_id"], "b_status": o["upstream_status"],
                                           "b_ms": o["duration_ms"], "b_errors": o["errors"]}
                                          for row, o in zip(rows, outcomes, strict=True)])
    engine.dispose()

    def stored(name: str) -> tuple[list, list]:
        con = sqlite3.connect(tmp_path / name)
        try:
            decisions = con.execute("SELECT * FROM decisions ORDER BY id").fetchall()
            chain = con.execute("SELECT * FROM audit_log WHERE kind = 'decision' ORDER BY seq").fetchall()
        finally:
            con.close()
        return decisions, chain

    assert stored("driver.db") == stored("sqlalchemy.db")
    assert audit.verify(make_engine(f"sqlite:///{tmp_path / 'driver.db'}")).ok


def test_a_lone_call_commits_its_row_itself_after_what_was_queued_before_it(db_path: Path):
    """One call at a time: the caller commits its row in its own thread (no hand-off to the writer and
    back), taking what was queued before it into the same transaction, in queue order."""
    # the writer lingers; without the journal, as a held call's row (not fail-fast) is committed
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), linger=5.0, busy_rate=0.0, journaled=False)
    try:
        first = _row(0)
        recorder.commit(first).result(5)
        recorder.record_outcome(first["decision_id"], "ops-bot", {"upstream_status": 201, "duration_ms": 2.0,
                                                                  "errors": "[]"})
        recorder.record_event({"kind": "approval", "override_id": "o-1", "actor": "erin"})
        second = _row(1)
        committed = recorder.commit(second)
        assert committed.done() and committed.result(0) is None  # on the record before `commit` returned
        chain = read(db_path, "SELECT kind, decision_id FROM audit_log ORDER BY seq")
        [status] = read(db_path, "SELECT upstream_status FROM decisions WHERE decision_id = ?",
                        (first["decision_id"],))
        assert chain == [("decision", first["decision_id"]), ("outcome", first["decision_id"]),
                         ("approval", None), ("decision", second["decision_id"])]
        assert status == (201,)
        assert recorder.pending == 0
    finally:
        recorder.close()
        recorder.engine.dispose()
    assert audit.verify(make_engine(f"sqlite:///{db_path}")).ok


def test_a_lone_call_never_waits_in_its_own_thread_for_another_writers_lock(db_path: Path):
    """Another process holds SQLite's write lock: the caller hands its row to the writer at once (which
    waits its turn), rather than stalling its event loop. (Without the journal, as a held call's row.)"""
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), journaled=False)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        row = _row(0)
        committed = recorder.commit(row)
        assert not committed.done()
        other.execute("COMMIT")
        committed.result(5)
        assert [r["decision_id"] for r in sqlite_rows(db_path)] == [row["decision_id"]]
    finally:
        other.close()
        recorder.close()
        recorder.engine.dispose()


def test_refusals_counted_while_an_unsure_commit_is_settled_are_chained_not_dropped(
        db_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Review finding: a caller's own commit whose acknowledgement was lost, with the log unreadable just
    then, is left to the writer to settle (`_unsure`). Calls refused meanwhile are counted; the settling
    finds the commit landed, and those counts must still reach the log (they were dropped)."""
    real_transaction = Recorder._sqlite_transaction
    lose = [True]

    @contextmanager
    def losing_the_acknowledgement(self, *, wait=True):
        with real_transaction(self, wait=wait) as cursor:
            yield cursor
        if not wait and lose:  # the caller's own commit went through; its caller is told it failed
            lose.clear()
            raise sqlite3.OperationalError("disk I/O error")

    def log_unreadable(self, head):  # the caller cannot tell now; meanwhile another call is refused
        self.count_refusal("late-bot")
        return False

    monkeypatch.setattr(Recorder, "_sqlite_transaction", losing_the_acknowledgement)
    monkeypatch.setattr(Recorder, "_landed_now", log_unreadable)
    # Without the journal, as a held call's row: the caller commits it itself.
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), journaled=False)
    try:
        row = _row(0)
        recorder.commit(row).result(5)  # settled by the writer: the commit had landed
        assert not lose
        assert recorder.flush()
        assert read(db_path, "SELECT agent FROM audit_log WHERE kind = 'store_refusals'") == [("late-bot",)]
        assert read(db_path, "SELECT count(*) FROM decisions") == [(1,)]
    finally:
        recorder.close()
        recorder.engine.dispose()
    assert audit.verify(make_engine(f"sqlite:///{db_path}")).ok


def test_calls_in_flight_together_share_the_writers_commits(db_path: Path):
    """With another call committed and not yet finished, a call's row goes through the writer, whose
    batches many calls share (group commit), rather than being committed alone by its caller. (Without the
    journal, as held calls' rows.)"""
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), journaled=False)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        recorder.commit(_row(0)).result(5)  # in flight: no outcome yet
        other.execute("BEGIN IMMEDIATE")  # so that the writer cannot have written it by the check below
        committed = recorder.commit(_row(1))
        assert not committed.done()
        other.execute("COMMIT")
        committed.result(5)
    finally:
        other.close()
        recorder.close()
        recorder.engine.dispose()


def _with_notes(recorder: Recorder) -> None:
    """The table `_note` changes, in the recorder's database."""
    with recorder.engine.begin() as conn:
        conn.execute(text("CREATE TABLE notes (id INTEGER PRIMARY KEY, v TEXT)"))


def _note(conn) -> tuple[str, list[dict]]:
    """A unit of work: a state change and the audit event that records it."""
    conn.execute(text("INSERT INTO notes (v) VALUES ('approved')"))
    return "done", [{"kind": "approval", "override_id": "o-1", "actor": "erin"}]


def test_a_unit_submitted_from_an_event_loop_runs_in_queue_order_without_blocking_the_loop(db_path: Path):
    """`transact_soon` queues a unit behind what was queued before it and returns at once; the loop
    awaits the future (resolved on the writer thread) and gets the unit's result; a unit that raises
    hands its exception back with nothing of it written."""
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), linger=5.0, busy_rate=0.0)
    _with_notes(recorder)

    def broken(conn) -> tuple[None, list[dict]]:
        conn.execute(text("INSERT INTO notes (v) VALUES ('half done')"))
        raise ValueError("the request changed meanwhile")

    async def submit() -> tuple[str, BaseException | None]:
        recorder.record(_row(0))  # nobody waits on it: the writer would linger, but the unit hurries it
        result = await asyncio.wrap_future(recorder.transact_soon(_note))
        failed = recorder.transact_soon(broken)
        try:
            await asyncio.wrap_future(failed)
        except ValueError as exc:
            return result, exc
        return result, None

    try:
        result, failure = asyncio.run(submit())
        assert result == "done"
        assert str(failure) == "the request changed meanwhile"
        assert read(db_path, "SELECT kind FROM audit_log ORDER BY seq") == [("decision",), ("approval",)]
        assert read(db_path, "SELECT v FROM notes") == [("approved",)]
    finally:
        recorder.close()
        recorder.engine.dispose()
    assert audit.verify(make_engine(f"sqlite:///{db_path}")).ok


def test_a_unit_not_started_in_time_on_a_thread_is_withdrawn_with_the_same_timeout_error(db_path: Path):
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"))
    _with_notes(recorder)
    try:
        with recorder._writing, pytest.raises(TimeoutError, match="did not take the change within 0.2 s: busy"):
            recorder.transact(_note, timeout=0.2)
        assert recorder.flush()
        assert read(db_path, "SELECT count(*) FROM notes") == [(0,)]
    finally:
        recorder.close()
        recorder.engine.dispose()


def test_a_unit_started_before_its_timeout_runs_to_its_outcome(db_path: Path):
    """The timer withdraws only a unit the writer has not started: one running when it fires commits,
    and its caller gets its result."""
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"))
    _with_notes(recorder)
    started, go_on = threading.Event(), threading.Event()

    def slow(conn) -> tuple[str, list[dict]]:
        started.set()
        if not go_on.wait(10):
            raise AssertionError("the test never let the unit finish")
        return _note(conn)

    async def submit() -> str:
        future = recorder.transact_soon(slow, timeout=0.05)
        # The loop is held until the unit runs, so its timer cannot fire before; then it fires (its time
        # comes before the sleep's end) while the unit is still running.
        assert started.wait(10), "the writer did not start the unit"
        await asyncio.sleep(0.2)
        go_on.set()
        return await asyncio.wrap_future(future)

    try:
        assert asyncio.run(submit()) == "done"
        assert read(db_path, "SELECT v FROM notes") == [("approved",)]
    finally:
        go_on.set()
        recorder.close()
        recorder.engine.dispose()


def test_a_units_loop_timer_is_cancelled_once_the_unit_is_done(db_path: Path):
    """Review finding 5: the timer that withdraws a late unit goes once the unit is done, rather than
    keeping a loop timer, the future and its result alive for the whole timeout after every unit.
    (asyncio has no public view of its timers: the loop's `_scheduled` heap is read.)"""
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"))
    _with_notes(recorder)

    async def submit(n: int) -> int:
        loop = asyncio.get_running_loop()
        for _ in range(n):
            assert await asyncio.wrap_future(recorder.transact_soon(_note, timeout=30.0)) == "done"
        for _ in range(100):  # the cancellations come from the writer thread, via call_soon_threadsafe
            if not any(not handle.cancelled() for handle in loop._scheduled):  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.01)
        return sum(1 for handle in loop._scheduled if not handle.cancelled())  # type: ignore[attr-defined]

    try:
        assert asyncio.run(submit(20)) == 0
    finally:
        recorder.close()
        recorder.engine.dispose()


def test_a_unit_submitted_from_an_event_loop_is_withdrawn_when_not_started_in_time(db_path: Path):
    """The writer is stuck (here: another holder of the writing lock): past its timeout the unit is
    withdrawn and never runs, and whoever awaits its future (not only through `committed`) gets
    `TimeoutError` saying why, as `transact` raises (review finding 5b: it was `CancelledError`); while
    the store is known to be failing, submitting raises at once."""
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"))
    _with_notes(recorder)

    async def submit() -> None:
        await asyncio.wrap_future(recorder.transact_soon(_note, timeout=0.2))

    try:
        with recorder._writing, pytest.raises(TimeoutError, match="did not take the change within 0.2 s: busy"):
            asyncio.run(submit())
        assert recorder.flush()
        assert read(db_path, "SELECT count(*) FROM notes") == [(0,)]

        recorder._failing, recorder.last_error = True, "OperationalError: disk I/O error"
        with pytest.raises(StoreUnavailable, match="disk I/O error"):
            recorder.transact_soon(_note)
        recorder._failing = False
    finally:
        recorder.close()
        recorder.engine.dispose()


@pytest.fixture
def own_switch_interval() -> Iterator[Callable[[float], float]]:
    """Sets the process's own switch interval for a test (returning it), and puts back what it was."""
    before = sys.getswitchinterval()

    def own(interval: float) -> float:
        sys.setswitchinterval(interval)
        return interval

    yield own
    sys.setswitchinterval(before)


def _after_its_callbacks(unit: Future) -> Future:
    """`unit`, whose `callbacks_done` is set once the callbacks added before this one have run (a future
    runs them in order, after it has woken whoever waits on its result)."""
    unit.callbacks_done = threading.Event()  # type: ignore[attr-defined]
    unit.add_done_callback(lambda _: unit.callbacks_done.set())  # type: ignore[attr-defined]
    return unit


@pytest.mark.parametrize("ending", ["committed", "failed", "withdrawn"])
def test_threads_switch_sooner_only_while_a_unit_a_reviewer_waits_on_is_queued_or_running(
        db_path: Path, ending: str, own_switch_interval: Callable[[float], float]):
    """While a unit `ahead_of_calls` (a vote, a release) waits or runs, the GIL's switch interval is
    `URGENT_SWITCH_INTERVAL`, so the writer takes the GIL back from a busy loop sooner after each
    call into the database; however the unit ends, the process's own interval comes back. A plain
    unit leaves it alone."""
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"))
    _with_notes(recorder)
    own = own_switch_interval(0.004)
    seen: list[float] = []

    def note(conn, fails: bool = False) -> tuple[str, list[dict]]:
        seen.append(sys.getswitchinterval())
        if fails:
            raise ValueError("the request changed meanwhile")
        return _note(conn)

    def failing(conn) -> tuple[str, list[dict]]:
        return note(conn, fails=True)

    try:
        assert recorder.transact(note) == "done"  # a plain unit
        assert seen == [pytest.approx(own, rel=0.05)]
        seen.clear()
        if ending == "withdrawn":
            with recorder._writing:  # the writer cannot start it
                unit = recorder.transact_soon(note, ahead_of_calls=True)
                assert sys.getswitchinterval() == pytest.approx(store.URGENT_SWITCH_INTERVAL, rel=0.05)
                recorder._withdraw(unit, 0.1)
            with pytest.raises(TimeoutError):
                unit.result(5)
        else:
            with recorder._writing:  # so the unit cannot end before the test's callback is added
                unit = _after_its_callbacks(
                    recorder.transact_soon(failing if ending == "failed" else note, ahead_of_calls=True))
            if ending == "failed":
                with pytest.raises(ValueError):
                    unit.result(5)
            else:
                assert unit.result(5) == "done"
            assert seen == [pytest.approx(store.URGENT_SWITCH_INTERVAL, rel=0.05)]
            assert unit.callbacks_done.wait(5)  # a future wakes its waiters before it runs its callbacks
        assert sys.getswitchinterval() == pytest.approx(own, rel=0.05)
    finally:
        recorder.close()
        recorder.engine.dispose()


def test_two_recorders_units_overlapping_leave_the_process_s_own_switch_interval(
        tmp_path: Path, own_switch_interval: Callable[[float], float]):
    """The switch interval is the process's: a reviewer's unit on one recorder ending while another's still
    waits keeps it cut, and once both are done the process's own is back, to the microsecond (115 us is
    one that reads back a hair under and would be set one microsecond shorter)."""
    recorders = [Recorder(make_engine(f"sqlite:///{tmp_path / f'{n}.db'}")) for n in range(2)]
    for recorder in recorders:
        _with_notes(recorder)
    own_switch_interval(115e-6)
    blocked: list[Recorder] = []
    try:
        for recorder in recorders:  # neither writer can start its unit yet
            recorder._writing.acquire()
            blocked.append(recorder)
        first, second = (_after_its_callbacks(recorder.transact_soon(_note, ahead_of_calls=True))
                         for recorder in recorders)
        blocked.pop(0)._writing.release()
        assert first.result(5) == "done" and first.callbacks_done.wait(5)
        assert sys.getswitchinterval() == pytest.approx(store.URGENT_SWITCH_INTERVAL, rel=0.05)  # still cut
        blocked.pop(0)._writing.release()
        assert second.result(5) == "done" and second.callbacks_done.wait(5)
        assert round(sys.getswitchinterval() * 1e6) == 115
    finally:
        for recorder in blocked:  # a failed assertion must not leave a writer blocked at close
            recorder._writing.release()
        for recorder in recorders:
            recorder.close()
            recorder.engine.dispose()


def test_a_unit_taken_for_a_batch_the_store_never_takes_fails_when_the_recorder_closes(
        db_path: Path, own_switch_interval: Callable[[float], float]):
    """The writer takes a unit with the rows before it; the store refuses those rows until `close` gives up
    and the writer stops: the unit, never run, ends with "closed" rather than never, and a reviewer's unit
    gives the process back its own switch interval (else the last one's count is held for good)."""
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), retry_interval=0.05)
    _with_notes(recorder)
    own = own_switch_interval(0.004)
    try:
        with recorder._writing:  # both queued before the writer takes either
            recorder.record(_row(0))
            unit = recorder.transact_soon(_note, ahead_of_calls=True)
            _drop_decisions(db_path)
        wait_until(lambda: recorder.last_error is not None, "the writer to fail on the row before the unit")
        recorder.close(timeout=0.3)
        with pytest.raises(RuntimeError, match="the recorder is closed"):
            unit.result(1)
        assert sys.getswitchinterval() == pytest.approx(own, rel=0.05)
    finally:
        recorder.engine.dispose()
