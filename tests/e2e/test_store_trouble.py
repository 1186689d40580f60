"""Store trouble, as an agent and an operator see it: a call the record cannot take is refused with a
503 store-unavailable problem that says when to retry and never how the store failed; cedargate
recovers by itself when the store does; and it does not start on a database it could only read.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from e2e_support import Cedargate, start_cedargate, write_config
from sqlmodel import SQLModel
from test_escalation_flow import agent, api, approve, pending, stop_url

from proxy.record.store import make_engine
from tests.support.waiting import wait_until

LEAKS = ("sqlite", "no such table", "OperationalError", "readonly database", "disk I/O", "cedargate.db")


def _get(gate: Cedargate, upstream, path: str) -> httpx.Response:
    with httpx.Client(proxy=gate.proxy_url, timeout=15) as http:
        return http.get(f"http://127.0.0.1:{upstream.http_port}{path}")


def _refused_honestly(answer: httpx.Response) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert int(answer.headers["retry-after"]) > 0
    problem = answer.json()
    assert problem["type"] == "urn:cedargate:problem:store-unavailable"
    for leak in LEAKS:
        assert leak.lower() not in answer.text.lower()


def _until_answered(gate: Cedargate, upstream, path: str, status: int) -> httpx.Response:
    deadline = time.monotonic() + 15
    while True:
        answer = _get(gate, upstream, path)
        if answer.status_code == status or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


def test_a_call_the_record_cannot_take_is_refused_honestly_and_the_store_recovers(cedargate, upstream):
    assert _get(cedargate, upstream, "/v1/instances/before").status_code == 200
    with sqlite3.connect(cedargate.database) as db:  # the record breaks under the running proxy
        db.execute("DROP TABLE decisions")

    # A call's row is journaled before it goes and committed a few ms later: the calls journaled before the
    # writer finds the store failing go (their rows are kept, in the journal and the writer's queue); from
    # then on every call is refused, honestly, and nothing more is forwarded.
    _refused_honestly(_until_answered(cedargate, upstream, "/v1/instances/during", 503))
    _refused_honestly(_get(cedargate, upstream, "/v1/instances/during-2"))
    assert {c.path for c in upstream.calls} <= {"/v1/instances/before", "/v1/instances/during"}

    SQLModel.metadata.create_all(make_engine(f"sqlite:///{cedargate.database}"))
    assert _until_answered(cedargate, upstream, "/v1/instances/after", 200).status_code == 200
    assert [c.path for c in upstream.calls][-1] == "/v1/instances/after"
    assert "/v1/instances/during-2" not in {c.path for c in upstream.calls}
    # Every call forwarded while the table was gone is on the record once the store is back.
    forwarded = {c.path for c in upstream.calls} - {"/v1/instances/before"}
    wait_until(lambda: forwarded <= _recorded_paths(cedargate), what="the journaled calls to be committed")


def _recorded_paths(gate: Cedargate) -> set[str]:
    with sqlite3.connect(gate.database) as db:
        return {path for (path,) in db.execute("SELECT path FROM decisions")}


def _immutable(path: Path, on: bool) -> None:
    subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True, capture_output=True)


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Files to make read-only even for root (chattr +i), made writable again afterwards."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    files: list[Path] = []
    yield files
    for path in files:
        _immutable(path, False)


def test_a_read_only_database_is_refused_at_start_and_one_that_turns_writable_again_recovers(
        tmp_path, policy_dir, upstream, immutable):
    config = write_config(tmp_path / "cedargate.yaml", policy_dir, tmp_path / "state", upstream)
    gate = start_cedargate(config)
    assert _get(gate, upstream, "/v1/instances/first").status_code == 200
    assert gate.stop() == 0

    immutable.append(gate.database)
    _immutable(gate.database, True)
    with pytest.raises(RuntimeError) as refused:
        start_cedargate(config)
    assert "cannot be written" in str(refused.value) and "writable" in str(refused.value)

    # Running, the store turns read-only (its WAL, where commits go) and then writable again.
    _immutable(gate.database, False)
    gate = start_cedargate(config)
    try:
        wal = Path(f"{gate.database}-wal")
        immutable.append(wal)
        _immutable(wal, True)
        _refused_honestly(_until_answered(gate, upstream, "/v1/instances/read-only", 503))
        _immutable(wal, False)
        assert _until_answered(gate, upstream, "/v1/instances/writable", 200).status_code == 200
    finally:
        gate.stop()
    with sqlite3.connect(gate.database) as db:
        paths = [path for (path,) in db.execute("SELECT path FROM decisions ORDER BY id")]
    assert paths[0] == "/v1/instances/first" and paths[-1] == "/v1/instances/writable"


def test_a_held_call_whose_record_met_a_passing_failure_is_released_once_approved(cedargate, upstream):
    """The held call's decision row is queued as the hold starts; the store refuses it once (another process
    holds SQLite's write lock past busy_timeout) and takes it on the retry. That passing failure, over
    before the human decides, must not refuse the approved call: it goes, once, and the grant is spent on it."""
    lock = sqlite3.connect(cedargate.database, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    with ThreadPoolExecutor(1) as pool, agent(cedargate) as http:
        held = pool.submit(http.post, stop_url(upstream), json={"grace": 30})
        try:
            wait_until(lambda: any("decision store write failed" in line for line in cedargate.output),
                       what="the record's first try to fail")
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        [request] = pending(cedargate)
        assert approve(cedargate, request["id"]).json()["status"] == "granted"
        answer = held.result(timeout=60)
    assert answer.status_code == 200, answer.text
    assert [c.path for c in upstream.calls] == ["/v1/instances/i-0abc/stop"]
    assert api(cedargate, "GET", f"/overrides/{request['id']}").json()["status"] == "released"


def test_a_call_goes_while_another_writer_holds_the_lock_and_is_refused_when_it_is_held_past_the_bound(
        cedargate, upstream):
    """Another process holds SQLite's write lock: a call's row is journaled and the call goes at once, its
    commit waiting its turn; held past the writer's bound (BUSY_TIMEOUT), the commit fails and calls are
    refused 503 store-unavailable with nothing forwarded, and cedargate recovers when the lock is let go,
    every call it forwarded on the record."""
    lock = sqlite3.connect(cedargate.database, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        assert _get(cedargate, upstream, "/v1/instances/waited").status_code == 200
        # Held until the writer's wait passes the bound: from then on calls are refused.
        _refused_honestly(_until_answered(cedargate, upstream, "/v1/instances/held-past-the-bound", 503))
        _refused_honestly(_get(cedargate, upstream, "/v1/instances/refused"))
        assert _recorded_paths(cedargate) == set()  # nothing committed while the lock is held
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
    forwarded = {c.path for c in upstream.calls}
    assert "/v1/instances/waited" in forwarded
    assert forwarded <= {"/v1/instances/waited", "/v1/instances/held-past-the-bound"}
    assert _until_answered(cedargate, upstream, "/v1/instances/after", 200).status_code == 200
    assert "/v1/instances/refused" not in {c.path for c in upstream.calls}
    wait_until(lambda: forwarded | {"/v1/instances/after"} <= _recorded_paths(cedargate),
               what="every call forwarded to be on the record")
