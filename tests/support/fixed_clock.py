"""`cedargate` on a clock a test sets: `python -m tests.support.fixed_clock CLOCK_FILE run --config ...`.

The same program as the console script (`proxy.cli.main`), except that its gate reads "now" from
CLOCK_FILE (an ISO 8601 instant with its offset) at every decision. So an end-to-end test decides calls
at 21:00 on a Saturday, and moves the clock between calls, without waiting for either, through the real
proxy. Only tests use it (`start_cedargate(..., clock_file=...)`); one process (no `--workers`).
"""

from __future__ import annotations

import sys
from datetime import datetime
from functools import partial
from pathlib import Path

import proxy.runtime
from proxy.cli.main import main


def read_clock(path: Path) -> datetime:
    return datetime.fromisoformat(path.read_text(encoding="utf-8").strip())


if __name__ == "__main__":
    clock_file = Path(sys.argv[1])
    read_clock(clock_file)  # a clock that cannot be read fails the start, not the first call
    # The runtime builds its one Gate by this name: give it the test's clock.
    proxy.runtime.Gate = partial(proxy.runtime.Gate, clock=partial(read_clock, clock_file))  # type: ignore[misc]
    sys.exit(main(sys.argv[2:]))
