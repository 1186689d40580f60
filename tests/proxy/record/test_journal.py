"""The decision journal: a fail-fast call's row is journaled before it goes, committed later in batches,
and a dead process's journal is replayed into the record, once; a live one's never is.

Real SQLite files; a process that dies is a real child process killed with SIGKILL, whose writer was told to
linger for an hour, so that its rows are in its journal and nowhere else.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from proxy_support import sqlite_rows, wait_until
from sqlalchemy import text

from proxy.record import audit, journal, store
from proxy.record.store import Recorder, StoreUnavailable, make_engine

ROOT = Path(__file__).resolve().parents[3]


def _row(i: int = 0, **overrides) -> dict:
    row = {"decision_id": str(uuid.uuid4()),
           "at": datetime(2026, 12, 3, 6, 30, 1, 123456, tzinfo=UTC) + timedelta(seconds=i),
           "agent": "ops-bot", "method": "GET", "scheme": "http", "host": "localhost", "port": 9000,
           "path": f"/v1/instances/i-{i}", "action": 'Action::"get"', "resource": 'Host::"localhost"',
           "decision": "allow", "errors": "[]", "session": None, "tool": None, "cedar_request": None}
    row.update(overrides)
    return row


@pytest.fixture
def closing() -> Iterator[list[Recorder]]:
    recorders: list[Recorder] = []
    yield recorders
    for recorder in recorders:
        recorder.close(timeout=5)
        recorder.engine.dispose()


def _journal_dir(db_path: Path) -> Path:
    return Path(journal.directory_for(str(db_path)))


def _segments(db_path: Path) -> list[Path]:
    return sorted(_journal_dir(db_path).glob(f"*{journal.SUFFIX}"))


def _decision_events(db_path: Path, decision_id: str) -> int:
    con = sqlite3.connect(db_path)
    try:
        return con.execute("SELECT count(*) FROM audit_log WHERE kind = 'decision' AND decision_id = ?",
                           (decision_id,)).fetchone()[0]
    finally:
        con.close()


def test_a_line_gives_back_the_row_with_its_times_exactly():
    row = _row(detail={"method": "tools/call", "seen": datetime(2026, 1, 1, 0, 0, tzinfo=UTC)},
               cedar_request='{"a":"line\nbreak ü"}')
    line = journal.encode(row)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one line, whatever the strings hold
    back = journal.decode(line[:-1])
    assert back == row
    assert audit.sqlite_datetime(back["at"]) == audit.sqlite_datetime(row["at"])  # as the store writes it
    assert back["at"].tzinfo is not None and back["at"].microsecond == 123456


def test_a_journaled_row_lets_its_call_go_at_once_and_is_committed_then_the_segment_goes(
        db_path: Path, closing: list[Recorder]):
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), journal_linger=3600)  # the writer waits for a flush
    closing.append(recorder)
    row = _row(0)
    committed = recorder.commit(row)
    assert committed.done() and committed.result(0) is None  # before any commit: the call goes now
    assert sqlite_rows(db_path) == []
    [segment] = _segments(db_path)
    assert stat.S_IMODE(segment.stat().st_mode) == 0o600
    assert stat.S_IMODE(_journal_dir(db_path).stat().st_mode) == 0o700
    [line] = segment.read_bytes().splitlines()
    assert journal.decode(line) == row

    assert recorder.flush()
    assert [r["decision_id"] for r in sqlite_rows(db_path)] == [row["decision_id"]]
    assert _decision_events(db_path, row["decision_id"]) == 1
    recorder.close()
    assert list(_journal_dir(db_path).iterdir()) == []  # a graceful stop leaves nothing to replay
    assert audit.verify(make_engine(f"sqlite:///{db_path}")).ok


def test_segments_are_rotated_and_deleted_once_committed(db_path: Path, closing: list[Recorder],
                                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(journal, "ROTATE_BYTES", 2000)
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"))
    closing.append(recorder)
    rows = [_row(i) for i in range(40)]  # about 450 bytes a line: many segments' worth
    for row in rows:
        recorder.commit(row).result(0)
        assert recorder.flush()
    wait_until(lambda: len(_segments(db_path)) == 1, "the committed segments to be deleted")
    assert len(sqlite_rows(db_path)) == len(rows)


# A process that journals rows and dies before its writer commits them: its writer lingers for an hour.
# argv: database URL, rows to journal, rows to commit (flushed) first. Says "ready" when all are journaled,
# then waits for its stdin to close.
CHILD = """
import sys, uuid
from datetime import UTC, datetime
from proxy.record.store import Recorder, make_engine

url, journaled, flushed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
recorder = Recorder(make_engine(url), journal_linger=3600)
ids = []
for i in range(flushed + journaled):
    row = {"decision_id": str(uuid.uuid4()), "at": datetime.now(UTC), "agent": "child", "method": "GET",
           "scheme": "http", "host": "localhost", "port": 9000, "path": f"/v1/{i}", "action": 'Action::"get"',
           "resource": 'Host::"localhost"', "decision": "allow", "errors": "[]", "duration_ms": 0.5,
           "detail": {"note": "kept in the chain's payload"}}
    assert recorder.commit(row).done()
    ids.append(row["decision_id"])
    if i + 1 == flushed:
        assert recorder.flush(30)
