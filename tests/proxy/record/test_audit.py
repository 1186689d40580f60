"""The audit log: decisions and override events chained in the order they happened, and every way of
tampering with the stored rows named at the first row it touched.

The chain is written by the real `Recorder` (decisions through the real `Gate`), tampered with by raw
SQL as someone with database access would, and checked by `verify` and by `cedargate audit verify`.
Each test runs on a SQLite file and (marked `postgres`) on the local PostgreSQL server.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from proxy_support import make_call, wait_until
from sqlalchemy import create_engine, text
from sqlmodel import SQLModel

from proxy.cedar.engine import Engine
from proxy.cli.audit_commands import add_audit_commands, run_audit_command
from proxy.decision.gate import Gate
from proxy.record.audit import GENESIS, VerifyResult, entry_hash, iso_utc, verify
from proxy.record.store import Recorder, make_engine
from proxy.vocabulary.canonical import canonical

LIST = ("GET", "http://127.0.0.1:9000/v1/instances")
STOP_DEV = ("POST", "http://localhost:9000/v1/instances/i-1/stop")
DELETE_VOLUME = ("DELETE", "http://localhost:9000/v1/volumes/v-1")


@pytest.fixture
def audited(database_url: str, engine: Engine) -> Iterator[tuple[Recorder, Gate]]:
    # batch_size=3: the story below spans several transactions, so the chain crosses batches.
    recorder = Recorder(make_engine(database_url), batch_size=3, retry_interval=0.05)
    yield recorder, Gate(engine, recorder)
    recorder.close(timeout=2)
    recorder.engine.dispose()


def _story(recorder: Recorder, gate: Gate) -> list[tuple]:
    """An allowed call, a refused one a human lets through, and more; returns what each row should say."""
    expected = []

    def decide(call: tuple[str, str], status: int | None = None) -> str:
        verdict = gate.decide(make_call(*call))
        gate.finish(verdict, status)
        expected.append(("decision", verdict.decision_id, None, "ops-bot", None))
        return verdict.decision_id

    def event(kind: str, **fields) -> None:
        recorder.record_event({"kind": kind, "agent": "ops-bot", **fields})
        ids = fields.get("decision_id"), fields.get("override_id")
        expected.append((kind, *ids, "ops-bot", fields.get("actor")))

    decide(LIST, 200)
    refused = decide(DELETE_VOLUME)
    event("override_created", decision_id=refused, override_id="ovr-1",
          payload={"reason": "clean up v-1", "expires_at": datetime(2030, 1, 1, tzinfo=UTC)})
    event("approval", override_id="ovr-1", actor="alice", payload={"comment": "ticket OPS-1"})
    event("grant", override_id="ovr-1", payload={"ttl_seconds": 600})
    released = decide(DELETE_VOLUME, 204)
    event("release", decision_id=released, override_id="ovr-1", payload={"policy_revision": "r1"})
    decide(STOP_DEV, 200)
    event("expired", override_id="ovr-2")
    decide(LIST, 200)
    assert recorder.flush()
    return expected


def _rows(url: str) -> list:
    eng = create_engine(url)
    try:
        with eng.connect() as con:
            return con.execute(text("SELECT * FROM audit_log ORDER BY seq")).all()
    finally:
        eng.dispose()


def _sql(url: str, *statements: str, **params) -> None:
    """Tamper as someone with database access would: plain SQL, committed."""
    eng = create_engine(url)
    try:
        with eng.begin() as con:
            for statement in statements:
                con.execute(text(statement), params)
    finally:
        eng.dispose()


def _verify(url: str, chunk_size: int = 3) -> VerifyResult:
    eng = create_engine(url)
    try:
        return verify(eng, chunk_size=chunk_size)
    finally:
        eng.dispose()


def _documented_hash(row, **changes) -> str:
    """The row hash exactly as proxy/record/audit.py's docstring specifies it, written independently of it."""
    values = dict(row._mapping, **changes)
    at = values["at"] if isinstance(values["at"], datetime) else datetime.fromisoformat(values["at"])
    at = (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC)
    content = {key: values[key] for key in (
        "seq", "kind", "decision_id", "override_id", "agent", "actor", "payload", "prev_hash")}
    content["at"] = at.strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _audit(*argv: str) -> int:
    """`cedargate audit ...` as cli.main parses it."""
    parser = argparse.ArgumentParser(prog="cedargate")
    add_audit_commands(parser.add_subparsers(dest="command", required=True))
    return run_audit_command(parser.parse_args(["audit", *argv]))


