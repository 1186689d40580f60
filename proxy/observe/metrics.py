"""cedargate's Prometheus metrics: the metric objects, the cheap helpers the hot path calls, the scrape.

Every metric cedargate exports is declared here, once, with prometheus_client, so the names, labels and
help texts are one list (the README's "Metrics" section describes it). Who records what:

- the gate counts each decision once its outcome is final (`count_decision`: outcome and action, and
  apart, once under each determining policy);
- a held call is counted while it waits for a human (`HELD_CALLS`);
- the override workflow observes how long a request waited for its decision (`observe_review`);
- the recorder's writer thread sets its queue's depth and lag (`store_backlog`);
- the live policy engine counts reloads and marks the live revision (`LIVE_POLICIES`); the shadow set's
  engine reports under names of its own (`SHADOW_POLICIES`), so it never reads as live;
- the shadow policies count the calls they decided otherwise than the live set (`shadow_disagreed`), and
  the calls they judged, skipped or lost (`shadow_calls`);
- the proxy's fronts count its connections and the answers given at its ceilings (`proxy_connection`,
  `saturation_refusal`), and each proxy process its ceilings (`proxy_ceilings`);
- the notifications' sweep counts each channel's deliveries and failed tries (`notification_delivered`,
  `notification_failed`; channel names are the operator's, from cedargate.yaml);
- the override requests by status are read from the store at scrape time (`OverrideStatusCollector`,
  registered by the API, the one process that answers `GET /metrics`).

`cedargate run` serves the proxy from one or several processes (`--workers N`), and one scrape must
show them all: it calls `share_between_processes` before anything is recorded, which points
prometheus_client's multiprocess mode at a fresh directory of its own under the state directory
(`claim_directory`: another `cedargate run` on the same state directory keeps its own; exported as
PROMETHEUS_MULTIPROC_DIR, so the workers it then starts inherit it): each process writes its values to
its own memory-mapped files there, and the scrape (`exposition`) sums them; `/status` reads them per
process (`by_process`). Gauges say how to combine
processes (`multiprocess_mode`): what is held or queued now is summed over the live processes, a lag is
their maximum. Without it (`mitmdump -s addons/enforcer.py`, the tests of the core) the values live in
this process and the scrape reads them directly.

The proxy records a decision on every call, so `count_decision` keeps the labelled child of each label
combination it has seen (looking one up through `labels()` costs several times the increment). Label
values are bounded by the policy set: an action is one the schema declares (a call whose action cannot
be named is counted with ""), a policy is one @id. Never a combination of them as one value: forbids an
agent can match at will (on its query, body or tool arguments) would give 2^k series for k of them.
Adding a metric: declare it with `_counter`, `_gauge` or `_histogram` below (so `share_between_processes`
can move it into the directory), prefix its name `cedargate_`, and keep agent-controlled text out of its
labels.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_METRICS: list[MetricWrapperBase] = []  # every metric declared below, in order


def _counter(name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
    metric = Counter(name, documentation, labels, registry=None)
    _METRICS.append(metric)
    return metric


def _gauge(name: str, documentation: str, labels: Sequence[str] = (), *, mode: str) -> Gauge:
    metric = Gauge(name, documentation, labels, registry=None, multiprocess_mode=mode)  # type: ignore[arg-type]
    _METRICS.append(metric)
    return metric


def _histogram(name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]) -> Histogram:
    metric = Histogram(name, documentation, labels, registry=None, buckets=buckets)
    _METRICS.append(metric)
    return metric


DECISIONS = _counter(
    "cedargate_decisions_total",
    "Calls decided, by final outcome (allow, deny, escalate, error: a call refused because its decision could "
    "not be recorded is an error) and Cedar action", ("outcome", "action"))
DECISION_POLICIES = _counter(
    "cedargate_decision_policies_total",
    "Decisions by outcome and determining policy @id: a call two policies determined counts once under each "
    "(a default deny, under none)", ("outcome", "policy"))
HELD_CALLS = _gauge(
    "cedargate_held_calls", "Agent calls held open now, waiting for a human's decision on an override request",
    mode="livesum")
# Human review takes seconds to days: the buckets span a quick look to a day's wait.
REVIEW_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 172800)
REVIEW_LATENCY = _histogram(
    "cedargate_review_latency_seconds",
    "Seconds from an override request's opening to its decision by reviewers, by escalating policy @id and "
    "decision (granted, denied); a request escalated by two policies is observed under each",
    ("policy", "decision"), REVIEW_BUCKETS)
STORE_QUEUE = _gauge(
    "cedargate_store_queue_depth", "Decisions and audit events waiting for the recorder's writer to commit them",
    mode="livesum")
STORE_LAG = _gauge(
    "cedargate_store_lag_seconds",
    "Seconds from the oldest row of the recorder's last committed batch being queued to its commit (0 when "
    "idle): how far the record runs behind the calls", mode="livemax")
POLICY_RELOADS = _counter(
    "cedargate_policy_reloads_total",
    "Policy directory reloads: applied (the new set is live) or refused (invalid; the last good set stays live)",
    ("result",))
SHADOW_DISAGREEMENTS = _counter(
    "cedargate_shadow_disagreements_total",
    "Calls the shadow policies (shadow_policy_dir, never enforced) decided otherwise than the live set, by the "
    "live and the shadow outcome (allow, deny, escalate, error)", ("live", "shadow"))
NOTIFICATION_DELIVERIES = _counter(
    "cedargate_notification_deliveries_total",
    "Notifications a channel took (webhook 2xx, Slack ok, the SMTP server's acceptance), by channel name",
    ("channel",))
NOTIFICATION_FAILURES = _counter(
    "cedargate_notification_failures_total",
    "Tries of a notification that failed, by channel name and outcome: retried (the channel was down or "
    "answered otherwise; the message waits) or refused (refused for good; kept as failed)", ("channel", "outcome"))
POLICY_REVISION = _gauge(
    "cedargate_policy_revision", "1 for the live policy revision (its hash), 0 for one that was live before",
    ("revision",), mode="livemax")
SHADOW_RELOADS = _counter(
    "cedargate_shadow_policy_reloads_total",
    "Shadow policy directory reloads (shadow_policy_dir, never enforced): applied or refused (invalid; the last "
    "good shadow set stays in use)", ("result",))
SHADOW_REVISION = _gauge(
    "cedargate_shadow_policy_revision",
    "1 for the shadow policy revision in use (its hash), 0 for one in use before", ("revision",), mode="livemax")

PROXY_CONNECTIONS = _gauge(
    "cedargate_proxy_connections",
    "Connections the proxy has open now, by side (agent: agents' connections to it; upstream: its own to "
    "upstreams), summed over live processes; with the ceiling, the headroom before 503 proxy-saturated",
    ("side",), mode="livesum")
PROXY_CONNECTIONS_CEILING = _gauge(
    "cedargate_proxy_connections_ceiling",
    "max_proxy_connections of every live proxy process, summed: agents' and upstream connections together",
    mode="livesum")
HELD_CALLS_CEILING = _gauge(
    "cedargate_held_calls_ceiling",
    "max_held_calls of every live proxy process, summed: past it an escalation is answered at once, not held",
    mode="livesum")
SHADOW_CALLS = _counter(
    "cedargate_shadow_calls_total",
    "Calls handed to the shadow policies (shadow_policy_dir, never enforced), by result: judged (the shadow set "
    "decided it), skipped (too many were waiting: not judged), lost (a disagreement judged but not written, the "
    "store refusing it; also counted as judged)", ("result",))
SATURATION_REFUSALS = _counter(
    "cedargate_saturation_refusals_total",
    "Answers given at a ceiling, by kind: connection (a new agent connection answered 503 proxy-saturated), "
    "not_held (an escalation answered at once past max_held_calls)", ("kind",))
TOOL_HINTS = _gauge(
    "cedargate_mcp_tool_hints",
    "Tools of an MCP server whose annotations (context.hints) a proxy process keeps, by the manifest's server "
    "name: the most any live process keeps (each keeps the lists that passed through it)", ("server",),
    mode="livemax")

# The labelled children the hot path increments, by their label values (see the module's docstring).
_decision_children: dict[tuple[str, str], Counter] = {}
_policy_children: dict[tuple[str, str], Counter] = {}
MAX_CACHED_CHILDREN = 10_000  # beyond this many label combinations, children are looked up each time
_switch_lock = threading.Lock()
_directory: Path | None = None  # where this process's values are shared with the others' (multiprocess)
_claimed: int | None = None  # the open directory whose lock says this run still uses it (`claim_directory`)


def count_decision(outcome: str, action: str, policies: tuple[str, ...]) -> None:
    """One decision whose outcome is final. `action` is the Cedar action's id (`get`, `tools/call`) or ""
    when the call could not be named; `policies` the determining policies' @ids, each counted apart."""
    _child(_decision_children, DECISIONS, outcome, action).inc()
    for policy in dict.fromkeys(policies):
        _child(_policy_children, DECISION_POLICIES, outcome, policy).inc()


