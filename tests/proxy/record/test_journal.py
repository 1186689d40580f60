"""The decision journal: a fail-fast call's row is journaled before it goes, committed later in batches,
and a dead process's journal is replayed into the record, once; a live one's never is.

Real SQLite files; a process that dies is a real child process killed with SIGKILL, whose writer was told to
linger for an hour, so that its rows are in its journal and nowhere else.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import resource
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import uuid
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


@pytest.mark.parametrize("between", ["event", "refused call"])
@pytest.mark.parametrize("ahead_of_calls", [True, False])
def test_a_reviewer_s_unit_goes_ahead_of_the_journaled_calls_queued_before_it_not_of_other_records(
        db_path: Path, closing: list[Recorder], between: str, ahead_of_calls: bool):
    """A reviewer's vote (a unit `ahead_of_calls`) does not wait for the commit of the journaled calls' rows
    and outcomes queued before it: it commits first. An event or a refused call's row queued before it, and
    what precedes them, keep their place on the chain; any other unit keeps queue order."""
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), journal_linger=3600)  # lingers until the vote
    closing.append(recorder)
    earlier, refused, later = _row(0), _row(1, decision="deny"), _row(2)
    answered = {"upstream_status": 200, "duration_ms": 1.5, "errors": "[]"}
    recorder.commit(earlier).result(0)
    recorder.record_outcome(earlier["decision_id"], "ops-bot", answered)
    if between == "event":
        recorder.record_event({"kind": "approval", "override_id": "o-0", "actor": "erin"})
        kept = ("approval", "o-0")
    else:
        recorder.record(refused)
        kept = ("decision", refused["decision_id"])
    recorder.commit(later).result(0)
    recorder.record_outcome(later["decision_id"], "ops-bot", answered)

    def vote(conn):
        return "voted", [{"kind": "approval", "override_id": "o-1", "actor": "erin"}]

    assert recorder.transact_soon(vote, ahead_of_calls=ahead_of_calls).result(5) == "voted"
    assert recorder.flush()
    con = sqlite3.connect(db_path)
    try:
        chain = con.execute("SELECT kind, coalesce(decision_id, override_id) FROM audit_log ORDER BY seq").fetchall()
        statuses = con.execute("SELECT decision_id, upstream_status FROM decisions").fetchall()
    finally:
        con.close()
    before = [("decision", earlier["decision_id"]), ("outcome", earlier["decision_id"]), kept]
    journaled = [("decision", later["decision_id"]), ("outcome", later["decision_id"])]
    voted = [("approval", "o-1")]
    assert chain == (before + voted + journaled if ahead_of_calls else before + journaled + voted)
    assert dict(statuses) == {earlier["decision_id"]: 200, later["decision_id"]: 200,
                              **({refused["decision_id"]: None} if between == "refused call" else {})}
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


def _journaled_ids(db_path: Path) -> list[str]:
    return [journal.decode(line)["decision_id"] for path in _segments(db_path)
            for line in path.read_bytes().splitlines()]


def test_a_scan_that_fails_emfile_leaves_the_writer_committing(db_path: Path, closing: list[Recorder],
                                                             monkeypatch: pytest.MonkeyPatch):
    """The proxy at its open-file limit when the writer looks for dead journals (a real EMFILE, from
    RLIMIT_NOFILE): the look fails and is tried again later; the writer lives on and commits what comes."""
    monkeypatch.setattr(store, "JOURNAL_SCAN_INTERVAL", 0.05)
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), journal_linger=0)
    closing.append(recorder)
    assert recorder.commit(_row(0)).result(0) is None
    assert recorder.flush()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    scanned = recorder._scanned_at
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 20, hard))
        with pytest.raises(OSError) as full:
            for _ in range(200):  # bounded: the limit is about 20 above what is open
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        assert full.value.errno == errno.EMFILE
        wait_until(lambda: recorder._scanned_at > scanned, "a look for dead journals at the open-file limit")
        scanned = recorder._scanned_at
        wait_until(lambda: recorder._scanned_at > scanned, "a second look, the first having failed")
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert recorder._thread.is_alive(), "the writer thread died in the journal scan"
    later = _row(1)
    assert recorder.commit(later).result(0) is None
    assert recorder.flush(10), "a forwarded call's row is never committed"
    assert recorder.healthy
    assert later["decision_id"] in {r["decision_id"] for r in sqlite_rows(db_path)}


def test_a_writer_stopped_by_an_unexpected_error_refuses_calls(db_path: Path, closing: list[Recorder],
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture):
    """A bug in the writer's loop (here: its journal chores raise what nobody expects) ends the writer
    thread: from then on no call is journaled and let go, /status says why, and the traceback is logged."""
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), journal_linger=0)
    closing.append(recorder)
    assert recorder._journal is not None

    def broken(now: float | None = None) -> None:
        raise ZeroDivisionError("a bug in the chores")

    monkeypatch.setattr(recorder._journal, "maintain", broken)
    with caplog.at_level(logging.CRITICAL, logger="proxy.record.store"):
        recorder.hurry()
        wait_until(lambda: not recorder._thread.is_alive(), "the writer to hit the bug")
    assert [r.exc_info is not None for r in caplog.records if "writer stopped" in r.getMessage()] == [True]
    assert not recorder.healthy
    assert "writer stopped" in (recorder.unavailable_reason() or "")
    waiting = recorder.commit(_row(1))
    assert not waiting.done(), "a call was let go while nothing commits its row"
    assert _journaled_ids(db_path) == []
    with pytest.raises(StoreUnavailable):
        recorder.transact(lambda conn: (None, []), timeout=5)


def test_a_writer_far_behind_lets_no_more_calls_go_before_their_commit(
        db_path: Path, closing: list[Recorder], monkeypatch: pytest.MonkeyPatch):
    """Calls are journaled (and go at once) only while the writer keeps up; past `JOURNAL_MAX_QUEUED` queued
    items a call waits for its own commit."""
    monkeypatch.setattr(store, "JOURNAL_MAX_QUEUED", 3)
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), journal_linger=0)
    closing.append(recorder)
    rows = [_row(i) for i in range(4)]
    with recorder._writing:  # the writer is stuck: it takes nothing
        assert all(recorder.commit(row).result(0) is None for row in rows[:3])
        waiting = recorder.commit(rows[3])
        assert not waiting.done()
    assert waiting.result(10) is None
    assert recorder.flush()
    assert sorted(r["decision_id"] for r in sqlite_rows(db_path)) == sorted(row["decision_id"] for row in rows)


def test_a_fifo_named_like_a_segment_is_skipped_and_the_writer_goes_on(
        db_path: Path, closing: list[Recorder], monkeypatch: pytest.MonkeyPatch):
    """A FIFO named *.seg in the journal directory: opening it to replay it would wait for a writer forever,
    in the writer thread. It is skipped (left there), and the rows journaled meanwhile are committed."""
    monkeypatch.setattr(store, "JOURNAL_SCAN_INTERVAL", 0.05)
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"), journal_linger=0)
    closing.append(recorder)
    fifo = _journal_dir(db_path) / "1-1-deadbeef.seg"
    os.mkfifo(fifo)
    try:
        scanned = recorder._scanned_at
        wait_until(lambda: recorder._scanned_at > scanned, "a look for dead journals")
        scanned = recorder._scanned_at
        wait_until(lambda: recorder._scanned_at > scanned, "another look for dead journals")
        later = _row(1)
        assert recorder.commit(later).result(0) is None
        assert recorder.flush(5), "a forwarded call's row is never committed: the writer waits on a FIFO"
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    finally:
        os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))  # frees a writer blocked on it, if any


def test_a_symlinked_segment_in_a_loose_directory_is_not_replayed_and_the_directory_made_private(
        db_path: Path, closing: list[Recorder]):
    """The journal directory made earlier with mode 0777, a *.seg symlink in it to a file of forged rows: the
    forged row never becomes a decision (nor a chained event), and the directory is 0700 again."""
    directory = _journal_dir(db_path)
    directory.mkdir()
    os.chmod(directory, 0o777)
    forged = _row(0, agent="forged")
    elsewhere = db_path.parent / "forged.txt"
    elsewhere.write_bytes(journal.encode(forged))
    os.symlink(elsewhere, directory / "1-1-deadbeef.seg")
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"))
    closing.append(recorder)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert recorder.flush()
    assert [r["agent"] for r in sqlite_rows(db_path)] == []
    assert _decision_events(db_path, forged["decision_id"]) == 0
    assert os.path.islink(directory / "1-1-deadbeef.seg")


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file another user's needs root")
def test_another_user_s_segment_is_not_replayed(db_path: Path, closing: list[Recorder]):
    directory = _journal_dir(db_path)
    directory.mkdir(mode=0o700)
    theirs = _row(0, agent="theirs")
    segment = directory / "1-1-deadbeef.seg"
    segment.write_bytes(journal.encode(theirs))
    os.chown(segment, 65534, 65534)
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"))
    closing.append(recorder)
    assert recorder.flush()
    assert sqlite_rows(db_path) == []
    assert segment.exists()


def test_a_journal_directory_that_is_a_symlink_refuses_to_start(db_path: Path, tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.symlink(elsewhere, _journal_dir(db_path))
    with pytest.raises(StoreUnavailable, match=f"{_journal_dir(db_path)} is not a directory"):
        Recorder(make_engine(f"sqlite:///{db_path}"))
    assert list(elsewhere.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory another user's needs root")
def test_another_user_s_journal_directory_refuses_to_start(db_path: Path):
    directory = _journal_dir(db_path)
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    with pytest.raises(StoreUnavailable, match=f"{directory} belongs to uid 65534"):
        Recorder(make_engine(f"sqlite:///{db_path}"))


def test_a_journal_directory_that_cannot_be_made_is_a_clear_error(tmp_path: Path):
    """The directory cannot be created (here its parent is a file: ENOTDIR, as EACCES under a read-only
    parent): a StoreUnavailable naming it, which `cedargate run` prints as one line, not an OSError."""
    parent = tmp_path / "a-file"
    parent.write_text("")
    with pytest.raises(StoreUnavailable, match=f"the decision journal {parent}/db.journal cannot be written"):
        store._open_journal(str(parent / "db.journal"))


def test_a_new_segment_waits_for_a_cleanup_holding_its_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Another process's cleanup of stale `.new` files (`segment_paths`) may lock a newborn segment between
    its creation and its creator's lock: the creator waits for it rather than failing."""
    real_flock = fcntl.flock
    released: list[threading.Timer] = []

    def cleanup_first(fd: int, operation: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(".new") and not released:
            other = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # as the cleanup opens it
            real_flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            released.append(threading.Timer(0.05, os.close, (other,)))
            released[0].start()
        real_flock(fd, operation)

    monkeypatch.setattr(journal.fcntl, "flock", cleanup_first)
    owned = journal.Journal(str(tmp_path / "db.journal"))
    try:
        assert released, "the cleanup never held the newborn's lock"
        assert owned.append(_row(0)) is owned._current
    finally:
        released[0].join()
        owned.close()


def test_a_segment_removed_twice_closes_its_file_once(tmp_path: Path):
    """`close` and the writer's `maintain` may both reach a retired segment: the second removal must not
    close whatever file reused its descriptor number."""
    owned = journal.Journal(str(tmp_path / "db.journal"))
    segment = owned._current
    owned.append(_row(0))
    segment.committed = segment.appended
    journal._remove(segment)
    reused = os.open("/dev/null", os.O_RDONLY)
    try:
        journal._remove(segment)
        os.fstat(reused)  # EBADF if the second removal closed it
    finally:
        os.close(reused)
        owned.close()


def _dead_segment(db_path: Path, *rows: dict, name: str = "1-1-deadbeef") -> Path:
    """A segment left by a process that is gone (nobody holds its lock), holding `rows`."""
    directory = _journal_dir(db_path)
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / f"{name}{journal.SUFFIX}"
    path.write_bytes(b"".join(journal.encode(row) for row in rows))
    path.chmod(0o600)
    return path


def test_a_row_the_store_refuses_is_set_aside_and_the_rest_of_its_dead_segment_is_replayed(
        db_path: Path, closing: list[Recorder]):
    """Lines the store cannot take (from another release, say: without a NOT NULL column, without a decision
    id). A segment replayed in one transaction kept every other row of it off the record for good (review2
    R4): now its other rows are committed, the refused ones set aside beside it with the reason, and the
    segment is gone."""
    good, later = _row(0), _row(2)
    no_method = _row(1)
    del no_method["method"]  # NOT NULL, no default
    nameless = _row(3)
    del nameless["decision_id"]
    segment = _dead_segment(db_path, good, no_method, nameless, later)

    recorder = Recorder(make_engine(f"sqlite:///{db_path}"))
    closing.append(recorder)
    assert sorted(r["decision_id"] for r in sqlite_rows(db_path)) == sorted([good["decision_id"],
                                                                            later["decision_id"]])
    assert [_decision_events(db_path, row["decision_id"]) for row in (good, later)] == [1, 1]
    assert not segment.exists()
    rejected = Path(f"{segment}.rejected")
    assert stat.S_IMODE(rejected.stat().st_mode) == 0o600
    lines = rejected.read_bytes().splitlines()
    reasons = {journal.decode(line)["path"]: json.loads(line)["reason"] for line in lines}
    assert set(reasons) == {no_method["path"], nameless["path"]}  # each a journal line still
    assert "NOT NULL" in reasons[no_method["path"]] and "method" in reasons[no_method["path"]]
    assert "decision_id" in reasons[nameless["path"]]
    assert audit.verify(make_engine(f"sqlite:///{db_path}")).ok


def test_a_dead_segment_that_cannot_be_read_does_not_stop_the_others(db_path: Path, closing: list[Recorder]):
    """`*.seg` files that cannot be opened or read (a symlink to itself: ELOOP, as root too; a directory:
    EISDIR) are left for the next look, and the segments after them are replayed all the same. An OSError
    opening one escaped the replay: a recorder did not start."""
    looping = _journal_dir(db_path) / f"0-0-aaaaaaaa{journal.SUFFIX}"
    directory = _journal_dir(db_path) / f"0-1-bbbbbbbb{journal.SUFFIX}"
    directory.mkdir(parents=True)
    looping.symlink_to(looping.name)
    row = _row(0)
    segment = _dead_segment(db_path, row)
    recorder = Recorder(make_engine(f"sqlite:///{db_path}"))
    closing.append(recorder)
    assert [r["decision_id"] for r in sqlite_rows(db_path)] == [row["decision_id"]]
    assert not segment.exists()


def test_a_row_its_owner_commits_after_a_sibling_replayed_it_is_chained_once(db_path: Path, closing: list[Recorder]):
    """`Recorder.close` releases a segment's lock while its writer may still commit the segment's rows (a
    writer stuck in the store, a late row): a sibling replays it meanwhile, then the owner commits the row.
    The row was stored once (ON CONFLICT DO NOTHING) but its decision event was chained twice (review2 R6)."""
    first = Recorder(make_engine(f"sqlite:///{db_path}"), journal_linger=3600)
    closing.append(first)
    row = _row(0)
    with first._writing:  # the writer cannot commit it yet, as while close() waits on a stuck writer
        assert first.commit(row).result(0) is None
        assert first._journal is not None
        first._journal.close()  # what close() does then: the unsettled segment kept, its lock released
        other = Recorder(make_engine(f"sqlite:///{db_path}"))  # a sibling worker starts, and replays it
        closing.append(other)
        assert [r["decision_id"] for r in sqlite_rows(db_path)] == [row["decision_id"]]
    assert first.flush(10)  # the owner's writer commits it too
    assert _decision_events(db_path, row["decision_id"]) == 1
    assert audit.verify(make_engine(f"sqlite:///{db_path}")).ok


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli.main", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_commands_that_read_the_record_replay_a_killed_process_journal_first(db_path: Path):
    """After a kill -9 the last forwarded calls are only in the journal. `cedargate audit verify` said
    "audit log OK: 0 rows" and `report` left them out until a proxy started again (review2 R7): the commands
    that read the record replay dead journals first, as a start does."""
    child, ids = _child(db_path, journaled=6)
    _kill(child)
    assert sqlite_rows(db_path) == []
    verify = _cli("audit", "verify", "--database-url", f"sqlite:///{db_path}")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "6 forwarded calls committed from the decision journal" in verify.stderr
    assert sorted(r["decision_id"] for r in sqlite_rows(db_path)) == sorted(ids)
    assert [_decision_events(db_path, decision_id) for decision_id in ids] == [1] * len(ids)
    assert _segments(db_path) == []

    child, more = _child(db_path, journaled=3)
    _kill(child)
    explain = _cli("explain", "--decision", more[0], "--database-url", f"sqlite:///{db_path}")
    assert "3 forwarded calls committed" in explain.stderr
    assert "keeps no Cedar request" in explain.stderr  # found (the child recorded none), not "no decision"
    assert len(sqlite_rows(db_path)) == len(ids) + len(more)

    child, last = _child(db_path, journaled=2)
    _kill(child)
    report = _cli("report", "--database-url", f"sqlite:///{db_path}", "--since", "1d", "--json")
    assert report.returncode == 0, report.stdout + report.stderr
    assert "2 forwarded calls committed" in report.stderr
    assert len(sqlite_rows(db_path)) == len(ids) + len(more) + len(last)
    assert _segments(db_path) == []
    assert json.loads(report.stdout)


def test_audit_verify_says_incomplete_when_it_cannot_replay_a_dead_journal(db_path: Path):
    """The journal's rows cannot be committed (here another connection holds the store's write lock for longer
    than a writer waits): `audit verify` checks the chain and exits 3, saying how many forwarded calls are not
    in the record yet; the segment is kept for the next start."""
    child, ids = _child(db_path, journaled=4)
    _kill(child)
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        verify = _cli("audit", "verify", "--database-url", f"sqlite:///{db_path}")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert verify.returncode == 3, verify.stdout + verify.stderr
    assert ("4 forwarded calls are in the decision journal of a stopped process and NOT yet in the record"
            in verify.stderr)
    assert "INCOMPLETE" in verify.stdout
    assert len(_segments(db_path)) == 1 and sqlite_rows(db_path) == []
    again = _cli("audit", "verify", "--database-url", f"sqlite:///{db_path}")  # the lock gone: replayed
    assert again.returncode == 0, again.stdout + again.stderr
    assert sorted(r["decision_id"] for r in sqlite_rows(db_path)) == sorted(ids)
