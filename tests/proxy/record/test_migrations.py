"""Schema migrations: a database made by cedargate 0.1.0 upgrades in place, the models and the migrations
agree, and processes starting at once on one new database all start. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Column, Integer, MetaData, String, Table, inspect, text
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, SQLModel

from proxy.notify import outbox as notify_outbox
from proxy.oversight.overrides import Ballot, MessageKind, OverrideStore, OverrideVote, can_decide, chain_of
from proxy.oversight.reviewer_sessions import ReviewerSessions
from proxy.record import audit
from proxy.record.migrations import (
    MigrationError,
    alembic_config,
    baseline_schema,
    current_revision,
    head_revision,
    migrate,
    schema_differences,
)
from proxy.record.shadow import write_disagreements
from proxy.record.store import DecisionRecord, Recorder, make_engine

# What cedargate 0.1.0's `SQLModel.metadata.create_all` ran, frozen: the two dialects differ only in
# the names of three types.
RELEASE_0_1_0_DDL = """
CREATE TABLE audit_log (
    seq INTEGER NOT NULL, at {moment} NOT NULL, kind VARCHAR NOT NULL, decision_id VARCHAR,
    override_id VARCHAR, agent VARCHAR, actor VARCHAR, payload VARCHAR NOT NULL,
    prev_hash VARCHAR NOT NULL, hash VARCHAR NOT NULL, PRIMARY KEY (seq));
CREATE INDEX ix_audit_log_override_id ON audit_log (override_id);
CREATE INDEX ix_audit_log_decision_id ON audit_log (decision_id);
CREATE TABLE audit_head (id INTEGER NOT NULL, seq INTEGER NOT NULL, hash VARCHAR NOT NULL, PRIMARY KEY (id));
CREATE TABLE decisions (
    id {serial} NOT NULL, decision_id VARCHAR NOT NULL, at {moment} NOT NULL, agent VARCHAR NOT NULL,
    method VARCHAR NOT NULL, scheme VARCHAR NOT NULL, host VARCHAR NOT NULL, port INTEGER NOT NULL,
    path VARCHAR NOT NULL, action VARCHAR NOT NULL, resource VARCHAR NOT NULL, decision VARCHAR NOT NULL,
    determining_policies VARCHAR NOT NULL, errors VARCHAR NOT NULL, policy_revision VARCHAR,
    upstream_status INTEGER, duration_ms FLOAT, PRIMARY KEY (id));
CREATE UNIQUE INDEX ix_decisions_decision_id ON decisions (decision_id);
CREATE INDEX ix_decisions_agent_at ON decisions (agent, at);
CREATE INDEX ix_decisions_at ON decisions (at);
CREATE TABLE overrides (
    id VARCHAR NOT NULL, fingerprint VARCHAR NOT NULL, status VARCHAR NOT NULL, version INTEGER NOT NULL,
    agent VARCHAR NOT NULL, method VARCHAR NOT NULL, url VARCHAR NOT NULL, host VARCHAR NOT NULL,
    path VARCHAR NOT NULL, action VARCHAR NOT NULL, resource VARCHAR NOT NULL, headers VARCHAR NOT NULL,
    body {blob} NOT NULL, body_sha256 VARCHAR NOT NULL, cedar_request VARCHAR NOT NULL,
    policies VARCHAR NOT NULL, requirements VARCHAR NOT NULL, policy_revision VARCHAR NOT NULL,
    decision_id VARCHAR NOT NULL, justification VARCHAR, created_at {moment} NOT NULL,
    expires_at {moment} NOT NULL, decided_at {moment}, decided_reason VARCHAR,
    grant_expires_at {moment}, released_at {moment}, release_decision_id VARCHAR, PRIMARY KEY (id));
CREATE INDEX ix_overrides_agent ON overrides (agent);
CREATE INDEX ix_overrides_fingerprint ON overrides (fingerprint);
CREATE INDEX ix_overrides_status ON overrides (status);
CREATE INDEX ix_overrides_expires_at ON overrides (expires_at);
CREATE INDEX ix_overrides_action ON overrides (action);
CREATE TABLE override_votes (
    id {serial} NOT NULL, override_id VARCHAR NOT NULL, approver VARCHAR NOT NULL, roles VARCHAR NOT NULL,
    verdict VARCHAR NOT NULL, reason VARCHAR NOT NULL, at {moment} NOT NULL, PRIMARY KEY (id),
    UNIQUE (override_id, approver), FOREIGN KEY(override_id) REFERENCES overrides (id));
