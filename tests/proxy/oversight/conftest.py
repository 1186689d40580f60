"""The override workflow the oversight tests drive: its store, recorder and wake-ups on the record's
database (`database_url`: a SQLite file, and a throw-away PostgreSQL schema)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.oversight.holds import Holds
from proxy.oversight.overrides import OverrideStore
from proxy.oversight.workflow import OverrideWorkflow
from proxy.record.store import Recorder, make_engine


@pytest.fixture
def workflow(database_url: str) -> Iterator[OverrideWorkflow]:
    database = make_engine(database_url)
    recorder = Recorder(database)
    try:
        yield OverrideWorkflow(OverrideStore(database), recorder, Holds())
    finally:
        recorder.close()
        database.dispose()
