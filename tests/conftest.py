"""Fixtures every test directory shares."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.runtime import Runtime
from tests.support.runtime import started_runtime

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_POLICIES = ROOT / "policies"

# The processes the tests start (`cedargate run`, its workers, the MCP peers) run this tree's code, the
# tree pytest imports: a venv's editable install points at the checkout it was made in, which in another
# worktree is not this one. A PYTHONPATH already set (a benchmark's build under test) is kept.
os.environ.setdefault("PYTHONPATH", str(ROOT))


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """A private copy of the bundled policies/ (without its test cases), so a test may edit or break it."""
    target = tmp_path / "policies"
    shutil.copytree(BUNDLED_POLICIES, target, ignore=shutil.ignore_patterns("tests"))
    return target


@pytest.fixture
def runtime_settings() -> dict[str, Any]:
    """The `Settings` fields the `runtime` fixture starts with beyond its policies and state directory;
    a directory's conftest or a test module overrides this fixture to add agents, approvers or caps."""
    return {}


@pytest.fixture
def runtime(tmp_path: Path, policy_dir: Path, runtime_settings: dict[str, Any]) -> Iterator[Runtime]:
    """A real, started core around `policy_dir` and a temporary SQLite record (tests/support/runtime.py)."""
    with started_runtime(policy_dir, tmp_path / "state", **runtime_settings) as started:
        yield started
