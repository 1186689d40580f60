"""Fixtures for the core's unit tests: a private copy of the bundled policies, a real SQLite record in
a temporary file, a gate wired from both, a throw-away PostgreSQL schema, and the override workflow on
either database.

Everything here is a real part: real cedarpy, real files, real databases. Nothing is mocked.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxy_support import PG_CONNINFO, PG_SERVER, pg_unreachable_reason

from proxy.cedar.engine import Engine
from proxy.decision.gate import Gate
from proxy.oversight.holds import Holds
from proxy.oversight.overrides import OverrideStore
from proxy.oversight.workflow import OverrideWorkflow
from proxy.record.store import Recorder, make_engine


@pytest.fixture
def engine(policy_dir: Path) -> Iterator[Engine]:
    eng = Engine(policy_dir)
    yield eng
    eng.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "cedargate.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, db_path: Path) -> str:
    """The record's database, once as a SQLite file and once as a throw-away PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{db_path}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def recorder(db_path: Path) -> Iterator[Recorder]:
    rec = Recorder(make_engine(f"sqlite:///{db_path}"), retry_interval=0.05)
    yield rec
    rec.close(timeout=2)
    rec.engine.dispose()


@pytest.fixture
def gate(engine: Engine, recorder: Recorder) -> Gate:
    return Gate(engine, recorder)


@pytest.fixture
def workflow(database_url: str) -> Iterator[OverrideWorkflow]:
    """The override workflow (its store, recorder and wake-ups) on the record's database, either kind."""
    database = make_engine(database_url)
    recorder = Recorder(database)
    try:
        yield OverrideWorkflow(OverrideStore(database), recorder, Holds())
    finally:
        recorder.close()
        database.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A SQLAlchemy URL whose connections live in a fresh, uniquely named schema, dropped afterwards."""
    problem = pg_unreachable_reason()
    if problem:
        pytest.skip(problem)
    import psycopg

    schema = f"cg_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_CONNINFO, autocommit=True) as con:
        con.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{PG_SERVER}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_CONNINFO, autocommit=True) as con:
            con.execute(f'DROP SCHEMA "{schema}" CASCADE')
