"""How much one proxy process takes on at once: its ceilings on held calls and on open connections.

Every held call keeps its agent's connection open, and every connection is an open file; a process out of
files can accept no agent, open no upstream, write no record, and (the API sharing the process) let no
reviewer in, so every held call could only expire. So a process keeps below two ceilings, set in
cedargate.yaml or derived from its open-file limit:

- `max_proxy_connections`: the connections the proxy keeps open at once, agents' and upstream ones
  together (each costs one file). A new agent connection past it is answered `503 proxy-saturated` with
  Retry-After and closed, unread (`proxy.cli.listeners`).
- `max_held_calls`: calls held for review at once. An escalation past it is not held: its override
  request is opened and the agent is answered at once, as if it had sent `Prefer: respond-async`
  (`proxy.oversight.held_calls`).

The derived defaults leave a quarter of the files for the override API (whose idle connections are
capped at a quarter by default, `max_unauthenticated_connections`) and a fiftieth (at least 64) for the
store, the logs, the CA and the workers' pipes; of the rest, the proxy's connections may take all, and
held calls two thirds, so allowed calls still find connections while the held ceiling is reached.

Plain Python: the fronts report connections here; `/status` reads the counts, and the metrics
(`proxy.observe.metrics`: cedargate_proxy_connections, the ceilings, cedargate_saturation_refusals_total)
are kept as they change. Under `cedargate run --workers N` the proxy's counts live in the workers, and the
supervisor, whose API answers `/status`, reads them from the metrics every process shares
(`proxy_processes`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from proxy.observe import metrics

RETRY_AFTER = 5  # seconds an agent refused for saturation is told to wait: held calls end, connections close


def default_ceilings(open_files: int) -> tuple[int, int]:
    """(max_proxy_connections, max_held_calls) for a process with `open_files` files."""
    reserve = open_files // 4 + max(64, open_files // 50)
    connections = max(16, open_files - reserve)
    return connections, max(8, connections * 2 // 3)


@dataclass
class Capacity:
    """A process's ceilings and what it has open now; counted from the event loop and read anywhere."""

    max_connections: int
    max_held: int
    open_files: int
    agents: int = 0  # agents' connections to the proxy, from accept to close
    upstreams: int = 0  # the proxy's connections to upstreams
    refused_connections: int = 0  # agents' connections refused at the ceiling, since start
    not_held: int = 0  # escalations answered at once at the held ceiling, since start
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def of(cls, open_files: int, max_connections: int | None = None, max_held: int | None = None) -> Capacity:
        """The ceilings configured, the unset ones derived from `open_files`."""
        connections, held = default_ceilings(open_files)
        connections = max_connections or connections
        return cls(connections, max_held or min(held, connections), open_files)

    @property
    def connections(self) -> int:
        return self.agents + self.upstreams

    def admit_agent(self) -> bool:
        """Whether a newly accepted agent connection may stay; if so it is counted (`agent_closed` ends it)."""
        with self._lock:
            if self.agents + self.upstreams >= self.max_connections:
                self.refused_connections += 1
                metrics.saturation_refusal("connection")
                return False
            self.agents += 1
        metrics.proxy_connection("agent", 1)
        return True

    def agent_closed(self) -> None:
        with self._lock:
            self.agents = max(0, self.agents - 1)
        metrics.proxy_connection("agent", -1)

    def upstream_opened(self) -> None:
        with self._lock:
            self.upstreams += 1
        metrics.proxy_connection("upstream", 1)

    def upstream_closed(self) -> None:
        with self._lock:
            self.upstreams = max(0, self.upstreams - 1)
        metrics.proxy_connection("upstream", -1)

    def serving(self) -> None:
        """This process serves the proxy now: its ceilings join the metrics' (summed over processes)."""
        metrics.proxy_ceilings(self.max_connections, self.max_held)

    def may_hold(self, held: int) -> bool:
        """Whether one more call may be held, `held` being held now; counts the ones that may not."""
        if held < self.max_held:
            return True
        with self._lock:
            self.not_held += 1
        metrics.saturation_refusal("not_held")
        return False

    def figures(self, held: int, pid: int) -> ProcessLimits:
        """This process's figures, `held` calls being held now."""
        return ProcessLimits(pid, held, self.max_held, self.agents, self.upstreams, self.max_connections,
                             self.refused_connections, self.not_held)

    def saturated_detail(self) -> str:
        return (f"cedargate has {self.connections} of its {self.max_connections} connections open "
                "(max_proxy_connections); this connection was not read and nothing was forwarded. "
                f"Retry after {RETRY_AFTER} seconds.")


@dataclass(frozen=True)
class ProcessLimits:
    """One proxy process's ceilings and what it has open now; `refused_connections` and `not_held` count
    since it started."""

    pid: int
    held: int
    max_held: int
    agents: int
    upstreams: int
    max_connections: int
    refused_connections: int
    not_held: int


@dataclass(frozen=True)
class ProxyLimits:
    """The proxy processes' figures: each live one's, and since cedargate started, the answers given at the
    ceilings by all of them (those of workers that died and were replaced included)."""

    processes: list[ProcessLimits]
    refused_connections: int
    not_held: int


_SAMPLES = ("cedargate_held_calls", "cedargate_held_calls_ceiling", "cedargate_proxy_connections",
            "cedargate_proxy_connections_ceiling", "cedargate_saturation_refusals_total")


def proxy_processes(pids: Iterable[int]) -> ProxyLimits | None:
    """The figures of the proxy workers `pids` (every one started, live or gone), as they record them in
    the metrics shared between processes (`cedargate run --workers N`); None when values are not shared.

    A worker that is gone has no live gauges left (they went with it: `metrics.process_gone`), so it is
    not listed, though its refusals still count in the totals.
    """
    if metrics.shared_directory() is None:
        return None
    found = metrics.by_process(_SAMPLES, pids)
    processes, refused, not_held = [], 0, 0
    for pid, samples in sorted(found.items()):
        refusals = _value(samples, "cedargate_saturation_refusals_total", kind="connection")
        unheld = _value(samples, "cedargate_saturation_refusals_total", kind="not_held")
        refused, not_held = refused + refusals, not_held + unheld
        if ceiling := _value(samples, "cedargate_proxy_connections_ceiling"):
            processes.append(ProcessLimits(
                pid, _value(samples, "cedargate_held_calls"), _value(samples, "cedargate_held_calls_ceiling"),
                _value(samples, "cedargate_proxy_connections", side="agent"),
                _value(samples, "cedargate_proxy_connections", side="upstream"), ceiling, refusals, unheld))
    return ProxyLimits(processes, refused, not_held)


def _value(samples: dict[metrics.SampleKey, float], name: str, **labels: str) -> int:
    return int(samples.get((name, tuple(sorted(labels.items()))), 0))
