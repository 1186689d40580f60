"""Fixtures for the override API's tests: a real, started core around a private copy of the bundled
policies and a temporary SQLite record, and a TestClient on the app built around it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from override_api.main import create_app
from proxy.runtime import Runtime
from proxy.settings.config import ApproverCredential, Settings


@pytest.fixture
def approvers() -> dict[str, ApproverCredential]:
    """The approvers the core knows; none unless a test module says otherwise."""
    return {}


@pytest.fixture
def runtime(tmp_path: Path, policy_dir: Path, approvers: dict[str, ApproverCredential]) -> Iterator[Runtime]:
    settings = Settings(policy_dir=policy_dir, state_dir=tmp_path / "state", policy_reload_interval=0,
                        approvers=approvers)
    started = Runtime.start(settings)
    yield started
    started.close()


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime)) as test_client:
        yield test_client