CREATE INDEX ix_override_votes_override_id ON override_votes (override_id);
"""
# Releases before commit 3146976 indexed five single columns of the decisions table (decision_id, at,
# agent, host, decision); it kept the first two and replaced the others by one on (agent, at).
OLDER_RELEASE_DDL = RELEASE_0_1_0_DDL.replace(
    "CREATE INDEX ix_decisions_agent_at ON decisions (agent, at);",
    "CREATE INDEX ix_decisions_agent ON decisions (agent);\n"
    "CREATE INDEX ix_decisions_host ON decisions (host);\n"
    "CREATE INDEX ix_decisions_decision ON decisions (decision);",
)
assert OLDER_RELEASE_DDL != RELEASE_0_1_0_DDL
TYPES = {
    "sqlite": {"moment": "DATETIME", "blob": "BLOB", "serial": "INTEGER"},
    "postgresql": {"moment": "TIMESTAMP WITH TIME ZONE", "blob": "BYTEA", "serial": "SERIAL"},
}
AT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.fixture
def database(database_url: str) -> Iterator[SAEngine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def make_0_1_0_database(engine: SAEngine, *, leave_out: tuple[str, ...] = (),
                        release_ddl: str = RELEASE_0_1_0_DDL) -> None:
    """The tables as 0.1.0 made them, less the statements containing any of `leave_out`."""
    ddl = release_ddl.format(**TYPES[engine.dialect.name])
    with engine.begin() as conn:
        for statement in ddl.split(";"):
            if statement.strip() and not any(part in statement for part in leave_out):
                conn.exec_driver_sql(statement)


def add_0_1_0_rows(engine: SAEngine) -> None:
    decision = {
        "decision_id": "d-old", "at": AT, "agent": "ops-bot", "method": "POST", "scheme": "https",
        "host": "api.example", "port": 443, "path": "/v1/instances/i-1/stop", "action": 'Action::"stop"',
        "resource": 'Instance::"i-1"', "decision": "escalate",
        "determining_policies": '["ops-stop-instance"]', "errors": "[]", "policy_revision": "r1",
        "upstream_status": None, "duration_ms": 1.5,
    }
    with engine.begin() as conn:
        conn.execute(DecisionRecord.__table__.insert(), [decision])  # type: ignore[attr-defined]
        event = {"kind": "decision", "at": AT, "decision_id": "d-old", "agent": "ops-bot",
                 "payload": audit.canonical_text({**decision, "at": AT})}
        audit.append(conn, [event])
        conn.execute(
            text("INSERT INTO overrides (id, fingerprint, status, version, agent, method, url, host, path,"
                 " action, resource, headers, body, body_sha256, cedar_request, policies, requirements,"
                 " policy_revision, decision_id, created_at, expires_at)"
                 " VALUES ('ovr-old', 'f1', 'pending', 0, 'ops-bot', 'POST',"
                 " 'https://api.example/v1/instances/i-1/stop', 'api.example',"
                 " '/v1/instances/i-1/stop', 'Action::\"stop\"', 'Instance::\"i-1\"', '{}', :body, 'e3b0',"
                 " '{}', '[]', '[]', 'r1', 'd-old', :at, :at)"),
            {"body": b"{\"force\": true}", "at": AT},
        )
        conn.execute(OverrideVote.__table__.insert(), [  # type: ignore[attr-defined]
            {"override_id": "ovr-old", "approver": "alice", "roles": '["ops"]', "verdict": "approve",
             "reason": "ticket 12", "at": AT}])


def version_rows(engine: SAEngine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT version_num FROM cedargate_alembic_version")).scalars())


def test_a_0_1_0_database_upgrades_in_place_and_keeps_its_rows(database: SAEngine):
    make_0_1_0_database(database)
    add_0_1_0_rows(database)
    assert "cedargate_alembic_version" not in inspect(database).get_table_names()

    # Starting cedargate's record and override store on it, as `cedargate run` does.
    recorder = Recorder(database, retry_interval=0.05)
    overrides = OverrideStore(database)
    try:
        recorder.record({**_new_decision(), "decision_id": "d-new"})
        recorder.record_event({"kind": "approval", "override_id": "ovr-old", "actor": "alice"})
        assert recorder.flush() and recorder.unavailable_reason() is None
        old = overrides.get("ovr-old")
        assert old is not None
        assert (old.status, old.body, old.agent) == ("pending", b'{"force": true}', "ops-bot")
        assert [(v.approver, v.reason) for v in overrides.votes("ovr-old")] == [("alice", "ticket 12")]
    finally:
        recorder.close()
    with database.connect() as conn:
        rows = conn.execute(
            text("SELECT decision_id, decision, duration_ms FROM decisions ORDER BY id")).all()
    assert [tuple(r) for r in rows] == [("d-old", "escalate", 1.5), ("d-new", "allow", None)]
    checked = audit.verify(database)
    assert checked.ok and checked.rows_checked == 3  # 0.1.0's row, then the new decision and the approval
    assert version_rows(database) == [head_revision()]


def index_names(engine: SAEngine, table: str) -> list[str]:
    engine.dispose()
    return sorted(str(index["name"]) for index in inspect(engine).get_indexes(table))


def test_a_database_of_a_release_before_the_decisions_indexes_changed_starts_with_them_replaced(
        database: SAEngine, caplog: pytest.LogCaptureFixture):
    """Such a database differs from the baseline in indexes only: they are brought to the baseline's."""
    make_0_1_0_database(database, release_ddl=OLDER_RELEASE_DDL)
    add_0_1_0_rows(database)
    assert index_names(database, "decisions") == [
        "ix_decisions_agent", "ix_decisions_at", "ix_decisions_decision", "ix_decisions_decision_id",
        "ix_decisions_host"]
    caplog.set_level(logging.INFO)

    recorder = Recorder(database, retry_interval=0.05)
    try:
        old = OverrideStore(database).get("ovr-old")
        started = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
        recorder.record({**_new_decision(), "decision_id": "d-new"})
        assert recorder.flush() and recorder.unavailable_reason() is None
        assert old is not None and (old.status, old.body) == ("pending", b'{"force": true}')
    finally:
        recorder.close()
    assert started == [(
        "proxy.record.migrations", "INFO",
        f"adopted {database.url}, made before schema migrations (dropped index ix_decisions_agent; dropped "
        "index ix_decisions_decision; dropped index ix_decisions_host; created index ix_decisions_agent_at)"
        f", and brought it to revision {head_revision()}")]
    with database.connect() as conn:
        rows = conn.execute(text("SELECT decision_id, decision FROM decisions ORDER BY id")).all()
        assert schema_differences(conn, _models()) == []
    assert [tuple(r) for r in rows] == [("d-old", "escalate"), ("d-new", "allow")]
    checked = audit.verify(database)
    assert checked.ok and checked.rows_checked == 2
    assert version_rows(database) == [head_revision()]
    assert index_names(database, "decisions") == [
        "ix_decisions_agent_at", "ix_decisions_at", "ix_decisions_at_with_request", "ix_decisions_decision_id"]