print("ready", " ".join(ids), flush=True)
sys.stdin.read()
"""


def _child(db_path: Path, journaled: int, flushed: int = 0) -> tuple[subprocess.Popen[str], list[str]]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, f"sqlite:///{db_path}", str(journaled), str(flushed)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout is not None
    words = child.stdout.readline().split()
    if not words or words[0] != "ready":
        child.kill()
        raise AssertionError(f"the child did not journal its rows: {child.communicate(timeout=10)}")
    return child, words[1:]


def _kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=10)


def test_a_killed_process_journal_is_replayed_by_the_next_recorder(db_path: Path, closing: list[Recorder]):
    child, ids = _child(db_path, journaled=20)
    _kill(child)
    assert sqlite_rows(db_path) == []  # killed before its writer committed anything: only the journal has them
    assert len(_segments(db_path)) == 1

    recorder = Recorder(make_engine(f"sqlite:///{db_path}"))
    closing.append(recorder)
    assert sorted(r["decision_id"] for r in sqlite_rows(db_path)) == sorted(ids)
    assert all(_decision_events(db_path, decision_id) == 1 for decision_id in ids)
    assert len(_segments(db_path)) == 1  # the dead one deleted; this recorder's own is left
    result = audit.verify(make_engine(f"sqlite:///{db_path}"))
    assert result.ok, result.reason
    with recorder.engine.connect() as conn:  # the row as the child journaled it, `detail` in the chain only
        payload = conn.execute(text("SELECT payload FROM audit_log WHERE decision_id = :d"), {"d": ids[0]}).scalar()
    assert '"note":"kept in the chain\'s payload"' in payload


def test_replay_writes_only_the_rows_not_yet_committed(db_path: Path, closing: list[Recorder]):
    child, ids = _child(db_path, journaled=5, flushed=3)
    _kill(child)
    committed = [r["decision_id"] for r in sqlite_rows(db_path)]
    assert committed == ids[:3]  # the journal holds all 8; the record the first 3

    recorder = Recorder(make_engine(f"sqlite:///{db_path}"))
    closing.append(recorder)
    assert sorted(r["decision_id"] for r in sqlite_rows(db_path)) == sorted(ids)
    assert [_decision_events(db_path, decision_id) for decision_id in ids] == [1] * len(ids)
    result = audit.verify(make_engine(f"sqlite:///{db_path}"))
    assert result.ok, result.reason
    verify = subprocess.run([sys.executable, "-m", "proxy.cli.main", "audit", "verify", "--database-url",
                             f"sqlite:///{db_path}"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_live_process_journal_is_never_replayed_and_is_once_it_dies(
        db_path: Path, closing: list[Recorder], monkeypatch: pytest.MonkeyPatch):
    child, ids = _child(db_path, journaled=4)
    try:
        monkeypatch.setattr(store, "JOURNAL_SCAN_INTERVAL", 0.05)  # look for dead journals often
        recorder = Recorder(make_engine(f"sqlite:///{db_path}"))
        closing.append(recorder)
        recorder.commit(_row(0)).result(0)
        assert recorder.flush()
        with recorder._writing:  # as the writer looks, now and then
            assert recorder._replay_dead() == 0
        assert [r["agent"] for r in sqlite_rows(db_path)] == ["ops-bot"]  # nothing of the live child's
        assert len(_segments(db_path)) == 2
    finally:
        _kill(child)
    # Its owner gone, the running recorder's periodic look replays it (a `--workers` worker killed).
    wait_until(lambda: len(sqlite_rows(db_path)) == 1 + len(ids), "the dead child's journal to be replayed")
    assert sorted(r["decision_id"] for r in sqlite_rows(db_path, "agent = 'child'")) == sorted(ids)
    assert audit.verify(make_engine(f"sqlite:///{db_path}")).ok


def test_a_journal_that_cannot_be_written_refuses_the_call(db_path: Path, closing: list[Recorder]):
    """A full disk under the journal (the segment's descriptor pointed at /dev/full, which answers every
    write ENOSPC): the call is refused as the store being unavailable, its row is still recorded (as a
    refused call's is), and the next call starts a new segment."""
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), journal_linger=0)
    closing.append(recorder)
    assert recorder._journal is not None
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, recorder._journal._current.fd)
    finally:
        os.close(full)
    refused = _row(0)
    with pytest.raises(StoreUnavailable, match="journal"):
        recorder.commit(refused).result(0)
    later = _row(1)
    assert recorder.commit(later).result(0) is None
    assert recorder.flush()
    assert sorted(r["decision_id"] for r in sqlite_rows(db_path)) == sorted([refused["decision_id"],
                                                                            later["decision_id"]])
    assert [journal.decode(line)["decision_id"] for path in _segments(db_path)
            for line in path.read_bytes().splitlines()] == [later["decision_id"]]


def test_while_the_store_fails_calls_are_refused_and_nothing_is_journaled(db_path: Path, closing: list[Recorder]):
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), retry_interval=0.05, journal_linger=0)
    closing.append(recorder)
    con = sqlite3.connect(db_path)
    con.execute("ALTER TABLE decisions RENAME TO decisions_away")
    con.commit()
    gone = _row(0)
    assert recorder.commit(gone).result(0) is None  # journaled: the store was not known to fail yet
    wait_until(lambda: not recorder.healthy, "the writer to find the store failing")
    # The gate refuses new calls now (503 store-unavailable); a held call's row, or one that passed the gate
    # just before, waits for the store as without a journal, and is not journaled: nothing is promised.
    assert "no such table" in (recorder.unavailable_reason() or "")
    waiting = recorder.commit(_row(1))
    assert not waiting.done()
    assert [journal.decode(line)["decision_id"] for path in _segments(db_path)
            for line in path.read_bytes().splitlines()] == [gone["decision_id"]]
    con.execute("ALTER TABLE decisions_away RENAME TO decisions")
    con.commit()
    con.close()
    assert recorder.flush()
    assert recorder.healthy and waiting.result(0) is None
    assert gone["decision_id"] in {r["decision_id"] for r in sqlite_rows(db_path)}
