"""Waiting for what a test must observe, rather than sleeping for a guess of how long it takes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 30.0) -> Any:
    """Poll until `predicate()` is truthy and return what it gave; fail naming `what` if it never becomes
    so within `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for: {what}")
        time.sleep(0.02)
    return found
