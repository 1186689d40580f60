"""The schema's history: Alembic migrations, applied at start by `migrate` under a lock.

Every process that opens the record calls `migrate(engine)`: it brings the database to the newest
revision (`versions/`), so a release that adds a column upgrades the databases of the one before.
Two processes starting at once on one new database must not both create the tables, so the upgrade
runs under a lock that only one of them holds; the other then finds the database current. A database
made by cedargate 0.1.0 or earlier (tables from `create_all`, no version table) is checked against the
baseline revision's tables, its indexes brought to the baseline's, and stamped with it, keeping every row.
The revision is kept in a table of cedargate's own, `cedargate_alembic_version`, not Alembic's default
`alembic_version`: a PostgreSQL schema may hold another Alembic-managed application's tables.

Migrations are configured here, from the files shipped in the package: no alembic.ini at run time.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Index, MetaData, create_engine, event, inspect, make_url, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

BASELINE = "0001"
VERSION_TABLE = "cedargate_alembic_version"
_HERE = Path(__file__).parent

# Indexes that releases before the baseline made and the baseline no longer has, by name, with the
# table, columns and uniqueness they had: commit 3146976 replaced the decisions table's single-column
# indexes on agent, host and decision by one on (agent, at).
_OBSOLETE_INDEXES = {
    "ix_decisions_agent": ("decisions", ("agent",), False),
    "ix_decisions_host": ("decisions", ("host",), False),
    "ix_decisions_decision": ("decisions", ("decision",), False),
}

log = logging.getLogger(__name__)


class MigrationError(Exception):
    """The database cannot be brought to this release's schema; the message says why and what to do."""


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = _scripts().get_current_head()
    assert head is not None, "proxy/record/migrations/versions holds no revision"
    return head


def _known_revisions() -> set[str]:
    return {script.revision for script in _scripts().walk_revisions()}


def baseline_schema() -> MetaData:
    """The tables cedargate 0.1.0 made, frozen in the baseline revision."""
    module = _scripts().get_revision(BASELINE).module
    return module.schema()  # type: ignore[no-any-return]


def _context(conn: Connection, **opts: Any) -> MigrationContext:
    return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE, **opts})


_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved = logging.NOTSET