def _child(cache: dict[tuple[str, str], Counter], metric: Counter, *values: str) -> Counter:
    key = (values[0], values[1])
    child = cache.get(key)
    if child is None:
        child = metric.labels(*values)
        if len(cache) < MAX_CACHED_CHILDREN:
            cache[key] = child
    return child


def observe_review(policies: Iterable[str], decision: str, seconds: float) -> None:
    """An override request decided by its reviewers (`decision`: granted or denied) `seconds` after it
    was opened; counted under each policy that escalated it."""
    for policy in policies:
        REVIEW_LATENCY.labels(policy, decision).observe(max(0.0, seconds))


def store_backlog(depth: int, lag: float) -> None:
    """The recorder's queue now (called by its writer thread, once per batch and when idle)."""
    STORE_QUEUE.set(depth)
    STORE_LAG.set(max(0.0, lag))


def shadow_disagreed(live: str, shadow: str) -> None:
    """A call the shadow policies judged otherwise than the live set (called off the call's path)."""
    SHADOW_DISAGREEMENTS.labels(live, shadow).inc()


def shadow_calls(result: str, count: int = 1) -> None:
    """`count` calls the shadow policies judged ("judged"), skipped or lost (see SHADOW_CALLS); off the
    call's path but for "skipped", counted once per batch."""
    if count:
        SHADOW_CALLS.labels(result).inc(count)


