"""The one started core the in-process tests share: a real `Runtime` (real cedarpy, a real SQLite record)
around a private policy directory and state directory, closed afterwards.

The `runtime` fixture (tests/conftest.py) starts one with `started_runtime`; a test module that needs
other settings (agents, approvers, caps) overrides the `runtime_settings` fixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from proxy.runtime import Runtime
from proxy.settings.config import Settings


@contextmanager
def started_runtime(policy_dir: Path, state_dir: Path, **settings: Any) -> Iterator[Runtime]:
    """A started `Runtime` on `policy_dir` and `state_dir`, policies not polled for changes
    (`policy_reload_interval=0`) unless `settings` say otherwise; closed, its database disposed, on exit."""
    started = Runtime.start(Settings(policy_dir=policy_dir, state_dir=state_dir,
                                     **{"policy_reload_interval": 0, **settings}))
    try:
        yield started
    finally:
        started.close()
        started.recorder.engine.dispose()
