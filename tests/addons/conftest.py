"""Fixtures for the addons' tests: the settings of the shared, real, started core (`runtime`).

Nothing of cedargate is mocked: the runtime is the one `cedargate run` and the stock-mitmdump enforcer
build, with real cedarpy and a real SQLite record in a temporary directory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from addon_support import AGENT, TOKEN_SHA256

from proxy.settings.config import AgentCredential


@pytest.fixture
def runtime_settings() -> dict[str, Any]:
    """The shared `runtime` (tests/conftest.py) knows the test agent."""
    return {"agents": {AGENT: AgentCredential(token_sha256=TOKEN_SHA256)}}


@pytest.fixture(autouse=True)
def close_event_loops(monkeypatch) -> Iterator[None]:
    """Close the event loops `taddons.context` creates outside a running loop (mitmproxy's own suite runs
    under pytest-asyncio, which supplies one), so none is left to the garbage collector."""
    created: list[asyncio.AbstractEventLoop] = []
    new_event_loop = asyncio.new_event_loop

    def tracked() -> asyncio.AbstractEventLoop:
        loop = new_event_loop()
        created.append(loop)
        return loop

    monkeypatch.setattr(asyncio, "new_event_loop", tracked)
    yield
    for loop in created:
        loop.close()
