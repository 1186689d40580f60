"""Starting the core: the state dir it keeps the CA key and the record in is private, however it was made."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from proxy.runtime import Runtime, private_state_dir
from proxy.settings.config import Settings


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_an_existing_state_dir_and_database_are_made_private(policy_dir: Path, tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)  # as an older release, or a loose umask, left it
    (state / "cedargate.db").touch()
    os.chmod(state / "cedargate.db", 0o644)

    runtime = Runtime.start(Settings(policy_dir=policy_dir, state_dir=state, policy_reload_interval=0))
    try:
        assert mode(state) == 0o700
        database = state / "cedargate.db"
        assert mode(database) == 0o600
        # SQLite gives its WAL and shared-memory files the database's mode; they hold the same rows.
        assert {p.name for p in state.iterdir()} >= {"cedargate.db-wal", "cedargate.db-shm"}
        assert all(mode(p) == 0o600 for p in state.iterdir() if p.name.startswith("cedargate.db") and p.is_file())
        # The journal of rows not yet committed: a directory of this process's own, its segments 0600.
        journal = state / "cedargate.db.journal"
        assert mode(journal) == 0o700 and all(mode(p) == 0o600 for p in journal.iterdir())
    finally:
        runtime.close()
        runtime.recorder.engine.dispose()


def test_a_new_state_dir_is_private(tmp_path: Path):
    state = tmp_path / "a" / "state"
    private_state_dir(state)
    assert mode(state) == 0o700



def test_a_runtime_nobody_can_review_refuses_an_escalated_call_at_once(policy_dir: Path, tmp_path: Path):
    import asyncio

    from proxy_support import make_call

    from proxy.decision.gate import Outcome
    from proxy.vocabulary.problems import Problem

    settings = Settings(policy_dir=policy_dir, state_dir=tmp_path / "state", policy_reload_interval=0)
    runtime = Runtime.start(settings)
    try:
        runtime.refuse_holds("the override API cannot listen on 127.0.0.1:8081: Address already in use")
        verdict = runtime.gate.decide(make_call("POST", "http://127.0.0.1:9000/v1/instances/i-1/stop"))
        assert verdict.outcome is Outcome.ESCALATE
        # Asked to wait an hour; the answer comes at once, since no one could ever decide.
        resolution = asyncio.run(asyncio.wait_for(
            runtime.oversight.resolve(verdict, 3600.0, None, client_alive=lambda: True), timeout=30))
        assert not resolution.release
        problem = resolution.verdict.problem_body()
        assert problem["type"] == Problem.REVIEW_UNAVAILABLE.uri
        assert problem["status"] == 403
        assert "Address already in use" in problem["detail"] and "not held" in problem["detail"]
        assert runtime.overrides.list() == []  # nothing opened that nobody could ever review
    finally:
        runtime.close()
        runtime.recorder.engine.dispose()