def notification_delivered(channel: str) -> None:
    NOTIFICATION_DELIVERIES.labels(channel).inc()


def notification_failed(channel: str, *, refused: bool) -> None:
    NOTIFICATION_FAILURES.labels(channel, "refused" if refused else "retried").inc()


def policy_reloaded(applied: bool) -> None:
    POLICY_RELOADS.labels("applied" if applied else "refused").inc()


def live_revision(revision: str, previous: str | None = None) -> None:
    """Mark `revision` live and `previous` (if any) no longer. Set to 0 rather than removed: multiprocess
    mode cannot remove a label set, and a scraper sees the change either way."""
    _mark(POLICY_REVISION, revision, previous)


def shadow_policy_reloaded(applied: bool) -> None:
    SHADOW_RELOADS.labels("applied" if applied else "refused").inc()


def shadow_revision(revision: str, previous: str | None = None) -> None:
    _mark(SHADOW_REVISION, revision, previous)


_marked: dict[str, str] = {}  # the revision this process last marked, by gauge name


def _mark(gauge: Gauge, revision: str, previous: str | None) -> None:
    # One set in use per process and role: a new engine's revision also supersedes the one marked before.
    for old in {previous, _marked.get(gauge._name)} - {None, revision}:
        gauge.labels(old).set(0)
    gauge.labels(revision).set(1)
    _marked[gauge._name] = revision


@dataclass(frozen=True)
class PolicyReports:
    """What a policy engine reports of its set: `role` names it in log lines ("policies", "shadow
    policies"); `reloaded(applied)` counts a reload; `revision(new, previous)` marks the set in use."""

    role: str
    reloaded: Callable[[bool], None]
    revision: Callable[[str, str | None], None]


LIVE_POLICIES = PolicyReports("policies", policy_reloaded, live_revision)
SHADOW_POLICIES = PolicyReports("shadow policies", shadow_policy_reloaded, shadow_revision)


# --- several processes ----------------------------------------------------------------------------------