def test_an_index_cedargate_never_made_is_refused_and_left_alone(database: SAEngine):
    make_0_1_0_database(database, release_ddl=OLDER_RELEASE_DDL)
    with database.begin() as conn:
        conn.exec_driver_sql("CREATE INDEX ix_decisions_path ON decisions (path)")
    indexes_before = index_names(database, "decisions")

    with pytest.raises(MigrationError) as refused:
        migrate(database)
    message = str(refused.value)
    assert message.startswith("the database's tables differ from those cedargate 0.1.0 made (")
    assert "remove_index ix_decisions_path" in message and "add_index ix_decisions_agent_at" in message
    assert index_names(database, "decisions") == indexes_before
    assert "cedargate_alembic_version" not in inspect(database).get_table_names()


def test_a_schema_shared_with_another_alembic_managed_application_is_no_obstacle(database: SAEngine):
    """cedargate keeps its revision in a table of its own: another application's alembic_version, in
    the same PostgreSQL schema, is neither read nor changed."""
    with database.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('a1b2c3')")
    assert current_revision(database) is None

    assert migrate(database) == head_revision()
    assert current_revision(database) == head_revision()
    assert version_rows(database) == [head_revision()]
    with database.connect() as conn:
        assert list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars()) == ["a1b2c3"]


def test_a_0_1_0_database_in_a_shared_schema_is_adopted(database: SAEngine):
    with database.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('a1b2c3')")
    make_0_1_0_database(database)
    assert migrate(database) == head_revision()
    assert version_rows(database) == [head_revision()]


