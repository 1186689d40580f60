"""Fixtures every test directory shares."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

BUNDLED_POLICIES = Path(__file__).resolve().parents[1] / "policies"


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """A private copy of the bundled policies/ (without its test cases), so a test may edit or break it."""
    target = tmp_path / "policies"
    shutil.copytree(BUNDLED_POLICIES, target, ignore=shutil.ignore_patterns("tests"))
    return target
