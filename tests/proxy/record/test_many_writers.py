"""Many processes record into one database: one verifiable audit chain, nothing refused or lost.

Each writer is a real process with its own `Recorder` (as each cedargate instance, or each worker of
`cedargate run --workers N`, has), all started on a new database at once, so they also race to make
the schema and the chain's first row.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from proxy.record import audit
from proxy.record.store import make_engine

WRITERS = 3
ROWS = 300  # per writer, recorded as fast as it can, so the writers' batches interleave

# One writer process: record ROWS decisions and an event each tenth row, wait until all are committed,
# and say how many rows the recorder wrote and whether it ever saw the store failing.
WRITER = """
import sys, threading, uuid
from datetime import UTC, datetime
from proxy.record.store import Recorder, make_engine

url, name, rows, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
while not __import__("os").path.exists(go):  # start together: the schema and first append race too
    pass
recorder = Recorder(make_engine(url), batch_size=20, linger=0.0)
failures = []
def watch():
    while not done.is_set():
        if recorder.last_error:
            failures.append(recorder.last_error)
        done.wait(0.001)
done = threading.Event()
threading.Thread(target=watch, daemon=True).start()
for i in range(rows):
    recorder.record({
        "decision_id": f"{name}-{i}", "at": datetime.now(UTC), "agent": name, "method": "GET",
        "scheme": "http", "host": "localhost", "port": 9000, "path": f"/v1/{i}", "action": 'Action::"get"',
        "resource": 'Host::"localhost"', "decision": "allow", "determining_policies": "[]", "errors": "[]",
        "policy_revision": "r", "upstream_status": 200, "duration_ms": 1.0,
    })
    if i % 10 == 0:
        recorder.record_event({"kind": "release", "agent": name, "payload": {"i": i}})
ok = recorder.flush(60)
done.set()
recorder.close()
print(ok, recorder.written, len(failures), failures[:1])
"""


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_processes_recording_at_once_share_one_chain_and_refuse_nothing(database: str, tmp_path: Path,
                                                                        request: pytest.FixtureRequest):
    url = f"sqlite:///{tmp_path / 'cedargate.db'}" if database == "sqlite" else request.getfixturevalue("pg_url")
    go = tmp_path / "go"
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, url, f"writer-{n}", str(ROWS), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in range(WRITERS)
    ]
    go.touch()
    outputs = [writer.communicate(timeout=120) for writer in writers]

    for writer, (out, err) in zip(writers, outputs, strict=True):
        assert writer.returncode == 0, err
        ok, written, failures, first = out.split(" ", 3)
        # Every row committed, and no writer ever found the store failing because another wrote.
        assert (ok, written, failures) == ("True", str(ROWS), "0"), first + err
    engine = make_engine(url)
    with engine.connect() as conn:
        decisions = conn.execute(text("SELECT count(*) FROM decisions")).scalar()
        chained = conn.execute(text("SELECT count(*) FROM audit_log")).scalar()
    assert decisions == WRITERS * ROWS
    assert chained == WRITERS * (ROWS + ROWS // 10)
    result = audit.verify(engine)
    assert result.ok, result.reason
    assert result.rows_checked == chained
    engine.dispose()