def share_between_processes(directory: Path) -> None:
    """Record into `directory` from now on, in this process and (through PROMETHEUS_MULTIPROC_DIR) in every
    process it starts after this: the directory is emptied first, since files a previous run left would
    be summed into this one's counts.

    Called by `cedargate run` before its core starts. Values recorded in this process before the call are
    dropped (its metrics begin again in the directory); prometheus_client picks its storage when it is
    imported, so the metrics declared above are moved over here.
    """
    global _directory
    with _switch_lock:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
        os.environ[MULTIPROC_ENV] = str(directory)
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        with warnings.catch_warnings():
            # prometheus_client warns that clearing children does not clear what other processes wrote; the
            # children dropped here are this process's, made before it shared anything, so that is moot.
            warnings.simplefilter("ignore", UserWarning)
            for metric in _METRICS:
                _restart(metric)
        _decision_children.clear()
        _policy_children.clear()
        _marked.clear()
        _directory = directory


def claim_directory(parent: Path) -> Path:
    """A new directory under `parent` (`metrics/` in the state directory) for this run's processes to share
    their values in, locked for as long as this process lives; those under `parent` that no live process
    holds (runs that ended) are removed first.

    Several `cedargate run` may share a state directory (its CA, its SQLite record): each must count its
    own processes in its scrape, and a second one starting must not empty the directory of the first,
    whose values would then vanish from its scrape and its /status. Claims and sweeps take turns under
    `parent`'s lock file, so a directory is never swept between being made and being locked.
    """
    global _claimed
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    turn = os.open(parent / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(turn, fcntl.LOCK_EX)
        for run in parent.glob("run-*"):
            if _abandoned(run):
                shutil.rmtree(run, ignore_errors=True)
        directory = Path(tempfile.mkdtemp(prefix="run-", dir=parent))  # 0700
        held = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)  # not inherited by the workers (O_CLOEXEC)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(turn)
    if _claimed is not None:
        os.close(_claimed)
    _claimed = held
    return directory


def _abandoned(run: Path) -> bool:
    """Whether no live process holds `run`'s lock (its `cedargate run` has ended)."""
    try:
        fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def process_gone(pid: int) -> None:
    """A process sharing the directory has exited (a worker that died or stopped): its live gauges (calls
    held, queue depth) no longer count. Its counters still do: what it counted happened."""
    if _directory is not None:
        multiprocess.mark_process_dead(pid, str(_directory))  # type: ignore[no-untyped-call]


def _restart(metric: MetricWrapperBase) -> None:
    # A labelled metric makes its children (and their values) on first use, with the storage of the
    # moment; an unlabelled one made its value when declared, so it is made again.
    if metric._labelnames:
        metric.clear()
    else:
        metric._metric_init()  # type: ignore[no-untyped-call]  # prometheus_client's own re-initialiser


# --- the scrape -------------------------------------------------------------------------------------------