# ---- the chain as written ---------------------------------------------------------------------------


def test_decisions_and_events_are_chained_in_the_order_they_happened(audited, database_url: str):
    recorder, gate = audited
    expected = _story(recorder, gate)

    rows = _rows(database_url)
    assert [r.seq for r in rows] == list(range(1, 11))
    assert [(r.kind, r.decision_id, r.override_id, r.agent, r.actor) for r in rows] == expected

    eng = create_engine(database_url)
    with eng.connect() as con:
        decisions = {r.decision_id: r for r in con.execute(text("SELECT * FROM decisions"))}
        head = con.execute(text("SELECT seq, hash FROM audit_head")).all()
    eng.dispose()
    # Each decision's audit row carries the decision row itself.
    for row in rows:
        if row.kind == "decision":
            payload = json.loads(row.payload)
            stored = decisions[row.decision_id]
            assert (payload["path"], payload["decision"], payload["upstream_status"]) == (
                stored.path, stored.decision, stored.upstream_status)
            # ...but not its Cedar request: the log is kept for good, the request only for its retention.
            assert "cedar_request" not in payload and stored.cedar_request is not None
    assert json.loads(rows[2].payload) == {
        "reason": "clean up v-1", "expires_at": "2030-01-01T00:00:00+00:00"}
    assert head == [(10, rows[-1].hash)]

    result = _verify(database_url)
    assert result == VerifyResult(ok=True, rows_checked=10, head=(10, rows[-1].hash))


def test_every_row_hash_follows_the_documented_formula(audited, database_url: str):
    _story(*audited)
    rows = _rows(database_url)
    assert rows[0].prev_hash == GENESIS == "0" * 64
    for before, row in zip(rows, rows[1:], strict=False):
        assert row.prev_hash == before.hash
    assert [r.hash for r in rows] == [_documented_hash(r) for r in rows]


@pytest.mark.parametrize("text", [
    "plain", "", 'quotes " and \\ backslashes', "line\nbreak\ttab\x01control\x7f", "caf\u00e9 \u65e5\u672c \U0001f600",
    "lone \udc80 surrogate", "\u2028 separators \u2029", "</script>"])
@pytest.mark.parametrize("at", [datetime(2026, 12, 2, 15, 4, 5, 123456, tzinfo=UTC),
                                datetime(2026, 12, 2, 16, 4, 5, tzinfo=timezone(timedelta(hours=1))),
                                "2026-12-02 15:04:05.000001"])
def test_a_rows_hash_is_over_its_canonical_json_whatever_its_text(text: str, at: datetime | str):
    """The hash of an appended row is spelt out field by field (cheaper than building the dict): it must
    be byte for byte the documented formula, the canonical JSON of the row, for every string."""
    for fields in [(7, at, text, text, None, text, None, text, "a" * 64),
                   (2**40, at, "decision", None, text, None, text, "{}", GENESIS)]:
        seq, when, kind, decision_id, override_id, agent, actor, payload, prev_hash = fields
        documented = hashlib.sha256(canonical({
            "seq": seq, "at": iso_utc(when), "kind": kind, "decision_id": decision_id,
            "override_id": override_id, "agent": agent, "actor": actor, "payload": payload,
            "prev_hash": prev_hash})).hexdigest()
        assert entry_hash(*fields) == documented


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_verify_pages_through_the_log(audited, database_url: str, chunk_size: int):
    _story(*audited)
    assert _verify(database_url, chunk_size).rows_checked == 10
    _sql(database_url, "DELETE FROM audit_log WHERE seq = 9")
    result = _verify(database_url, chunk_size)
    assert (result.first_bad_seq, result.rows_checked) == (10, 8)


def test_an_empty_log_verifies(audited, database_url: str):
    assert _verify(database_url) == VerifyResult(ok=True, rows_checked=0)


# ---- tampering, each way ------------------------------------------------------------------------------


def test_edited_payload_is_named_at_its_row(audited, database_url: str):
    recorder, gate = audited
    _story(recorder, gate)
    (refused,) = [r for r in _rows(database_url) if r.seq == 2]
    outcome = json.loads(refused.payload)["decision"]
    assert outcome != "allow"

    _sql(database_url, "UPDATE audit_log SET payload = replace(payload, :was, :now) WHERE seq = 2",
         was=f'"decision":"{outcome}"', now='"decision":"allow"')

    result = _verify(database_url)
    assert not result.ok and result.first_bad_seq == 2 and result.rows_checked == 1
    assert result.reason == "edited: its hash does not match its content"


