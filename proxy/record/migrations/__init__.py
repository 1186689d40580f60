"""The schema's history: Alembic migrations, applied at start by `migrate` under a lock.

Every process that opens the record calls `migrate(engine)`: it brings the database to the newest
revision (`versions/`), so a release that adds a column upgrades the databases of the one before.
Two processes starting at once on one new database must not both create the tables, so the upgrade
runs under a lock that only one of them holds; the other then finds the database current. A database
made by cedargate 0.1.0 (tables from `create_all`, no alembic_version table) is checked against the
baseline revision's tables and stamped with it, keeping every row.

Migrations are configured here, from the files shipped in the package: no alembic.ini at run time.
"""

from __future__ import annotations

import fcntl
import os
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
from sqlalchemy import MetaData, create_engine, event, inspect, make_url, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

BASELINE = "0001"
VERSION_TABLE = "alembic_version"
_HERE = Path(__file__).parent


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


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for a new database or one made before migrations."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine) -> str:
    """Bring the database to the newest revision, under the migration lock; returns that revision."""
    head = head_revision()
    if current_revision(engine) == head:  # the common start: nothing to do, no lock to wait for
        return head
    with _migration_lock(engine) as conn:
        # Checked again under the lock: another process may have just done the work.
        revision = MigrationContext.configure(conn).get_current_revision()
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
                if unversioned:
                    _adopt_unversioned(conn)
                command.upgrade(alembic_config(conn), "head")
    return head


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


def _adopt_unversioned(conn: Connection) -> None:
    """A database made by 0.1.0's create_all: check its tables are the baseline's, then stamp it.

    A table 0.1.0 made only when its part ran (the override tables) may be missing: it is created.
    Anything else that differs means the database is not what cedargate made, and is left untouched.
    """
    baseline = baseline_schema()
    existing = set(inspect(conn).get_table_names())
    missing = [t for t in baseline.sorted_tables if t.name not in existing]
    problems = _differences(conn, baseline, only=existing)
    if problems:
        raise MigrationError(
            f"the database's tables differ from those cedargate 0.1.0 made ({'; '.join(problems)}); "
            "it was left unchanged: point cedargate at a new database, or mend these tables"
        )
    baseline.create_all(conn, tables=missing)
    command.stamp(alembic_config(conn), BASELINE)


def _differences(conn: Connection, metadata: MetaData, *, only: set[str] | None = None) -> list[str]:
    """What autogenerate would change to make the database match `metadata`, as readable lines."""
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    wanted = set(metadata.tables) if only is None else set(metadata.tables) & only

    def in_scope(obj, name, type_, reflected, compare_to) -> bool:  # type: ignore[no-untyped-def]
        if type_ == "table":
            return name in wanted or (reflected and name != VERSION_TABLE and only is None)
        table = getattr(obj, "table", None)
        return table is None or table.name in wanted

    context.opts["include_object"] = in_scope
    return [_describe(diff) for diff in compare_metadata(context, metadata)]


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