class OverrideStatusCollector(Collector):
    """`cedargate_override_requests{status}`, read from the store when scraped: a count kept in memory would
    be one process's view, and requests outlive processes. `counts` returns every status's count (zeros
    included, so a status that empties is seen to). If the store cannot be read, the family is left out
    and `cedargate_override_requests_readable` says 0."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        readable = GaugeMetricFamily("cedargate_override_requests_readable",
                                     "1 if the override requests could be counted from the store at this scrape")
        try:
            counted = self.counts()
        except Exception as exc:  # the scrape still answers with every other metric
            log.warning("override requests not counted for /metrics: %s", exc)
            readable.add_metric([], 0)
            yield readable
            return
        family = GaugeMetricFamily("cedargate_override_requests",
                                   "Override requests in the store now, by status", labels=["status"])
        for status, count in sorted(counted.items()):
            family.add_metric([status], count)
        readable.add_metric([], 1)
        yield family
        yield readable


class _Declared(Collector):
    """The metrics declared above, as this process holds them (when values are not shared in files)."""

    def collect(self) -> Iterator[Metric]:
        for metric in _METRICS:
            yield from metric.collect()


def exposition(extra: Iterable[Collector] = ()) -> bytes:
    """Every metric in Prometheus's text format: all processes' values (summed from the shared directory,
    or this process's own), then `extra` collectors' (read at this scrape)."""
    registry = CollectorRegistry(auto_describe=False)
    if _directory is not None:
        _SharedValues(registry, str(_directory))  # type: ignore[no-untyped-call]  # prometheus_client: unannotated
    else:
        registry.register(_Declared())
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry)


class _SharedValues(multiprocess.MultiProcessCollector):
    """prometheus_client's collector of the shared directory, reading only the files that hold values."""

    def collect(self) -> Iterable[Metric]:
        return self.merge(_value_files(Path(self._path)), accumulate=True)  # type: ignore[no-any-return,no-untyped-call]


def _value_files(directory: Path) -> list[str]:
    """The value files in `directory` that are not empty. prometheus_client creates a process's file and then
    sizes it, so a reader can find it empty (its process about to write, or killed between the two, which
    leaves it so for good); reading its missing header would fail the whole read, every process's values with
    it (prometheus/client_python#1199), and an empty file holds nothing yet."""
    found = []
    for path in directory.glob("*.db"):
        try:
            if path.stat().st_size:
                found.append(str(path))
        except FileNotFoundError:  # a live gauge's file, removed as its process was marked gone
            continue
    return found


def sample(name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """One sample's value as this process holds it (None if never recorded): for tests and `/status`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Declared())
    return registry.get_sample_value(name, dict(labels or {}))


def shared_directory() -> Path | None:
    return _directory


SampleKey = tuple[str, tuple[tuple[str, str], ...]]  # a sample's name and its labels, sorted


def by_process(names: Iterable[str], pids: Iterable[int]) -> dict[int, dict[SampleKey, float]]:
    """The processes `pids`' own samples of the metrics `names` (sample names, as scraped), by pid, read
    from the shared directory; empty when values are not shared. What `/status` reports of the proxy workers under
    `--workers N`, whose values live in their processes: the directory is the one place the supervisor's
    API sees them. The live gauges of a process that is gone went with it (`process_gone`); its counters
    stay, as what it counted happened."""
    if _directory is None:
        return {}
    wanted, ours = set(names), {str(pid) for pid in pids}
    found: dict[int, dict[SampleKey, float]] = {}
    for path in map(Path, _value_files(_directory)):
        pid = path.stem.rpartition("_")[2]  # counter_PID.db, gauge_livesum_PID.db, ...
        if pid not in ours:
            continue
        try:
            rows = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
        except FileNotFoundError:  # a live gauge's file, removed as its process was marked gone
            continue
        for key, value, _timestamp, _position in rows:
            _metric, name, labels, _help = json.loads(key)
            if name in wanted:
                samples = found.setdefault(int(pid), {})
                label_key = (name, tuple(sorted(labels.items())))
                samples[label_key] = samples.get(label_key, 0.0) + value
    return found


__all__ = [
    "CONTENT_TYPE", "DECISIONS", "DECISION_POLICIES", "HELD_CALLS", "LIVE_POLICIES", "SHADOW_POLICIES",
    "PolicyReports", "NOTIFICATION_DELIVERIES", "NOTIFICATION_FAILURES", "POLICY_RELOADS",
    "POLICY_REVISION", "REVIEW_LATENCY", "STORE_LAG", "STORE_QUEUE", "OverrideStatusCollector", "count_decision",
    "exposition", "live_revision", "notification_delivered", "notification_failed", "observe_review",
    "policy_reloaded", "process_gone", "share_between_processes", "store_backlog",
]


def proxy_ceilings(max_connections: int, max_held: int) -> None:
    """This process serves the proxy with these ceilings (`proxy.calls.capacity`)."""
    PROXY_CONNECTIONS_CEILING.set(max_connections)
    HELD_CALLS_CEILING.set(max_held)


def proxy_connection(side: str, change: int) -> None:
    """An agent's (`side` "agent") or upstream ("upstream") connection opened (+1) or closed (-1)."""
    PROXY_CONNECTIONS.labels(side).inc(change)


def saturation_refusal(kind: str) -> None:
    """An answer given at a ceiling: "connection" or "not_held"."""
    SATURATION_REFUSALS.labels(kind).inc()


def tool_hints_kept(server: str, tools: int) -> None:
    """This process keeps the hints of `tools` tools of the MCP server `server` (the manifest's name)."""
    TOOL_HINTS.labels(server).set(tools)
