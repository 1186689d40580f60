"""The recorder's SQLite writer: its WAL stays bounded whatever the URL's form and whoever commits, it waits
for another writer's lock a bounded time and then refuses, a file not in WAL mode still commits while others
read, and batches larger than one statement's chunk land whole with a chain that verifies.

Outcomes only (committed, refused, sizes after a number of commits), never how long anything took.
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from proxy_support import sqlite_rows, wait_until
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError

from proxy.record import audit, store
from proxy.record.store import Recorder, StoreUnavailable, make_engine


def _row(i: int = 0, **overrides) -> dict:
    row = {"decision_id": str(uuid.uuid4()), "at": datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i),
           "agent": "ops-bot", "method": "GET", "scheme": "http", "host": "localhost", "port": 9000,
           "path": f"/v1/instances/i-{i}", "action": 'Action::"get"', "resource": 'Host::"localhost"',
           "decision": "allow", "errors": "[]", "session": None, "tool": None, "cedar_request": None}
    row.update(overrides)
    return row


def _vote(conn) -> tuple[None, list[dict]]:
    """A unit of work as an override's vote is: a state change and its audit event, ~2 KB."""
    conn.execute(text("INSERT INTO votes (v) VALUES (:v)"), {"v": "x" * 2000})
    return None, [{"kind": "override_voted", "agent": "ops-bot", "payload": {"n": 1}}]


def _url(db_path: Path, form: str) -> str:
    return f"sqlite:///file:{db_path}?uri=true" if form == "uri" else f"sqlite:///{db_path}"


WAL_BOUND = 256 * 1024
# Commits enough that an unchecked WAL (~20 KB of frames a commit) would be a hundred times the bound.
COMMITS = 1500


@pytest.mark.parametrize("form", ["path", "uri"])
@pytest.mark.parametrize("work", ["calls", "units"])
def test_the_wal_stays_bounded_for_every_url_form_and_for_units_of_work(
        db_path: Path, closing: list[Recorder], form: str, work: str):
    """The writer leaves checkpoints to its own thread: that thread must find the WAL of a `file:` URI URL
    (whose database is not the file's path) and see the commits of units of work (votes, releases), or
    nobody checkpoints and the WAL grows until the disk is full."""
    recorder = Recorder(make_engine(_url(db_path, form)), wal_limit=WAL_BOUND)
    closing.append(recorder)
    if work == "units":
        with recorder.engine.begin() as conn:
            conn.execute(text("CREATE TABLE votes (id INTEGER PRIMARY KEY, v TEXT)"))
        for _ in range(COMMITS):
            recorder.transact(_vote)
    else:
        # One commit each, as calls waiting for their record one at a time: held calls (not fail-fast) wait
        # for their commit; a fail-fast call's row is journaled and committed later, in batches.
        for i in range(COMMITS):
            recorder.commit(_row(i, cedar_request="y" * 1500), fail_fast=False).result(10)
    wal = Path(f"{db_path}-wal")
    assert wal.exists()  # the very file the checkpoints measure
    wait_until(lambda: wal.stat().st_size <= WAL_BOUND, f"the WAL ({wal.stat().st_size} bytes) to be truncated")
    if work == "calls":
        assert len(sqlite_rows(db_path)) == COMMITS


def test_a_writer_whose_checkpoints_fail_checkpoints_in_its_commits(
        db_path: Path, closing: list[Recorder], caplog: pytest.LogCaptureFixture):
    """If the checkpoint thread cannot checkpoint, SQLite's own checkpoints in the writer's commits keep
    the WAL bounded (slower commits rather than a full disk)."""
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), wal_limit=WAL_BOUND)
    closing.append(recorder)
    with recorder.engine.begin() as conn:
        conn.execute(text("CREATE TABLE votes (id INTEGER PRIMARY KEY, v TEXT)"))

    def broken():  # the checkpoint thread's connections; the writer's own are opened apart
        raise OperationalError("PRAGMA wal_checkpoint", {}, sqlite3.OperationalError("disk I/O error"))

    recorder.engine.connect = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="proxy.record.store"):
        recorder.transact(_vote)
        wait_until(lambda: "checkpoint failed" in caplog.text, "a checkpoint to fail")
        for _ in range(COMMITS):
            recorder.transact(_vote)
    # SQLite's checkpoint every 1,000 pages (4 MiB): unchecked, ~30 MB.
    assert Path(f"{db_path}-wal").stat().st_size < 6 * 1024 * 1024


