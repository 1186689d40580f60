"""Replay's walk over the record: a window of any size read in batches of a fixed size, each row counted
once, none from before the window; and a store whose schema predates stored requests refused with what to
do. (The command over a real cedargate's history: tests/proxy/cli/test_replay_command.py.)"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from proxy_support import make_call
from sqlalchemy import text

from proxy.cedar.engine import Engine
from proxy.decision.gate import Gate
from proxy.decision.replay import ReplayError, replay
from proxy.record.store import Recorder, utcnow
from tests.support.candidates import candidate_policies


def test_a_window_is_read_in_batches_each_row_once_and_none_before_it(
        gate: Gate, recorder: Recorder, policy_dir: Path, tmp_path: Path):
    now = utcnow()
    for i in range(7):  # listings: allowed live, denied by the candidate
        verdict = gate.decide(make_call("GET", f"http://localhost:9000/v1/instances?page={i}"))
        gate.finish(verdict, 200)
    old = gate.decide(make_call("GET", "http://localhost:9000/v1/instances?page=old"))
    gate.finish(old, 200)
    assert recorder.flush()
    with recorder.engine.begin() as conn:  # one listing from before the window
        conn.execute(text("UPDATE decisions SET at = :at WHERE decision_id = :id"),
                     {"at": now - timedelta(days=30), "id": old.decision_id})
    candidate = Engine(candidate_policies(policy_dir, tmp_path / "candidate"))

    report = replay(recorder.engine, candidate, now - timedelta(days=7), batch_size=3, examples=2)
    assert (report.decisions, report.replayed, report.changed) == (7, 7, 7)
    [change] = report.changes
    assert (change.recorded, change.candidate, change.count) == ("allow", "deny", 7)
    assert [e.url for e in change.examples] == [
        "http://localhost:9000/v1/instances?page=0", "http://localhost:9000/v1/instances?page=1"]

    live = Engine(policy_dir)
    assert replay(recorder.engine, live, now - timedelta(days=60), batch_size=2).unchanged == 8
    assert replay(recorder.engine, live, now + timedelta(days=1)).decisions == 0


def test_a_store_from_before_stored_requests_is_refused_saying_what_to_do(
        recorder: Recorder, policy_dir: Path, tmp_path: Path):
    with recorder.engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_decisions_at_with_request"))  # as before revision 0007, too
        conn.execute(text("ALTER TABLE decisions DROP COLUMN cedar_request"))
    with pytest.raises(ReplayError, match=r"cedargate db upgrade"):
        replay(recorder.engine, Engine(shutil.copytree(policy_dir, tmp_path / "c")), utcnow())