def test_a_start_logs_one_line_when_it_upgrades_and_nothing_from_alembic(
        database: SAEngine, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    alembic_level = logging.getLogger("alembic").level

    migrate(database)
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [(
        "proxy.record.migrations", "INFO",
        f"upgraded {database.url} from no revision (a new database) to revision {head_revision()}")]

    caplog.clear()
    Recorder(database).close()
    OverrideStore(database)
    assert current_revision(database) == head_revision()
    assert caplog.records == []
    # The user's logging configuration is left as it was.
    assert logging.getLogger("alembic").level == alembic_level
    logging.getLogger("alembic.runtime.migration").info("after migrate")
    assert [r.getMessage() for r in caplog.records] == ["after migrate"]


def test_a_0_1_0_database_without_its_override_tables_gets_them(
        database: SAEngine, caplog: pytest.LogCaptureFixture):
    """0.1.0 made the override tables only once its override store started: the record alone is adopted."""
    make_0_1_0_database(database, leave_out=("TABLE overrides", "ON overrides", "override_votes"))
    caplog.set_level(logging.INFO)
    migrate(database)
    assert [r.getMessage() for r in caplog.records] == [
        f"adopted {database.url}, made before schema migrations (created table overrides; created table "
        f"override_votes), and brought it to revision {head_revision()}"]
    assert current_revision(database) == head_revision()
    with database.connect() as conn:
        assert schema_differences(conn, _models()) == []


def test_an_unversioned_database_cedargate_did_not_make_is_refused_and_left_alone(database: SAEngine):
    make_0_1_0_database(database, leave_out=("ix_decisions_agent_at",))
    with database.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE overrides ADD COLUMN reviewer VARCHAR")
    tables_before = sorted(inspect(database).get_table_names())

    with pytest.raises(MigrationError) as refused:
        Recorder(database)
    message = str(refused.value)
    assert message.startswith("the database's tables differ from those cedargate 0.1.0 made (")
    assert "add_index ix_decisions_agent_at" in message and "remove_column overrides reviewer" in message
    assert message.endswith("it was left unchanged: point cedargate at a new database, or mend these tables")
    database.dispose()
    assert sorted(inspect(database).get_table_names()) == tables_before  # no cedargate_alembic_version either


def test_the_baseline_revision_is_exactly_what_0_1_0_made(database: SAEngine):
    make_0_1_0_database(database)
    with database.connect() as conn:
        assert schema_differences(conn, baseline_schema()) == []


def test_the_models_and_the_migrations_agree(database: SAEngine):
    """The next change to a model without its migration fails here."""
    assert migrate(database) == head_revision()
    with database.connect() as conn:
        assert schema_differences(conn, _models()) == []

        # ...and a model that differs is caught.
        changed = MetaData()
        for table in _models().sorted_tables:
            table.to_metadata(changed)
        Table("decisions", changed, Column("reviewer", String()), extend_existing=True)
        Table("scratch", changed, Column("id", Integer, primary_key=True))
        assert sorted(schema_differences(conn, changed)) == [
            "add_column decisions reviewer", "add_table scratch"]


def test_a_database_upgraded_by_a_newer_release_is_refused(database: SAEngine):
    migrate(database)
    with database.begin() as conn:
        conn.execute(text("UPDATE cedargate_alembic_version SET version_num = 'f00d'"))

    with pytest.raises(MigrationError) as refused:
        OverrideStore(database)
    assert str(refused.value) == (
        f"the database is at schema revision f00d, which this cedargate does not know (its newest is "
        f"{head_revision()}): a newer release upgraded it; run that release or a later one")
    assert version_rows(database) == ["f00d"]


def test_an_upgrade_that_fails_part_way_leaves_nothing_and_the_next_start_completes_it(database: SAEngine):
    """A migration is all or nothing on SQLite too (whose driver runs DDL outside transactions unless
    told otherwise): a start that fails part way (here an index name taken by another table; a crash or a
    full disk alike) must not leave tables that the next start then refuses as "not what 0.1.0 made"."""
    with database.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE other_app (a INTEGER)")
        conn.exec_driver_sql("CREATE INDEX ix_overrides_status ON other_app (a)")

    with pytest.raises(Exception, match="ix_overrides_status"):
        migrate(database)
    database.dispose()
    assert sorted(inspect(database).get_table_names()) == ["other_app"]

    with database.begin() as conn:
        conn.exec_driver_sql("DROP TABLE other_app")
    assert migrate(database) == head_revision()
    with database.connect() as conn:
        assert schema_differences(conn, _models()) == []


def test_migrating_a_current_database_changes_nothing(database: SAEngine):
    migrate(database)
    migrate(database)
    assert version_rows(database) == [head_revision()]


START = """
import sys, time
from pathlib import Path
from proxy.oversight.overrides import OverrideStore
from proxy.record.migrations import head_revision
from proxy.record.store import Recorder, make_engine
engine = make_engine(sys.argv[1])
head_revision()  # the revisions read beforehand, so that the starts overlap as closely as they can
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
recorder = Recorder(engine)
OverrideStore(engine)
recorder.close()
print("started")
"""


def test_processes_starting_at_once_on_a_new_database_all_start(database_url: str, tmp_path: Path):
    go = tmp_path / "go"
    starters = [
        subprocess.Popen([sys.executable, "-c", START, database_url, str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    time.sleep(1.0)  # let each import cedargate and wait at the line; they then start together
    go.touch()
    results = [starter.communicate(timeout=120) for starter in starters]
    assert [(s.returncode, out, err) for s, (out, err) in zip(starters, results, strict=True)] == [
        (0, "started\n", "")] * 4
    engine = make_engine(database_url)
    try:
        assert version_rows(engine) == [head_revision()]
        with engine.connect() as conn:
            assert schema_differences(conn, _models()) == []
    finally:
        engine.dispose()


def _models() -> MetaData:
    return SQLModel.metadata


def _new_decision() -> dict:
    return {
        "at": AT, "agent": "ops-bot", "method": "GET", "scheme": "https", "host": "api.example",
        "port": 443, "path": "/v1/instances", "action": 'Action::"list"', "resource": 'Host::"api.example"',
        "decision": "allow", "determining_policies": '["ops-read"]', "errors": "[]", "policy_revision": "r2",
    }


@pytest.mark.parametrize("newer_status, kept, superseded", [
    ("granted", "ovr-new", ("ovr-old", "expired")),  # the newest, granted, stays
    ("pending", "ovr-old", ("ovr-new", "expired")),  # the newest is only pending
])
def test_live_requests_for_one_call_opened_before_the_unique_index_keep_one_live(
        database: SAEngine, newer_status: str, kept: str, superseded: tuple[str, str]):
    """Two processes could open two live requests for one call before revision 0002; upgrading keeps one
    live, a granted one before a pending one (a human's approval is never thrown away), else the newest,
    marks the other ended (saying why), and from then on the database refuses a second live request."""
    make_0_1_0_database(database)
    add_0_1_0_rows(database)  # ovr-old: pending, fingerprint f1
    if newer_status == "pending":
        with database.begin() as conn:
            conn.execute(text("UPDATE overrides SET status = 'granted' WHERE id = 'ovr-old'"))
    later = AT.replace(hour=13)
    with database.begin() as conn:
        for override_id, fingerprint, status, created in [("ovr-new", "f1", newer_status, later),
                                                           ("ovr-done", "f1", "released", later),
                                                           ("ovr-other", "f2", "pending", AT)]:
            conn.execute(text(
                "INSERT INTO overrides SELECT :id, :fp, :status, version, agent, method, url, host, path, action,"
                " resource, headers, body, body_sha256, cedar_request, policies, requirements, policy_revision,"
                " decision_id, justification, :created, expires_at, decided_at, decided_reason,"
                " grant_expires_at, released_at, release_decision_id FROM overrides WHERE id = 'ovr-old'"),
                {"id": override_id, "fp": fingerprint, "status": status, "created": created})

    assert migrate(database) == head_revision()
    with database.connect() as conn:
        rows = {r.id: (r.status, r.decided_reason) for r in conn.execute(
            text("SELECT id, status, decided_reason FROM overrides"))}
        assert schema_differences(conn, _models()) == []
    assert rows[kept] == ("granted", None) and rows["ovr-other"] == ("pending", None)
    assert rows["ovr-done"] == ("released", None)
    loser, ended = superseded
    assert rows[loser][0] == ended and "superseded" in str(rows[loser][1])
    with pytest.raises(Exception, match="ux_overrides_live_fingerprint|UNIQUE constraint failed"):
        with database.begin() as conn:
            conn.execute(text(f"UPDATE overrides SET status = 'pending' WHERE id = '{loser}'"))


def test_a_0002_database_upgrades_to_reviewer_sessions_keeping_its_rows(database: SAEngine):
    """Revision 0003 adds the reviewers' sessions table to a database in use: its overrides, votes and
    audit chain stay as they were, and sessions can be opened at once."""
    make_0_1_0_database(database)
    add_0_1_0_rows(database)
    migrate_to(database, "0002")
    assert "reviewer_sessions" not in inspect(database).get_table_names()

    migrate(database)
    assert version_rows(database) == [head_revision()]
    with database.connect() as conn:
        assert schema_differences(conn, _models()) == []
        rows = [tuple(r) for r in conn.execute(text(
            "SELECT o.id, o.status, v.approver, v.reason FROM overrides o JOIN override_votes v"
            " ON v.override_id = o.id"))]
    assert rows == [("ovr-old", "pending", "alice", "ticket 12")]
    assert audit.verify(database).ok
    sessions = ReviewerSessions(database, idle=60, absolute=3600)
    signed_in = sessions.start("alice", "c" * 64)
    found = sessions.find(signed_in.token, lambda approver, credential: True)
    assert found is not None and found.approver == "alice"


def migrate_to(engine: SAEngine, revision: str) -> None:
    """A 0.1.0 database as the release whose newest revision was `revision` left it."""
    with engine.connect() as conn, conn.begin():
        command.stamp(alembic_config(conn), "0001")
        command.upgrade(alembic_config(conn), revision)


def test_a_database_at_0003_upgrades_to_override_changes_and_keeps_its_requests(database: SAEngine):
    """Revision 0004 adds the changes an approval made: requests stored before it keep every value and
    read as approved as sent (no changes); a changed approval is stored afterwards."""
    make_0_1_0_database(database)
    add_0_1_0_rows(database)
    migrate_to(database, "0003")
    assert current_revision(database) == "0003"
    assert "changes" not in {c["name"] for c in inspect(database).get_columns("overrides")}

    assert migrate(database) == head_revision()
    with database.connect() as conn:
        assert schema_differences(conn, _models()) == []
    overrides = OverrideStore(database)
    old = overrides.get("ovr-old")
    assert old is not None and (old.status, old.body, old.changes) == ("pending", b'{"force": true}', None)
    assert [v.approver for v in overrides.votes("ovr-old")] == ["alice"]
    with database.begin() as conn:
        conn.execute(text("UPDATE overrides SET changes = :changes WHERE id = 'ovr-old'"),
                     {"changes": '{"force": false}'})
    assert overrides.get("ovr-old").changes == '{"force": false}'  # type: ignore[union-attr]


def test_a_0004_database_gains_the_session_and_tool_of_each_decision_keeping_its_rows(database: SAEngine):
    """Revision 0005: decisions recorded before it have no session or tool (NULL); new ones have both."""
    make_0_1_0_database(database)
    add_0_1_0_rows(database)
    migrate_to(database, "0004")

    recorder = Recorder(database, retry_interval=0.05)
    try:
        recorder.record({**_new_decision(), "decision_id": "d-new", "session": "s-1", "tool": "search_issues"})
        assert recorder.flush()
    finally:
        recorder.close()
    with database.connect() as conn:
        rows = conn.execute(text("SELECT decision_id, decision, session, tool FROM decisions ORDER BY id")).all()
        assert schema_differences(conn, _models()) == []
    assert [tuple(r) for r in rows] == [("d-old", "escalate", None, None), ("d-new", "allow", "s-1", "search_issues")]
    assert version_rows(database) == [head_revision()]
    assert OverrideStore(database).get("ovr-old") is not None
    checked = audit.verify(database)
    assert checked.ok and checked.rows_checked == 2


def test_a_database_at_0005_upgrades_to_override_conversations_and_keeps_its_requests(database: SAEngine):
    """Revision 0006 adds the requests' conversations, counts needs_info as live, and marks the ends of
    requests decided before it as told, so an old denial never surfaces on an agent's next call; a
    pending request stays pending, with nothing told and nothing said yet."""
    make_0_1_0_database(database)
    add_0_1_0_rows(database)  # ovr-old: pending, fingerprint f1
    migrate_to(database, "0005")
    with database.begin() as conn:
        conn.execute(text(
            "INSERT INTO overrides SELECT 'ovr-denied', 'f2', 'denied', version, agent, method, url, host, path,"
            " action, resource, headers, body, body_sha256, cedar_request, policies, requirements, policy_revision,"
            " decision_id, justification, created_at, expires_at, :at, 'not now', grant_expires_at, released_at,"
            " release_decision_id, changes FROM overrides WHERE id = 'ovr-old'"), {"at": AT.replace(hour=13)})
    assert "override_messages" not in inspect(database).get_table_names()

    assert migrate(database) == head_revision()
    with database.connect() as conn:
        assert schema_differences(conn, _models()) == []
    overrides = OverrideStore(database)
    pending, denied = overrides.get("ovr-old"), overrides.get("ovr-denied")
    assert pending is not None and (pending.status, pending.outcome_told_at) == ("pending", None)
    assert pending.body == b'{"force": true}' and [v.approver for v in overrides.votes("ovr-old")] == ["alice"]
    assert denied is not None and denied.outcome_told_at is not None
    assert denied.outcome_told_at.replace(tzinfo=None) == AT.replace(hour=13, tzinfo=None)
    assert overrides.messages("ovr-old") == []

    with database.begin() as conn:  # a question asked, as the workflow asks it
        conn.execute(text("UPDATE overrides SET status = 'needs_info' WHERE id = 'ovr-old'"))
        conn.execute(text("INSERT INTO override_messages (override_id, at, by, kind, text)"
                          " VALUES ('ovr-old', :at, 'alice', 'question', 'why?')"), {"at": AT})
    assert [(m.kind, m.text) for m in overrides.messages("ovr-old")] == [("question", "why?")]
    # A request waiting for the agent's answer is its call's one live request.
    with pytest.raises(Exception, match="ux_overrides_live_fingerprint|UNIQUE constraint failed"):
        with database.begin() as conn:
            conn.execute(text("UPDATE overrides SET status = 'pending', fingerprint = 'f1' WHERE id = 'ovr-denied'"))


def test_a_database_at_0006_gains_each_decisions_cedar_request_keeping_its_rows(database: SAEngine):
    """Revision 0007: decisions recorded before it keep no Cedar request (NULL: replay counts them as
    such); new ones keep theirs, and the audit chain still verifies across both."""
    make_0_1_0_database(database)
    add_0_1_0_rows(database)
    migrate_to(database, "0006")
    assert "cedar_request" not in {c["name"] for c in inspect(database).get_columns("decisions")}

    assert migrate(database) == head_revision()
    recorder = Recorder(database, retry_interval=0.05)
    try:
        recorder.record({**_new_decision(), "decision_id": "d-new", "session": None, "tool": None,
                         "cedar_request": '{"action":{"id":"list","type":"Action"}}'})
        assert recorder.flush()
    finally:
        recorder.close()
    with database.connect() as conn:
        rows = conn.execute(text("SELECT decision_id, decision, cedar_request FROM decisions ORDER BY id")).all()
        assert schema_differences(conn, _models()) == []
    assert [tuple(r) for r in rows] == [("d-old", "escalate", None),
                                        ("d-new", "allow", '{"action":{"id":"list","type":"Action"}}')]
    checked = audit.verify(database)
    assert checked.ok and checked.rows_checked == 2


def test_a_database_at_0007_gains_the_shadow_disagreements_table(database: SAEngine):
    """Revision 0008: the calls a shadow policy set decided otherwise than the live one, next to the
    decisions, which keep every row."""
    make_0_1_0_database(database)
    add_0_1_0_rows(database)
    migrate_to(database, "0007")
    assert "shadow_disagreements" not in inspect(database).get_table_names()

    assert migrate(database) == head_revision()
    write_disagreements(database, [{
        "decision_id": "d-old", "at": AT, "agent": "ops-bot", "action": 'Action::"stop"',
        "resource": 'Instance::"i-1"', "live_decision": "escalate", "shadow_decision": "allow",
        "live_policies": '["ops-stop-instance"]', "shadow_policies": "[]", "live_revision": "r1",
        "shadow_revision": "s1"}])
    with database.connect() as conn:
        assert schema_differences(conn, _models()) == []
        rows = conn.execute(text("SELECT s.shadow_decision, d.decision FROM shadow_disagreements s"
                                 " JOIN decisions d ON d.decision_id = s.decision_id")).all()
    assert [tuple(r) for r in rows] == [("allow", "escalate")]
    assert audit.verify(database).ok  # not chained: the log holds what was enforced


def test_a_database_at_0008_gains_the_notification_outbox_starting_at_its_audit_head(database: SAEngine):
    """Revision 0009 adds the notifications' outbox to a database in use: its cursor starts at the audit
    log's head, so channels configured now are not sent the requests of before; new events are."""
    make_0_1_0_database(database)
    add_0_1_0_rows(database)  # one audit row, and ovr-old pending
    migrate_to(database, "0008")
    assert "notification_deliveries" not in inspect(database).get_table_names()

    assert migrate(database) == head_revision()
    with database.connect() as conn:
        assert schema_differences(conn, _models()) == []
        assert conn.execute(text("SELECT id, seq, lease_holder FROM notification_cursor")).all() == [(1, 1, None)]
    outbox = notify_outbox.Outbox(database)
    assert outbox.lease("here", 30)
    with outbox.transaction() as conn:
        assert outbox.cursor(conn) == 1
    assert outbox.status(["ops-hook"])[0].pending == 0
    assert OverrideStore(database).get("ovr-old") is not None and audit.verify(database).ok


def test_a_database_at_0009_upgrades_to_escalation_chains_and_keeps_its_requests(database: SAEngine):
    """Revision 0010 gives each request its chain's standing: one opened before it stands at tier 1,
    started when it was opened, no reminder sent, nothing due (its chain is its one tier), and is decided
    by its requirements' roles as before."""
    make_0_1_0_database(database)
    add_0_1_0_rows(database)  # ovr-old: pending, opened at AT
    migrate_to(database, "0009")
    with database.begin() as conn:
        conn.execute(text("UPDATE overrides SET requirements = :req, expires_at = :until WHERE id = 'ovr-old'"),
                     {"req": '[{"policy_id": "p", "roles": ["ops"], "approvals": 1}]',
                      "until": AT.replace(hour=13)})

    assert migrate(database) == head_revision()
    with database.connect() as conn:
        assert schema_differences(conn, _models()) == []

    overrides = OverrideStore(database)
    old = overrides.get("ovr-old")
    assert old is not None and (old.chain, old.tier, old.reminders_sent, old.next_step_at) == (None, 1, 0, None)
    assert old.tier_started_at is not None and old.tier_started_at.replace(tzinfo=None) == AT.replace(tzinfo=None)
    assert [(t.after, t.roles) for t in chain_of(old).tiers] == [(0, ("ops",))]
    assert can_decide(old, frozenset({"ops"}), AT) and not can_decide(old, frozenset({"security"}), AT)
    assert overrides.chain_due(AT.replace(hour=12, minute=30)) == []  # nothing for the chain job to do
    assert [v.approver for v in overrides.votes("ovr-old")] == ["alice"]


def test_a_database_at_0010_gains_the_index_retention_searches_keeping_its_rows(database: SAEngine):
    """Revision 0011: the decisions still holding a Cedar request, by time, in a partial index of their own;
    a request cleared leaves it."""
    make_0_1_0_database(database)
    add_0_1_0_rows(database)
    migrate_to(database, "0010")
    assert "ix_decisions_at_with_request" not in index_names(database, "decisions")

    assert migrate(database) == head_revision()
    assert "ix_decisions_at_with_request" in index_names(database, "decisions")
    recorder = Recorder(database, retry_interval=0.05)
    try:
        recorder.record({**_new_decision(), "decision_id": "d-new", "session": None, "tool": None,
                         "cedar_request": '{"action":{"id":"list","type":"Action"}}'})
        assert recorder.flush()
    finally:
        recorder.close()
    with database.connect() as conn:
        assert schema_differences(conn, _models()) == []
        rows = conn.execute(text("SELECT decision_id FROM decisions WHERE cedar_request IS NOT NULL")).all()
    assert [tuple(r) for r in rows] == [("d-new",)]
    assert audit.verify(database).ok


LAST_32_BIT = 2**31 - 1


def test_a_database_at_0011_records_past_two_to_the_31_rows_once_upgraded(database: SAEngine):
    """Revision 0012: a log whose seq reached the last 32-bit number goes on appending (on PostgreSQL the
    next append failed before, and so every call was refused); so do the notification outbox and the
    decisions' ids. SQLite's integers were 64-bit already: there the upgrade changes nothing."""
    make_0_1_0_database(database)
    add_0_1_0_rows(database)
    migrate_to(database, "0011")
    # A busy proxy's log: its last row at the largest seq a 32-bit column holds, correctly chained.
    last = {"seq": LAST_32_BIT, "at": AT, "kind": "decision", "decision_id": "d-old", "override_id": None,
            "agent": "ops-bot", "actor": None, "payload": "{}", "prev_hash": audit.GENESIS}
    last["hash"] = audit.entry_hash(**last)  # type: ignore[arg-type]
    with database.begin() as conn:
        conn.execute(text("DELETE FROM audit_log"))
        conn.execute(audit.AuditEntry.__table__.insert(), [last])  # type: ignore[attr-defined]
        conn.execute(text("UPDATE audit_head SET seq = :seq, hash = :hash"), last)
        conn.execute(text("UPDATE notification_cursor SET seq = :seq"), last)
        conn.execute(DecisionRecord.__table__.insert(),  # type: ignore[attr-defined]
                     [{**_new_decision(), "id": LAST_32_BIT, "decision_id": "d-last"}])
        if database.dialect.name == "postgresql":
            conn.execute(text("SELECT setval(pg_get_serial_sequence('decisions', 'id'), :seq)"), last)
    event = {"kind": "decision", "at": AT, "decision_id": "d-next", "agent": "ops-bot", "payload": {}}
    if database.dialect.name == "postgresql":
        with pytest.raises(DBAPIError, match="out of range"), database.begin() as conn:
            audit.append(conn, [event])  # what every call met before the upgrade

    assert migrate(database) == head_revision()
    with database.connect() as conn:
        assert schema_differences(conn, _models()) == []
    with database.begin() as conn:
        assert audit.append(conn, [event])[0] == 2**31  # type: ignore[index]
    recorder = Recorder(database, retry_interval=0.05)
    try:
        recorder.record({**_new_decision(), "decision_id": "d-new", "session": None, "tool": None,
                         "cedar_request": None})
        assert recorder.flush() and recorder.healthy
    finally:
        recorder.close()
    with database.connect() as conn:
        ids = conn.execute(text("SELECT id FROM decisions WHERE decision_id IN ('d-last', 'd-new') ORDER BY id"))
        assert list(ids.scalars()) == [LAST_32_BIT, 2**31]
        assert conn.execute(text("SELECT MAX(seq) FROM audit_log")).scalar() == 2**31 + 1

    outbox = notify_outbox.Outbox(database)
    with outbox.transaction() as conn:
        outbox.advance(conn, LAST_32_BIT, 2**31, [{
            "seq": 2**31, "channel": "ops-hook", "key": "k-past-32-bits", "kind": "opened", "override_id": None,
            "notice": "{}", "state": notify_outbox.DeliveryState.PENDING, "attempts": 0, "created_at": AT}])
        assert outbox.cursor(conn) == 2**31
    [owed] = outbox.due("ops-hook", 10)
    assert owed.seq == 2**31


def test_a_database_at_0012_records_shadow_disagreements_past_two_to_the_31_once_upgraded(database: SAEngine):
    """Revision 0013: the shadow disagreements' id, one per call when the shadow set is stricter than the
    live one, goes on past the last 32-bit number (on PostgreSQL every shadow write failed before, dropped
    and counted while the live decisions went on). Nothing changes on SQLite."""
    make_0_1_0_database(database)
    add_0_1_0_rows(database)
    migrate_to(database, "0012")
    row = {"decision_id": "d-old", "at": AT, "agent": "ops-bot", "action": 'Action::"stop"',
           "resource": 'Instance::"i-1"', "live_decision": "escalate", "shadow_decision": "allow",
           "live_policies": "[]", "shadow_policies": "[]", "live_revision": "r1", "shadow_revision": "s1"}
    with database.begin() as conn:
        conn.execute(text("INSERT INTO shadow_disagreements (id, decision_id, at, agent, action, resource,"
                          " live_decision, shadow_decision, live_policies, shadow_policies, live_revision,"
                          " shadow_revision) VALUES (:id, :decision_id, :at, :agent, :action, :resource,"
                          " :live_decision, :shadow_decision, :live_policies, :shadow_policies,"
                          " :live_revision, :shadow_revision)"), {**row, "id": LAST_32_BIT})
        if database.dialect.name == "postgresql":
            conn.execute(text("SELECT setval(pg_get_serial_sequence('shadow_disagreements', 'id'), :id)"),
                         {"id": LAST_32_BIT})
    if database.dialect.name == "postgresql":
        with pytest.raises(DBAPIError, match="reached maximum value|out of range"):
            write_disagreements(database, [row])  # what every shadow write met before the upgrade

    assert migrate(database) == head_revision()
    with database.connect() as conn:
        assert schema_differences(conn, _models()) == []
    write_disagreements(database, [row])
    with database.connect() as conn:
        ids = conn.execute(text("SELECT id FROM shadow_disagreements ORDER BY id")).scalars()
        assert list(ids) == [LAST_32_BIT, 2**31]


def test_a_database_at_0013_records_votes_and_messages_past_two_to_the_31_once_upgraded(database: SAEngine):
    """Revision 0014: the override votes' and messages' ids go on past the last 32-bit number (on
    PostgreSQL the next vote, and so every grant or denial, failed before, as did every question and
    answer). Nothing changes on SQLite."""
    make_0_1_0_database(database)
    add_0_1_0_rows(database)  # ovr-old, with alice's vote
    migrate_to(database, "0013")
    with database.begin() as conn:
        conn.execute(text("UPDATE override_votes SET id = :id"), {"id": LAST_32_BIT})
        conn.execute(text("INSERT INTO override_messages (id, override_id, at, by, kind, text)"
                          " VALUES (:id, 'ovr-old', :at, 'alice', 'question', 'why?')"), {"id": LAST_32_BIT, "at": AT})
        if database.dialect.name == "postgresql":
            for table in ("override_votes", "override_messages"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), :id)"),
                             {"id": LAST_32_BIT})
    if database.dialect.name == "postgresql":  # what every vote met before the upgrade
        with pytest.raises(DBAPIError, match="reached maximum value|out of range"), database.begin() as conn:
            conn.execute(OverrideVote.__table__.insert(), [  # type: ignore[attr-defined]
                {"override_id": "ovr-old", "approver": "bob", "roles": '["ops"]', "verdict": "approve",
                 "reason": "ok", "at": AT}])

    assert migrate(database) == head_revision()
    with database.connect() as conn:
        assert schema_differences(conn, _models()) == []
    overrides, later = OverrideStore(database), AT.replace(hour=13)
    with Session(database) as session, session.begin():
        overrides.add_vote(session, "ovr-old", "bob", frozenset({"ops"}), Ballot.APPROVE, "ok", later)
        overrides.add_message(session, "ovr-old", "ops-bot", MessageKind.ANSWER, "ticket 12", later)
    with database.connect() as conn:
        for table in ("override_votes", "override_messages"):
            ids = conn.execute(text(f"SELECT id FROM {table} ORDER BY id")).scalars()
            assert list(ids) == [LAST_32_BIT, 2**31], table
    assert [v.approver for v in overrides.votes("ovr-old")] == ["alice", "bob"]
    assert [m.text for m in overrides.messages("ovr-old")] == ["why?", "ticket 12"]


def _uses_override_index(database: SAEngine) -> bool:
    """Whether the database reads the log by override id through `ix_audit_log_override_id` (PostgreSQL
    told not to scan the table, which it would prefer for a few rows)."""
    query = "SELECT seq FROM audit_log WHERE override_id = 'ovr-old'"
    with database.connect() as conn:
        if database.dialect.name == "postgresql":
            conn.exec_driver_sql("SET enable_seqscan = off")
            plan = " ".join(conn.exec_driver_sql(f"EXPLAIN {query}").scalars())
            conn.rollback()
        else:
            plan = " ".join(row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {query}"))
    return "ix_audit_log_override_id" in plan


def test_a_database_at_0014_keeps_only_override_events_in_the_override_index(database: SAEngine):
    """Revision 0015: the audit log's override index leaves out the rows without an override id (every
    call's decision and outcome), and reading the log by override request still goes through it and
    finds the same rows, old and new."""
    make_0_1_0_database(database)
    add_0_1_0_rows(database)
    migrate_to(database, "0014")
    with database.begin() as conn:
        audit.append(conn, [{"kind": "override_created", "override_id": "ovr-old", "decision_id": "d-old",
                             "agent": "ops-bot"}])

    assert migrate(database) == head_revision()
    with database.connect() as conn:
        assert schema_differences(conn, _models()) == []
        if database.dialect.name == "postgresql":
            definition = conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = "
                                           "'ix_audit_log_override_id'")).scalar()
        else:
            definition = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = "
                                           "'ix_audit_log_override_id'")).scalar()
    assert "override_id IS NOT NULL" in str(definition)
    assert _uses_override_index(database)
    recorder = Recorder(database, retry_interval=0.05)
    try:
        recorder.record({**_new_decision(), "decision_id": "d-new"})
        recorder.record_event({"kind": "approval", "override_id": "ovr-old", "actor": "alice"})
        assert recorder.flush()
    finally:
        recorder.close()
    about = audit.entries_about(database, "ovr-old")
    assert [(e.kind, e.decision_id) for e in about] == [
        ("decision", "d-old"), ("override_created", "d-old"), ("approval", None)]
    assert audit.verify(database).ok