def test_a_file_not_in_wal_mode_commits_while_another_connection_reads(
        db_path: Path, closing: list[Recorder], caplog: pytest.LogCaptureFixture):
    """journal_mode=WAL did not take (here: forced back to DELETE): a COMMIT must wait for the readers'
    locks, so the writer keeps SQLite's waiting rather than failing (and refusing calls) while anyone reads."""
    engine = make_engine(f"sqlite:///{db_path}")
    event.listen(engine, "connect", lambda conn, _record: conn.execute("PRAGMA journal_mode=DELETE"))
    with caplog.at_level(logging.WARNING, logger="proxy.record.store"):
        recorder = Recorder(engine, retry_interval=0.05)
        closing.append(recorder)
        recorder.commit(_row(0)).result(10)
    assert "not in WAL mode" in caplog.text
    # A reader's lock, held until its COMMIT. The writer reaches its own COMMIT (its rollback journal is
    # written first) and waits for the reader there, in SQLite's busy handler: it holds the PENDING lock
    # meanwhile, so a new reader is turned away, every time we look, until the writer commits or gives up.
    blocked = 0

    def writer_waits_at_commit() -> int:
        nonlocal blocked
        probe = sqlite3.connect(db_path, timeout=0, isolation_level=None)
        try:
            probe.execute("SELECT count(*) FROM decisions").fetchall()
            blocked = 0  # the writer has not reached its COMMIT yet (or no longer waits there)
        except sqlite3.OperationalError as exc:
            assert "database is locked" in str(exc)
            blocked += 1
        finally:
            probe.close()
        return blocked

    commits_once_released(recorder, db_path, ["BEGIN", "SELECT count(*) FROM decisions"], writer_waits_at_commit,
                          COMMIT_WAITS_OBSERVED)


def test_the_writer_waits_for_another_writers_lock_then_commits(
        db_path: Path, closing: list[Recorder], monkeypatch: pytest.MonkeyPatch):
    # Calls that wait for their commit (without the journal: PostgreSQL's way, and a held call's).
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), journaled=False)
    closing.append(recorder)
    recorder.commit(_row(0)).result(10)
    # The writer's tries to take the write lock in `begin_immediate`, and those turned away as busy.
    busy = 0
    begin_immediate = store.begin_immediate

    def counting(execute: Callable[[str], object]) -> None:
        def tried(statement: str) -> object:
            nonlocal busy
            try:
                return execute(statement)
            except sqlite3.OperationalError as exc:
                if store._busy(exc):
                    busy += 1
                raise
        begin_immediate(tried)

    monkeypatch.setattr(store, "begin_immediate", counting)
    commits_once_released(recorder, db_path, ["BEGIN IMMEDIATE"], lambda: busy, BUSY_TRIES_OBSERVED)


# How many of the writer's tries to take the write lock are turned away as busy (its call neither committed
# nor refused) before the lock is let go: far past its first tries, so a writer that gives up early fails here.
BUSY_TRIES_OBSERVED = 200
# How many times in a row a new reader is turned away by the writer waiting at its COMMIT (SQLite's busy
# handler waits there, out of sight; each look is one poll of `wait_until`).
COMMIT_WAITS_OBSERVED = 10