def test_edited_actor_column_is_named_at_its_row(audited, database_url: str):
    _story(*audited)
    _sql(database_url, "UPDATE audit_log SET actor = 'mallory' WHERE seq = 4")
    result = _verify(database_url)
    assert (result.first_bad_seq, result.reason) == (4, "edited: its hash does not match its content")


def test_edited_row_with_a_recomputed_hash_is_caught_at_the_next_row(audited, database_url: str):
    _story(*audited)
    row = _rows(database_url)[4]  # seq 5, the grant
    forged = row.payload.replace("600", "86400")
    _sql(database_url, "UPDATE audit_log SET payload = :p, hash = :h WHERE seq = 5",
         p=forged, h=_documented_hash(row, payload=forged))

    result = _verify(database_url)
    assert (result.ok, result.first_bad_seq, result.rows_checked) == (False, 6, 5)
    assert result.reason.startswith("reordered or replaced")


def test_deleted_middle_row_is_named_at_the_row_after_the_gap(audited, database_url: str):
    _story(*audited)
    _sql(database_url, "DELETE FROM audit_log WHERE seq = 4")
    result = _verify(database_url)
    assert (result.ok, result.first_bad_seq, result.rows_checked) == (False, 5, 3)
    assert result.reason == "row(s) deleted before seq 5 (seq 4 missing)"


def test_deleted_last_rows_are_caught_by_the_head(audited, database_url: str):
    _story(*audited)
    _sql(database_url, "DELETE FROM audit_log WHERE seq >= 9")
    result = _verify(database_url)
    assert (result.ok, result.first_bad_seq, result.rows_checked) == (False, 9, 8)
    assert result.reason.startswith("rows deleted at the end")
    assert "ends at seq 8" in result.reason and "says it ends at seq 10" in result.reason


def test_swapped_rows_are_named_at_the_first_moved_row(audited, database_url: str):
    _story(*audited)
    _sql(database_url,
         "UPDATE audit_log SET seq = -1 WHERE seq = 3",
         "UPDATE audit_log SET seq = 3 WHERE seq = 4",
         "UPDATE audit_log SET seq = 4 WHERE seq = -1")
    result = _verify(database_url)
    assert (result.ok, result.first_bad_seq, result.rows_checked) == (False, 3, 2)
    assert result.reason.startswith("reordered or replaced")


def test_replaced_last_row_is_caught_by_the_head(audited, database_url: str):
    _story(*audited)
    last = _rows(database_url)[-1]
    forged = last.payload.replace('"upstream_status":200', '"upstream_status":500')
    assert forged != last.payload
    _sql(database_url, "UPDATE audit_log SET payload = :p, hash = :h WHERE seq = 10",
         p=forged, h=_documented_hash(last, payload=forged))
    result = _verify(database_url)
    assert (result.first_bad_seq, result.rows_checked) == (10, 10)
    assert result.reason == "the last row was replaced: its hash differs from the one in audit_head"


def test_row_appended_outside_cedargate_is_caught_by_the_head(audited, database_url: str):
    _story(*audited)
    last = _rows(database_url)[-1]
    extra = dict(last._mapping, seq=11, kind="approval", actor="mallory", prev_hash=last.hash)
    _sql(database_url,
         "INSERT INTO audit_log"
         " (seq, at, kind, decision_id, override_id, agent, actor, payload, prev_hash, hash) VALUES"
         " (:seq, :at, :kind, :decision_id, :override_id, :agent, :actor, :payload, :prev_hash, :hash)",
         **dict(extra, hash=_documented_hash(last, **extra)))
    result = _verify(database_url)
    assert (result.first_bad_seq, result.rows_checked) == (11, 11)
    assert "added outside cedargate" in result.reason


# ---- the writer keeps the chain ---------------------------------------------------------------------


