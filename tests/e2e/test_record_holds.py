"""The record holds when the process dies: every call an upstream saw has its decision on the record.

A real `cedargate run` under concurrent agents, in front of an upstream that logs each call the moment
it arrives and answers some only seconds later, is killed with SIGKILL (nothing of it runs after: no
flush, no handler) or stopped with SIGTERM; then the record is read as an operator would, and
`cedargate audit verify` checks the chain. On SQLite and on PostgreSQL. On SQLite the rows of the calls
made just before the kill are in the killed process's journal, replayed by the next start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import sqlalchemy
from e2e_support import CEDARGATE, Cedargate, start_cedargate, write_config

from tests.support.waiting import wait_until

AGENTS = 12  # concurrent agents
SLOW = 2.5  # seconds a slow call takes upstream: killed mid-answer, it must already be on the record
BUSY = 150  # calls the upstream has seen before the signal


class SlowUpstream:
    """An upstream that logs every call's path on arrival; a path under /slow/ is answered after SLOW s."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                seen.append(self.path)
                if self.path.startswith("/slow/"):
                    time.sleep(SLOW)  # the upstream's own slowness, not a synchronisation
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *args: None  # type: ignore[method-assign]  # a killed proxy's calls
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@contextmanager
def slow_upstream() -> Iterator[SlowUpstream]:
    served = SlowUpstream()
    try:
        yield served
    finally:
        served.server.shutdown()
        served.server.server_close()


class Agents:
    """AGENTS threads calling through the proxy until stopped, each call's path unique; a quarter of
    them make only slow calls, the others fast ones. `answered` holds the paths of the calls answered 200."""

    def __init__(self, gate: Cedargate, port: int) -> None:
        self.stop = threading.Event()
        self.answered: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(gate, port, n), daemon=True)
                        for n in range(AGENTS)]
        for thread in self.threads:
            thread.start()

    def _run(self, gate: Cedargate, port: int, n: int) -> None:
        with httpx.Client(proxy=gate.proxy_url, timeout=10) as http:
            for _ in range(10_000):  # bounded: a stop that never came ends the loop too
                if self.stop.is_set():
                    return
                path = f"/{'slow' if n % 4 == 0 else 'fast'}/{uuid.uuid4()}"
                try:
                    if http.get(f"http://127.0.0.1:{port}{path}").status_code == 200:
                        self.answered.append(path)
                except httpx.HTTPError:
                    pass  # the proxy went away mid-call

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)


