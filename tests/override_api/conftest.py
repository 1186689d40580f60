"""Fixtures for the override API's tests: a TestClient on the app built around the shared, real, started
core (`runtime`, tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from override_api.main import create_app
from proxy.runtime import Runtime
from proxy.settings.config import ApproverCredential


@pytest.fixture
def approvers() -> dict[str, ApproverCredential]:
    """The approvers the core knows; none unless a test module says otherwise."""
    return {}


@pytest.fixture
def runtime_settings(approvers: dict[str, ApproverCredential]) -> dict[str, Any]:
    return {"approvers": approvers}


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime)) as test_client:
        yield test_client