def test_chain_continues_across_a_restart(audited, database_url: str, engine: Engine):
    recorder, gate = audited
    _story(recorder, gate)
    recorder.close()

    again = Recorder(make_engine(database_url), retry_interval=0.05)
    try:
        again.record_event({"kind": "approval", "override_id": "ovr-3", "actor": "bob"})
        Gate(engine, again).finish(Gate(engine, again).decide(make_call(*LIST)), 200)
        assert again.flush()
    finally:
        again.close()
        again.engine.dispose()
    assert [(r.seq, r.kind) for r in _rows(database_url)][-3:] == [
        (10, "decision"), (11, "approval"), (12, "decision")]
    assert _verify(database_url).rows_checked == 12


def test_cut_off_tail_stays_evident_after_a_restart(audited, database_url: str):
    recorder, gate = audited
    _story(recorder, gate)
    recorder.close()
    _sql(database_url, "DELETE FROM audit_log WHERE seq >= 9")

    again = Recorder(make_engine(database_url), retry_interval=0.05)
    try:
        again.record_event({"kind": "approval", "override_id": "ovr-3", "actor": "bob"})
        assert again.flush() and again.unavailable_reason() is None
    finally:
        again.close()
        again.engine.dispose()
    # The new row follows the head (seq 10), not the last surviving row, so the cut is still a gap.
    result = _verify(database_url)
    assert (result.first_bad_seq, result.reason) == (11, "row(s) deleted before seq 11 (seq 9 to 10 missing)")


def test_failed_batch_is_chained_once_after_recovery(audited, database_url: str):
    recorder, gate = audited
    recorder.record_event({"kind": "override_created", "override_id": "ovr-1"})
    assert recorder.flush()
    _sql(database_url, "DROP TABLE decisions")

    # Both decided before the first failed write: a call decided after it would be refused (and counted
    # as a store refusal), which is not what this test is about.
    listed, stopped = gate.decide(make_call(*LIST)), gate.decide(make_call(*STOP_DEV))
    gate.finish(listed, 200)
    recorder.record_event({"kind": "approval", "override_id": "ovr-1", "actor": "alice"})
    gate.finish(stopped, 200)
    wait_until(recorder.unavailable_reason, "the recorder to report the failure")
    assert not recorder.flush(timeout=0.3)
    assert [r.kind for r in _rows(database_url)] == ["override_created"]  # nothing half-written

    SQLModel.metadata.create_all(make_engine(database_url))
    assert recorder.flush() and recorder.unavailable_reason() is None
    assert [(r.seq, r.kind) for r in _rows(database_url)] == [
        (1, "override_created"), (2, "decision"), (3, "approval"), (4, "decision")]
    assert _verify(database_url).ok


def test_a_log_whose_head_was_deleted_is_not_extended(audited, database_url: str):
    recorder, gate = audited
    _story(recorder, gate)
    recorder.close()
    _sql(database_url, "DELETE FROM audit_head")
    assert _verify(database_url).reason == (
        "the audit_head row is missing, so rows deleted after seq 10 cannot be ruled out")

    again = Recorder(make_engine(database_url), retry_interval=0.05)
    try:
        again.record_event({"kind": "approval", "override_id": "ovr-3", "actor": "bob"})
        wait_until(again.unavailable_reason, "the recorder to refuse the log")
        assert "audit_head is empty" in again.unavailable_reason()
        assert not again.healthy
        assert len(_rows(database_url)) == 10
    finally:
        again.close(timeout=0.3)
        again.engine.dispose()


def test_verify_while_recording_never_reports_tampering(database_url: str):
    recorder = Recorder(make_engine(database_url), batch_size=10, retry_interval=0.05)
    results = []
    try:
        for i in range(2000):
            recorder.record_event({"kind": "grant", "override_id": f"ovr-{i}"})
        done = threading.Event()
        flushed = threading.Thread(target=lambda: (recorder.flush(), done.set()))
        flushed.start()
        while not done.is_set():
            results.append(_verify(database_url, chunk_size=64))
        flushed.join()
    finally:
        recorder.close()
        recorder.engine.dispose()
    assert [r for r in results if not r.ok] == []
    assert _verify(database_url).rows_checked == 2000


# ---- what record_event takes ------------------------------------------------------------------------


