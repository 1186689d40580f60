"""Fixtures for the addons' tests: a private copy of the bundled policies and a real, started core.

Nothing of cedargate is mocked: the runtime is the one `cedargate run` and the stock-mitmdump enforcer
build, with real cedarpy and a real SQLite record in a temporary directory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from addon_support import AGENT, TOKEN_SHA256

from proxy.runtime import Runtime
from proxy.settings.config import AgentCredential, Settings


@pytest.fixture
def runtime(tmp_path: Path, policy_dir: Path) -> Iterator[Runtime]:
    settings = Settings(
        policy_dir=policy_dir,
        state_dir=tmp_path / "state",
        policy_reload_interval=0,
        agents={AGENT: AgentCredential(token_sha256=TOKEN_SHA256)},
    )
    started = Runtime.start(settings)
    yield started
    started.close()


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