def under_load(slow: SlowUpstream, agents: Agents) -> None:
    """Wait until the upstream has seen BUSY calls, slow ones among them still unanswered."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answered = set(agents.answered)
        if len(slow.seen) >= BUSY and any(p.startswith("/slow/") and p not in answered for p in slow.seen):
            return
        time.sleep(0.02)
    raise AssertionError(f"no load after 30 s: the upstream saw {len(slow.seen)} calls")


def _recorded(url: str) -> dict[str, int | None]:
    store = sqlalchemy.create_engine(url)
    try:
        with store.connect() as db:
            rows = db.execute(sqlalchemy.text("SELECT path, upstream_status FROM decisions")).all()
    finally:
        store.dispose()
    return {path: status for path, status in rows}


def _verify(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CEDARGATE), "audit", "verify", "--database-url", url],
                          capture_output=True, text=True, timeout=60)


def _start(tmp_path: Path, policy_dir: Path, upstream, database_url: str | None) -> tuple[Cedargate, str]:
    extra = {"database_url": database_url} if database_url else {}
    config = write_config(tmp_path / "cedargate.yaml", policy_dir, tmp_path / "state", upstream, **extra)
    gate = start_cedargate(config)
    return gate, database_url or f"sqlite:///{gate.database}"


@pytest.fixture
def slow(upstream) -> Iterator[SlowUpstream]:
    with slow_upstream() as served:
        yield served


def test_killed_under_load_every_call_the_upstream_saw_is_on_the_record(tmp_path, policy_dir, upstream, slow,
                                                                       database_url):
    gate, url = _start(tmp_path, policy_dir, upstream, database_url)
    try:
        agents = Agents(gate, slow.port)
        under_load(slow, agents)
        gate.process.send_signal(signal.SIGKILL)
        gate.process.wait(10)
    finally:
        agents.join()
        gate.stop()
    # On SQLite a call's row is journaled before it goes and committed a few ms later: the rows of the last
    # calls are in the killed process's journal, which the next start replays, as an operator's restart would.
    again = start_cedargate(tmp_path / "cedargate.yaml")
    try:
        replayed = "".join(again.output)
    finally:
        assert again.stop() == 0
    if database_url is None:
        assert "replayed decision journal" in replayed
        assert list(Path(f"{gate.database}.journal").iterdir()) == []  # nothing left to replay

    seen = list(slow.seen)
    in_flight = [p for p in seen if p.startswith("/slow/") and p not in agents.answered]
    assert len(seen) >= BUSY and in_flight  # real load, and calls killed while the upstream held them
    recorded = _recorded(url)
    assert [path for path in seen if path not in recorded] == []
    # What became of a call is added after it was answered, and may be lost with the process; what is
    # on the record is right.
    assert {recorded[path] for path in seen} <= {200, None}
    result = _verify(url)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stopped_under_load_nothing_queued_is_lost(tmp_path, policy_dir, upstream, slow, database_url):
    gate, url = _start(tmp_path, policy_dir, upstream, database_url)
    try:
        agents = Agents(gate, slow.port)
        under_load(slow, agents)
        assert gate.stop() == 0
    finally:
        agents.join()
        gate.stop()

    recorded = _recorded(url)
    assert len(slow.seen) >= BUSY
    assert [path for path in slow.seen if path not in recorded] == []
    # Every answer an agent got was on its way out when its outcome was queued: none is missing.
    assert [path for path in agents.answered if recorded.get(path) != 200] == []
    output = "".join(gate.output)
    assert "NOT written" not in output
    result = _verify(url)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_held_call_is_on_the_record_from_the_start_of_its_hold(tmp_path, policy_dir, upstream, database_url):
    gate, url = _start(tmp_path, policy_dir, upstream, database_url)
    store = sqlalchemy.create_engine(url)
    try:
        held = threading.Thread(target=_held_call, args=(gate, upstream), daemon=True)
        held.start()
        deadline = time.monotonic() + 15
        opened: list = []
        while not opened and time.monotonic() < deadline:
            with store.connect() as db:
                opened = db.execute(sqlalchemy.text("SELECT decision_id FROM overrides")).all()
            time.sleep(0.05)
        assert opened, "no override request was opened"
        gate.process.send_signal(signal.SIGKILL)  # mid-hold: nobody has decided yet
        gate.process.wait(10)
        with store.connect() as db:
            recorded = db.execute(sqlalchemy.text("SELECT decision_id, decision, path FROM decisions")).all()
    finally:
        gate.stop()
        store.dispose()
    assert [tuple(r) for r in recorded] == [(opened[0][0], "escalate", "/v1/instances/i-0abc/stop")]


def _held_call(gate: Cedargate, upstream) -> None:
    with httpx.Client(proxy=gate.proxy_url, timeout=30) as http:
        try:
            http.post(f"http://127.0.0.1:{upstream.http_port}/v1/instances/i-0abc/stop",
                      headers={"Prefer": "wait=20"})
        except httpx.HTTPError:
            pass  # the proxy was killed while it held the call


def test_a_worker_killed_under_load_leaves_every_call_it_forwarded_on_the_record(tmp_path, policy_dir, upstream,
                                                                                 slow):
    """`--workers 2` on SQLite: a worker killed with SIGKILL under load leaves the rows of its last calls in
    its journal; the worker started in its place replays them (and the other would, on its next look), with
    no restart of the whole program."""
    config = write_config(tmp_path / "cedargate.yaml", policy_dir, tmp_path / "state", upstream)
    gate = start_cedargate(config, "--workers", "2")
    url = f"sqlite:///{gate.database}"
    try:
        agents = Agents(gate, slow.port)
        under_load(slow, agents)
        killed, kept = gate.children()
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: len(gate.children()) == 2 and killed not in gate.children(), "a worker in its place")
        replacement = next(pid for pid in gate.children() if pid != kept)
        wait_until(lambda: any(f"proxy worker {replacement} serving" in line for line in gate.output),
                   "the new worker to serve")
        agents.join()
        seen = list(slow.seen)
        assert len(seen) >= BUSY
        wait_until(lambda: [path for path in seen if path not in _recorded(url)] == [],
                   "every call the upstream saw to be on the record")
        assert "replayed decision journal" in "".join(gate.output)
    finally:
        agents.join()
        stopped = gate.stop()
    assert stopped == 0, "".join(gate.output)[-3000:]
    result = _verify(url)
    assert result.returncode == 0, result.stdout + result.stderr