def test_record_event_refuses_what_the_log_cannot_hold_at_the_call(audited, database_url: str):
    recorder, _ = audited
    with pytest.raises(ValueError, match=r"unknown audit event keys \['overide_id'\]"):
        recorder.record_event({"kind": "approval", "overide_id": "ovr-1"})
    with pytest.raises(ValueError, match="needs a kind"):
        recorder.record_event({"override_id": "ovr-1"})
    with pytest.raises(TypeError, match="actor must be a string"):
        recorder.record_event({"kind": "approval", "actor": 7})
    with pytest.raises(TypeError, match="not object"):
        recorder.record_event({"kind": "approval", "payload": {"who": object()}})
    recorder.record_event({"kind": "approval", "override_id": "ovr-1"})
    assert recorder.flush() and recorder.healthy
    assert [r.kind for r in _rows(database_url)] == ["approval"]


def test_odd_text_is_recorded_and_chained(audited, database_url: str):
    """A NUL or an undecodable byte in a path, and a lone surrogate in a reviewer's comment."""
    recorder, gate = audited
    verdict = gate.decide(make_call("GET", "http://127.0.0.1:9000/v1/instances/i-\udcff"))
    gate.finish(verdict)
    recorder.record_event({"kind": "denial", "actor": "alice\x00", "payload": {"comment": "no \ud800"}})
    assert recorder.flush(timeout=3) and recorder.unavailable_reason() is None

    eng = create_engine(database_url)
    with eng.connect() as con:
        assert con.execute(text("SELECT path FROM decisions")).scalar_one() == "/v1/instances/i-\\udcff"
    eng.dispose()
    rows = _rows(database_url)
    assert json.loads(rows[0].payload)["path"] == "/v1/instances/i-\\udcff"
    assert rows[1].actor == "alice\\x00"
    assert json.loads(rows[1].payload) == {"comment": "no \ud800"}
    assert _verify(database_url).rows_checked == 2


# ---- cedargate audit verify ---------------------------------------------------------------------------


def test_cli_reports_an_intact_log(audited, database_url: str, capsys):
    _story(*audited)
    assert _audit("verify", "--database-url", database_url) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["audit log OK: 10 rows", f"head: seq 10 hash {_rows(database_url)[-1].hash}"]


def test_cli_names_the_first_tampered_row(audited, database_url: str, capsys):
    _story(*audited)
    _sql(database_url, "DELETE FROM audit_log WHERE seq = 6")
    assert _audit("verify", "--database-url", database_url) == 1
    assert capsys.readouterr().out == (
        "audit log TAMPERED at row seq 7: row(s) deleted before seq 7 (seq 6 missing)\n")


def test_cli_finds_the_store_in_the_state_dir_or_config(
    recorder: Recorder, db_path: Path, tmp_path: Path, capsys
):
    recorder.record_event({"kind": "grant", "override_id": "ovr-1"})
    assert recorder.flush()
    assert _audit("verify", "--state-dir", str(db_path.parent)) == 0
    config = tmp_path / "cedargate.yaml"
    config.write_text(f"state_dir: {db_path.parent}\n", encoding="utf-8")
    assert _audit("verify", "--config", str(config)) == 0
    assert capsys.readouterr().out.count("audit log OK: 1 rows") == 2


def test_cli_refuses_a_missing_store_without_creating_one(tmp_path: Path, capsys):
    assert _audit("verify", "--state-dir", str(tmp_path / "nowhere")) == 2
    err = capsys.readouterr().err
    assert err == (f"cedargate: no decision store at {tmp_path / 'nowhere' / 'cedargate.db'}: "
                   "give --database-url, --state-dir or --config\n")
    assert not (tmp_path / "nowhere").exists()


def test_cli_refuses_a_database_without_an_audit_log(tmp_path: Path, capsys):
    other = tmp_path / "other.db"
    _sql(f"sqlite:///{other}", "CREATE TABLE notes (id INTEGER PRIMARY KEY)")
    assert _audit("verify", "--database-url", f"sqlite:///{other}") == 2
    assert "this database has no audit log" in capsys.readouterr().err


def test_cli_reports_a_bad_config(tmp_path: Path, capsys):
    config = tmp_path / "cedargate.yaml"
    config.write_text("state_dir: [1, 2]\n", encoding="utf-8")
    assert _audit("verify", "--config", str(config)) == 2
    assert "state_dir" in capsys.readouterr().err


def test_cli_output_never_carries_terminal_escapes(tmp_path: Path, capsys):
    state = tmp_path / "state\x1b[2K\r\u202e"
    assert _audit("verify", "--state-dir", str(state)) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err and "\u202e" not in err
    assert "state\\x1b[2K\\r\\u202e" in err
