"""`cedargate` with a probe of what its held calls leave in memory:
`python -m tests.support.heap_probe PROBE_FILE run --config ...`.

The same program as the console script (`proxy.cli.main`), except that its `HeldHeap` freezes from 4 held
calls (each mark twice the last, settling after 0.2 s), so a test holds a few calls where the real marks
start at 200; and that on SIGUSR1 it runs a full collection, as the collector's own would, and writes
to PROBE_FILE how many of the flows and of the agents' connections (their asyncio transports, which
end in reference cycles) it has made are still alive, with the heap's freezes and hand-backs. One whose
call ended and is still alive after that collection is kept for as long as the process runs. Only tests
use it (`start_cedargate(..., heap_probe=...)`); one process (no `--workers`).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import weakref
from pathlib import Path
from types import FrameType
from typing import Any

from mitmproxy import http
from mitmproxy.proxy import server

import proxy.cli.serve
from proxy.cli.main import main
from proxy.oversight.heap import HeldHeap

flows: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
connections: weakref.WeakSet[Any] = weakref.WeakSet()  # each agent connection's transport
heaps: list[HeldHeap] = []
probes = [0]


class ProbedHeap(HeldHeap):
    def __init__(self) -> None:
        super().__init__(first=4, growth=2.0, thaw=0.25, settle=0.2)
        heaps.append(self)


def tracked_flows(init: Any) -> Any:
    def __init__(self: http.HTTPFlow, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        flows.add(self)

    return __init__


def tracked_connections(init: Any) -> Any:
    def __init__(self: server.LiveConnectionHandler, reader: Any, writer: Any, *args: Any, **kwargs: Any) -> None:
        init(self, reader, writer, *args, **kwargs)
        connections.add(writer.transport)

    return __init__


def probe(path: Path, _signum: int, _frame: FrameType | None) -> None:
    gc.collect()
    probes[0] += 1
    heap = heaps[0] if heaps else None
    written = path.with_suffix(".tmp")
    written.write_text(json.dumps({
        "probe": probes[0], "flows_alive": len(flows), "connections_alive": len(connections),
        "frozen_objects": gc.get_freeze_count(),
        "freezes": heap.freezes if heap else 0, "hand_backs": heap.thaws if heap else 0,
    }))
    os.replace(written, path)


if __name__ == "__main__":
    probe_file = Path(sys.argv[1])
    proxy.cli.serve.HeldHeap = ProbedHeap  # type: ignore[misc]
    http.HTTPFlow.__init__ = tracked_flows(http.HTTPFlow.__init__)  # type: ignore[method-assign]
    server.LiveConnectionHandler.__init__ = tracked_connections(  # type: ignore[method-assign]
        server.LiveConnectionHandler.__init__)
    signal.signal(signal.SIGUSR1, lambda signum, frame: probe(probe_file, signum, frame))
    sys.exit(main(sys.argv[2:]))