def commits_once_released(recorder: Recorder, db_path: Path, holding: list[str], waits: Callable[[], int],
                          times: int) -> None:
    """Another connection runs `holding` and so holds a lock while the recorder commits a second row. The
    writer is seen waiting for that lock (`waits()` counts the times, in a row) `times` times while its
    call is neither committed nor refused, and the store stays healthy; the row lands, once, when the lock
    is let go. Ordering, not seconds: the lock is held until the writer has been seen waiting that often."""
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        for statement in holding:
            other.execute(statement).fetchall()
        committed = recorder.commit(_row(1))
        wait_until(lambda: committed.done() or not recorder.healthy or waits() >= times,
                   f"the writer to be seen waiting {times} times")
        assert not committed.done(), committed.exception()  # waiting its turn, not refused
        assert recorder.healthy  # and new calls are not refused meanwhile
        other.execute("COMMIT")
        committed.result(10)
    finally:
        other.close()
    assert len(sqlite_rows(db_path)) == 2
    assert recorder.healthy


def test_a_write_lock_held_past_the_bound_refuses_the_call_and_the_row_lands_once_released(
        db_path: Path, closing: list[Recorder], monkeypatch: pytest.MonkeyPatch):
    """`begin_immediate` gives up at BUSY_TIMEOUT (shortened here): the waiting call is refused as the store
    being unavailable (the gate answers it 503 store-unavailable and forwards nothing); its row is kept and
    written once the lock is free, and the store is healthy again."""
    monkeypatch.setattr(store, "BUSY_TIMEOUT", 0.2)
    # A call that waits for its commit (without the journal: PostgreSQL's way); the journaled call's case is
    # tests/proxy/record/test_journal.py's.
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), retry_interval=0.05, journaled=False)
    closing.append(recorder)
    recorder.commit(_row(0)).result(10)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        row = _row(1)
        committed = recorder.commit(row)
        with pytest.raises(StoreUnavailable, match="database is locked"):
            committed.result(30)  # the lock is still held: only the bound ends the wait
        assert not recorder.healthy  # new calls are refused meanwhile
        other.execute("COMMIT")
    finally:
        other.close()
    assert recorder.flush()
    assert recorder.healthy
    assert [r["decision_id"] for r in sqlite_rows(db_path)][1:] == [row["decision_id"]]
    assert audit.verify(make_engine(f"sqlite:///{db_path}")).ok


def test_batches_larger_than_a_statements_chunk_land_whole_and_the_chain_verifies(
        db_path: Path, closing: list[Recorder]):
    """Decisions, events and outcomes are written in chunks of SQLITE_ROWS_PER_INSERT rows a statement:
    batches of several chunks (and a partial one) keep every row, the last outcome of a decision wins and
    every decision and outcome is on a chain that verifies."""
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"))
    closing.append(recorder)
    assert store.audit.SQLITE_ROWS_PER_INSERT == 50
    rows = [_row(i) for i in range(173)]
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        # The write lock held while they are queued: the writer takes them in at most two batches, one of
        # them with more than 87 decisions and every outcome (233, of 173 decisions).
        other.execute("BEGIN IMMEDIATE")
        for row in rows:
            recorder.record(row)
        for i, row in enumerate(rows):
            recorder.record_outcome(row["decision_id"], "ops-bot",
                                    {"upstream_status": 200 + i % 50, "duration_ms": float(i), "errors": f'["e{i}"]'})
        for row in rows[:60]:  # a second outcome for some: the last wins
            recorder.record_outcome(row["decision_id"], "ops-bot",
                                    {"upstream_status": 500, "duration_ms": -1.0, "errors": "[]"})
        other.execute("COMMIT")
    finally:
        other.close()
    assert recorder.flush()
    stored = [(r["decision_id"], r["upstream_status"], r["duration_ms"], r["errors"]) for r in sqlite_rows(db_path)]
    assert stored == [(row["decision_id"], *((500, -1.0, "[]") if i < 60 else (200 + i % 50, float(i), f'["e{i}"]')))
                      for i, row in enumerate(rows)]
    con = sqlite3.connect(db_path)
    try:
        kinds = dict(con.execute("SELECT kind, count(*) FROM audit_log GROUP BY kind").fetchall())
    finally:
        con.close()
    assert kinds == {"decision": 173, "outcome": 233}
    assert audit.verify(make_engine(f"sqlite:///{db_path}")).ok
