"""The decision journal: an append-only file of the decision rows a process has promised to record.

A call about to go upstream must be on the record first. On SQLite (WAL, synchronous=NORMAL) a commit
survives the process being killed, since its pages are in the OS's cache, but not a power loss; one
`os.write` of a line to a file opened O_APPEND has exactly that durability, at a small fraction of a
commit's cost. So `store.Recorder.commit` appends the row here, lets the call go, and the writer commits
the rows to SQLite in batches a few milliseconds later; this module owns the files in between.

Each process writes its own segments in a directory beside the database (`<database>.journal/`, 0700;
files 0600), holding an exclusive `fcntl.flock` on each for as long as it lives: the kernel releases it
when the process dies, however it dies. A segment is one row per line, the row as canonical JSON with
the paths of its datetimes, so that they come back exactly as they went in. The owner rotates its
segment when it is large or old (`Journal.maintain`) and deletes a retired one once every row appended
to it is committed (the store counts them, `Segment.committed`). Any process that opens the record
replays the segments whose lock it can take (their owner is gone: `dead_segments`), and a live
process's segment is never touched, since its lock cannot be taken. A segment is created under a name
that replay ignores and renamed once locked, so a replay never takes a segment being born.

Knows nothing of SQL: the store decides what a replayed row becomes. May import `proxy.vocabulary`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from proxy.vocabulary.canonical import canonical

log = logging.getLogger(__name__)

SUFFIX = ".seg"
ROTATE_BYTES = 4 * 1024 * 1024  # a segment this large is retired for a new one
ROTATE_AFTER = 5.0  # seconds: a segment with rows this old is retired, so a committed one is deleted soon


def directory_for(database_file: str) -> str:
    """The journal directory of a SQLite database file."""
    return f"{database_file}.journal"


class JournalRefused(Exception):
    """The journal directory is not safe to use (not a directory of this user's); the message says why."""


def private_directory(directory: str) -> None:
    """Create `directory` (0700), or check an existing one: a directory, not a symlink, owned by this user,
    tightened to 0700 if looser. Whoever can write it could forge the rows a replay chains as decisions,
    read every journaled call, or delete them (`JournalRefused`; OSError if it cannot be created)."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    try:  # opened, not looked up by name again: what is checked and chmod-ed is what was opened
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise JournalRefused(
                f"the decision journal {directory} is not a directory (a symlink or a file): move it away, "
                "then start again") from None
        raise
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise JournalRefused(
                f"the decision journal {directory} belongs to uid {info.st_uid}, not to this user "
                f"(uid {os.geteuid()}): run cedargate as its owner, or move it away") from None
        if stat.S_IMODE(info.st_mode) != 0o700:
            log.warning("decision journal %s was mode %o: made 0700", directory, stat.S_IMODE(info.st_mode))
            try:
                os.fchmod(fd, 0o700)
            except OSError as exc:
                raise JournalRefused(
                    f"the decision journal {directory} cannot be made private (mode 0700): {exc.strerror}") from None
    finally:
        os.close(fd)


def encode(row: dict[str, Any]) -> bytes:
    """A row as one journal line: canonical JSON of the row (datetimes in ISO 8601) and the paths of its
    datetimes, so that `decode` gives them back as datetimes, to the microsecond and with their offset."""
    times: list[list[str | int]] = []
    _find_times(row, [], times)
    return canonical({"row": row, "times": times}) + b"\n"


def _find_times(value: Any, path: list[str | int], found: list[list[str | int]]) -> None:
    if isinstance(value, datetime):
        found.append(list(path))
    elif isinstance(value, dict):
        for key, item in value.items():
            _find_times(item, [*path, key], found)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _find_times(item, [*path, index], found)


def decode(line: bytes) -> dict[str, Any]:
    """The row a journal line holds (raises ValueError for a line that is not one)."""
    entry = json.loads(line)
    row = entry["row"]
    if not isinstance(row, dict):
        raise ValueError("a journal line's row is not an object")
    for path in entry.get("times", []):
        holder: Any = row
        for step in path[:-1]:
            holder = holder[step]
        holder[path[-1]] = datetime.fromisoformat(holder[path[-1]])
    return row


class Segment:
    """One open segment file of the owning process, locked for as long as it is open."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.opened_at = time.monotonic()
        self.size = 0
        self.appended = 0  # rows written to it (under the journal's lock)
        self.committed = 0  # of those, rows the store has committed (by the store's writer)

    @property
    def settled(self) -> bool:
        return self.committed >= self.appended


class Journal:
    """The owning process's segments in `directory`: append rows, rotate, delete what is committed."""

    def __init__(self, directory: str, *, rotate_bytes: int | None = None, rotate_after: float | None = None) -> None:
        self.directory = directory
        self.rotate_bytes = ROTATE_BYTES if rotate_bytes is None else rotate_bytes
        self.rotate_after = ROTATE_AFTER if rotate_after is None else rotate_after
        private_directory(directory)
        self._lock = threading.Lock()  # taken for each append: a write and two counters
        self._retired: list[Segment] = []
        self._broken = False  # the last append failed: the next one starts a new segment first
        self._closed = False
        self._current = self._new_segment()

    def owns(self, path: str) -> bool:
        return any(os.path.basename(s.path) == os.path.basename(path) for s in [self._current, *self._retired])

    def append(self, row: dict[str, Any]) -> Segment:
        """Write `row` as one line with one `os.write`; the segment it is in, for the store to count it
        committed. Raises OSError when the row is not wholly written (a full disk, an I/O error, a closed
        journal): then the call must not go."""
        line = encode(row)
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "the decision journal is closed")
            if self._broken:  # after a failed write the old segment may end in half a line
                self._retire_current()
                self._broken = False
            segment = self._current
            try:
                written = os.write(segment.fd, line)
            except OSError:
                self._broken = True
                raise
            segment.size += written
            if written != len(line):
                self._broken = True
                raise OSError(errno.ENOSPC, f"the decision journal took {written} of {len(line)} bytes")
            segment.appended += 1
            return segment

    def maintain(self, now: float | None = None) -> None:
        """Retire the current segment if it is large or has held rows for `rotate_after` seconds, and
        delete every retired segment whose rows are all committed. Called by the store's writer."""
        now = time.monotonic() if now is None else now
        with self._lock:  # the retired list under the lock: `close` and this never both remove a segment
            if self._closed:
                return
            current = self._current
            if current.appended and (current.size >= self.rotate_bytes or now - current.opened_at >= self.rotate_after):
                self._retire_current()
            done = [s for s in self._retired if s.settled]
            self._retired = [s for s in self._retired if not s.settled]
        for segment in done:
            _remove(segment)

    def close(self) -> bool:
        """Stop appending; delete the segments whose rows are all committed and release the others (left for
        a replay). Whether every segment was deleted."""
        with self._lock:
            if self._closed:
                return True
            self._closed = True
            segments, self._retired = [*self._retired, self._current], []
        kept = 0
        for segment in segments:
            if segment.settled:
                _remove(segment)
            else:
                kept += 1
                log.error("the decision journal %s keeps %d rows not committed; the next start replays them",
                          segment.path, segment.appended - segment.committed)
                _release(segment)
        return kept == 0

    def _retire_current(self) -> None:
        """Start a new segment and retire the current one (called with the lock held)."""
        fresh = self._new_segment()
        self._retired.append(self._current)
        self._current = fresh

    def _new_segment(self) -> Segment:
        """A new segment, created under a name replay ignores, locked, then renamed into place."""
        name = f"{os.getpid()}-{int(time.time() * 1000)}-{secrets.token_hex(4)}"
        hidden = os.path.join(self.directory, f".{name}.new")
        path = os.path.join(self.directory, f"{name}{SUFFIX}")
        fd = os.open(hidden, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # Blocking: another process's cleanup of stale `.new` files (`segment_paths`) may hold it for
            # an instant between our create and our lock; it leaves a fresh file alone.
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(hidden, path)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(hidden)
            except OSError:
                pass
            raise
        return Segment(path, fd)


def _remove(segment: Segment) -> None:
    """Delete a segment, then release it (unlinked first: nobody replays a file that is gone)."""
    if segment.fd < 0:
        return  # removed already
    try:
        os.unlink(segment.path)
    except FileNotFoundError:
        pass
    finally:
        _release(segment)


def _release(segment: Segment) -> None:
    """Close a segment's file (which releases its lock) once: a second close could close a reused fd."""
    fd, segment.fd = segment.fd, -1
    if fd >= 0:
        os.close(fd)


class DeadSegment:
    """A segment whose owner is gone, locked by this process until `release` or `remove`."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    def rows(self) -> list[dict[str, Any]]:
        """Its rows, in order; a line that is not a row (half a line from a failed write or a crash) is
        skipped and said."""
        with open(self.fd, "rb", closefd=False) as file:
            file.seek(0)
            data = file.read()
        rows = []
        for number, line in enumerate(data.split(b"\n"), 1):
            if not line:
                continue
            try:
                rows.append(decode(line))
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                log.warning("decision journal %s line %d is not a row, skipped: %s", self.path, number, exc)
        return rows

    def remove(self) -> None:
        """Delete it (its rows are committed), then release it."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.release()

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@contextmanager
def dead_segment(path: str) -> Iterator[DeadSegment | None]:
    """The segment at `path` locked for replay, or None if its owner lives (its lock is held) or it is
    gone (replayed and deleted by another process meanwhile). Released on leaving, unless removed."""
    try:  # never follows a symlink, never waits on a FIFO
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None
        return
    except OSError as exc:
        _skipped(path, f"cannot be opened: {exc.strerror}")
        yield None
        return
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)
        _skipped(path, "is not a regular file of this user")
        yield None
        return
    dead = DeadSegment(path, fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None  # a live owner
            return
        if os.fstat(fd).st_nlink == 0:
            yield None  # replayed and deleted by another process between our open and our lock
            return
        yield dead
    finally:
        dead.release()


_SKIPPED: set[str] = set()  # paths said to be skipped (`_skipped`), each said once


def _skipped(path: str, why: str) -> None:
    """Say once that a file in the journal directory is not replayed (a symlink, a FIFO, another user's)."""
    if path not in _SKIPPED and len(_SKIPPED) < 1000:
        _SKIPPED.add(path)
        log.warning("decision journal %s %s: skipped, never replayed", path, why)


def segment_paths(directory: str) -> list[str]:
    """The segments in `directory` (none if it does not exist), oldest name first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    stale = time.time() - 60
    for name in names:  # a segment's creator died before it was locked and named: empty, and nobody's
        if name.startswith(".") and name.endswith(".new"):
            try:  # a fresh one is being born: not even opened, so its creator's lock is never delayed
                if os.lstat(os.path.join(directory, name)).st_mtime >= stale:
                    continue
            except FileNotFoundError:
                continue
            with dead_segment(os.path.join(directory, name)) as dead:
                if dead is not None and os.fstat(dead.fd).st_mtime < stale:
                    dead.remove()
    segments = [name for name in names if name.endswith(SUFFIX)]
    return [os.path.join(directory, name) for name in sorted(segments, key=_created)]


def _created(name: str) -> tuple[int, str]:
    """A segment's name sorts by when it was made (`<pid>-<milliseconds>-<random>.seg`)."""
    parts = name.split("-")
    return (int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0), name
