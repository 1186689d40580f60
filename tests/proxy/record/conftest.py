"""Fixtures of the record's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.record.store import Recorder


@pytest.fixture
def closing() -> Iterator[list[Recorder]]:
    """Recorders a test starts, closed (their writers drained and stopped) and disposed of after it."""
    recorders: list[Recorder] = []
    yield recorders
    for recorder in recorders:
        recorder.close(timeout=5)
        recorder.engine.dispose()