@contextmanager
def _alembic_quiet() -> Iterator[None]:
    """Alembic's INFO lines ("Context impl SQLiteImpl.", "Running upgrade ...") silenced meanwhile.

    Only the "alembic" loggers, and only for as long as this lasts (counted, as the record and the
    override store may migrate from two threads): the caller's logging configuration is otherwise kept.
    """
    global _quiet_depth, _quiet_saved
    logger = logging.getLogger("alembic")
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved = logger.level
            logger.setLevel(max(logging.WARNING, _quiet_saved))
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                logger.setLevel(_quiet_saved)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for a new database or one made before migrations."""
    with _alembic_quiet(), engine.connect() as conn:
        return _context(conn).get_current_revision()


def migrate(engine: Engine) -> str:
    """Bring the database to the newest revision, under the migration lock; returns that revision."""
    with _alembic_quiet():
        return _migrate(engine)


def _migrate(engine: Engine) -> str:
    head = head_revision()
    if current_revision(engine) == head:  # the common start: nothing to do, no lock to wait for
        return head
    with _migration_lock(engine) as conn:
        # Checked again under the lock: another process may have just done the work.
        revision = _context(conn).get_current_revision()
        unversioned = revision is None and _has_baseline_tables(conn)
        conn.rollback()
        if revision is not None and revision not in _known_revisions():
            raise MigrationError(
                f"the database is at schema revision {revision}, which this cedargate does not know (its "
                f"newest is {head}): a newer release upgraded it; run that release or a later one"
            )
        if revision != head:
            # One transaction: adopting and upgrading happen wholly or not at all (on SQLite, see
            # `_transactional_sqlite`).
            with conn.begin():
                reconciled = _adopt_unversioned(conn) if unversioned else []
                command.upgrade(alembic_config(conn), "head")
            if unversioned:
                log.info("adopted %s, made before schema migrations (%s), and brought it to revision %s",
                         _shown(engine), "; ".join(reconciled) or "nothing to change", head)
            else:
                log.info("upgraded %s from %s to revision %s", _shown(engine),
                         f"revision {revision}" if revision else "no revision (a new database)", head)
    return head


def _shown(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection, held by this process alone among those migrating the same database."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            # A session-level advisory lock, held across the upgrade's transaction (PostgreSQL runs DDL
            # in transactions, so the upgrade is all or nothing) and released before the connection
            # goes back to the pool. Keyed by schema: cedargates in two schemas of one database do
            # not wait for each other.
            key = text("SELECT hashtext('cedargate-migrate:' || coalesce(current_schema(), ''))")
            lock_id = conn.execute(key).scalar_one()
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": lock_id})
            conn.commit()
            try:
                yield conn
            finally:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": lock_id})
                conn.commit()
        return
    if engine.dialect.name == "sqlite":
        # A lock file next to the database, taken with flock, rather than BEGIN EXCLUSIVE: an
        # exclusive transaction on a side connection would block the migration's own writes, and on
        # the migrating connection it would not survive Alembic, which (like the sqlite3 module) runs
        # SQLite's DDL outside the transaction it manages. flock is released by the kernel when a
        # process dies, and never touches SQLite's own locks, which are POSIX locks on the database
        # file that closing any descriptor of it would drop: the database file itself is never locked.
        database = make_url(str(engine.url)).database
        if database and database != ":memory:" and not database.startswith("file:"):
            fd = os.open(f"{database}-migrate.lock", os.O_CREAT | os.O_RDWR, 0o600)
            migrating = _transactional_sqlite(engine)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                with migrating.connect() as conn:
                    yield conn
            finally:
                migrating.dispose()
                os.close(fd)  # releases the flock
            return
    # A database only this process can reach (SQLite in memory): nobody to race.
    with engine.connect() as conn:
        yield conn


def _transactional_sqlite(engine: Engine) -> Engine:
    """An engine of its own on the same SQLite file, whose transactions hold DDL too.

    Python's sqlite3 begins a transaction only before an INSERT, UPDATE or DELETE, so each CREATE or
    ALTER of a migration would commit on its own: one that fails part way (a crash, a full disk) would
    leave a half-made schema that the next start refuses. Here the driver begins nothing and
    SQLAlchemy's begin emits BEGIN, SQLAlchemy's documented recipe; on a private engine, so the
    record's own connections keep the driver's usual behaviour.
    """
    migrating = create_engine(engine.url, poolclass=NullPool)

    @event.listens_for(migrating, "connect")
    def _autocommit_driver(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        dbapi_conn.execute("PRAGMA busy_timeout=5000")

    @event.listens_for(migrating, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    return migrating


def _has_baseline_tables(conn: Connection) -> bool:
    existing = set(inspect(conn).get_table_names())
    return bool(existing & set(baseline_schema().tables))


def _adopt_unversioned(conn: Connection) -> list[str]:
    """A database made by 0.1.0's create_all, or an earlier release's: check its tables are the
    baseline's, bring its indexes to the baseline's, then stamp it; returns what it changed, readable.

    A table 0.1.0 made only when its part ran (the override tables) may be missing: it is created.
    Indexes hold no data, so they are reconciled: the baseline's missing ones are created, and those
    that an earlier cedargate made and the baseline no longer has (`_OBSOLETE_INDEXES`, matched by name
    and definition) are dropped. Dropping them is safe, since no query depends on them for its result,
    and wanted: cedargate removed them because each one costs a write on every recorded call, and
    a database left at the baseline exactly is what later revisions are written against. An index
    cedargate never made (or one of the baseline's names with another definition) is not ours to drop:
    it, like any difference in tables or columns, means the database is not what cedargate made, and it
    is left untouched.
    """
    baseline = baseline_schema()
    existing = set(inspect(conn).get_table_names())
    missing = [t for t in baseline.sorted_tables if t.name not in existing]
    diffs = _compare(conn, baseline, only=existing)
    to_create = sorted((d[1] for d in diffs if isinstance(d, tuple) and d[0] == "add_index"),
                       key=lambda index: str(index.name))
    to_drop = sorted((d[1] for d in diffs
                      if isinstance(d, tuple) and d[0] == "remove_index" and _obsolete(d[1])),
                     key=lambda index: str(index.name))
    if len(to_create) + len(to_drop) != len(diffs):
        raise MigrationError(
            f"the database's tables differ from those cedargate 0.1.0 made "
            f"({'; '.join(_describe(d) for d in diffs)}); "
            "it was left unchanged: point cedargate at a new database, or mend these tables"
        )
    for index in to_drop:
        index.drop(conn)
    for index in to_create:
        index.create(conn)
    baseline.create_all(conn, tables=missing)
    command.stamp(alembic_config(conn), BASELINE)
    return ([f"dropped index {i.name}" for i in to_drop] + [f"created index {i.name}" for i in to_create]
            + [f"created table {t.name}" for t in missing])


def _obsolete(index: Index) -> bool:
    columns = tuple(column.name for column in index.columns)
    known = _OBSOLETE_INDEXES.get(str(index.name))
    return known == (index.table.name if index.table is not None else None, columns, bool(index.unique))


def _compare(conn: Connection, metadata: MetaData, *, only: set[str] | None = None) -> list[Any]:
    """What autogenerate would change to make the database match `metadata`."""
    context = _context(conn, compare_type=True)
    wanted = set(metadata.tables) if only is None else set(metadata.tables) & only

    def in_scope(obj, name, type_, reflected, compare_to) -> bool:  # type: ignore[no-untyped-def]
        if type_ == "table":
            return name in wanted or (reflected and name != VERSION_TABLE and only is None)
        table = getattr(obj, "table", None)
        return table is None or table.name in wanted

    context.opts["include_object"] = in_scope
    return list(compare_metadata(context, metadata))


def _differences(conn: Connection, metadata: MetaData, *, only: set[str] | None = None) -> list[str]:
    """What autogenerate would change to make the database match `metadata`, as readable lines."""
    return [_describe(diff) for diff in _compare(conn, metadata, only=only)]


def schema_differences(conn: Connection, metadata: MetaData) -> list[str]:
    """Every difference between the database and `metadata`: what the next migration would have to do."""
    return _differences(conn, metadata)


def _describe(diff: object) -> str:
    if isinstance(diff, list):  # column modifications come grouped
        return ", ".join(_describe(d) for d in diff)
    if isinstance(diff, tuple) and diff:
        kind, *rest = diff
        names = [r if isinstance(r, str) else getattr(r, "name", None) or repr(r)
                 for r in rest if r is not None]
        return f"{kind} {' '.join(names)}"
    return repr(diff)
