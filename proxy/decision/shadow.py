"""Shadow policies: a second policy directory evaluated beside the live set on every decided call, never
enforced (AWS AgentCore's LOG_ONLY mode). An operator sees what a policy change would do to real traffic
before it does anything.

The live decision is taken and recorded first; the gate then hands the verdict here (`observe`), which
only queues what the judgement and its row need (the Cedar request and the live side's outcome, ids and
policies; never the call's raw body): a thread of its own judges the request against the shadow set by
the gate's rules (`proxy.decision.judgement`), and where the outcome differs (allow, deny, escalate,
error) it counts it (`cedargate_shadow_disagreements_total{live,shadow}`) and records a disagreement
(`proxy.record.shadow`) with both sides' determining policies. That thread writes the rows itself, in
transactions of their own, never in the recorder's batches: a live decision's commit never depends on a
shadow row. A row the store refuses is dropped, logged and counted (`lost` under /status `shadow`). So
the agent's call never waits for the shadow set; the queue is bounded, and a call that finds it full is
counted as skipped rather than making anyone wait. Each of these counts is kept in the process and in
the metrics (`cedargate_shadow_calls_total{result}`), whence `/status` sums the workers' under `--workers N`
(`judged_by`): there the workers judge the calls, and the API's process judges none.

The shadow set is loaded and reloaded like the live one (`proxy.cedar.engine.Engine`, polled, taken only
once the files look the same on two polls), but it may be missing or invalid at start, or become so: that
is reported (the log, `/status` under `shadow`) and never touches live decisions; the last good shadow set
stays in use. Its engine reports under its own metrics (`cedargate_shadow_policy_revision`,
`cedargate_shadow_policy_reloads_total`), never as the live set. The shadow judges the request as the live
set's mapping made it (the live manifest).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.cedar.engine import CedarRequest, Engine
from proxy.cedar.policy import PolicyLoadError, directory_signature
from proxy.decision.judgement import Outcome, judge
from proxy.observe import metrics
from proxy.observe.metrics import SHADOW_POLICIES, shadow_calls, shadow_disagreed
from proxy.record.shadow import write_disagreements
from proxy.record.store import Recorder

if TYPE_CHECKING:
    from proxy.decision.gate import Verdict

log = logging.getLogger(__name__)

QUEUE_SIZE = 10_000  # calls waiting for their shadow judgement; past it, calls are skipped and counted
LINGER = 0.02  # seconds between a busy shadow thread's batches
# Disagreements written in one transaction at most; fewer at the end of each batch of calls, so rows are never
# kept waiting for company on a quiet proxy.
ROW_BATCH = 200


@dataclass(frozen=True, slots=True)
class Observed:
    """What the shadow keeps of a recorded verdict until it is judged: the request and the live side of
    the row. Not the verdict itself, which holds the call (its raw body up to max_body_bytes): a lagging
    shadow thread must hold no more than the judgement needs."""

    request: CedarRequest
    decision_id: str
    at: datetime
    agent: str
    action: str
    resource: str
    live: Outcome
    live_policies: tuple[str, ...]
    live_revision: str | None


@dataclass
class ShadowStatus:
    directory: str
    revision: str | None = None
    loaded_at: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    evaluated: int = 0  # by this process since it started
    disagreements: int = 0
    skipped: int = 0  # the queue was full
    lost: int = 0  # disagreements judged but not written: the store refused them (dropped, logged)


class ShadowPolicies:
    def __init__(self, directory: Path, recorder: Recorder | None, *, queue_size: int = QUEUE_SIZE,
                 on_disagreement: Callable[[str, str], None] = shadow_disagreed) -> None:
        self.directory = Path(directory)
        self.recorder = recorder
        self.engine: Engine | None = None
        self._error: tuple[str, datetime] | None = None  # why no shadow set was ever loaded
        self._signature: object = None  # the files last tried while none was loaded
        self._queue: queue.Queue[Observed | None] = queue.Queue(queue_size)
        self.evaluated = self.disagreements = self.skipped = self.lost = 0
        self._rows: list[dict[str, Any]] = []  # disagreements judged, not yet written (shadow thread only)
        self._writing_failed = False  # the last write was refused: say so once, and again on recovery
        # Told (live, shadow) for each disagreement: the metrics count them.
        self.on_disagreement = on_disagreement
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._load()
        self._worker = threading.Thread(target=self._run, name="cedargate-shadow", daemon=True)
        self._worker.start()

    @property
    def status(self) -> ShadowStatus:
        status = ShadowStatus(str(self.directory), evaluated=self.evaluated, disagreements=self.disagreements,
                              skipped=self.skipped, lost=self.lost)
        if self.engine is not None:
            live = self.engine.status
            status.revision, status.loaded_at = live.revision, live.loaded_at
            status.last_error, status.last_error_at = live.last_error, live.last_error_at
        elif self._error is not None:
            status.last_error, status.last_error_at = self._error
        return status

    def observe(self, verdict: Verdict) -> None:
        """Queue a decided call (it has a Cedar request) for its shadow judgement; never blocks."""
        if self.engine is None or verdict.request is None:
            return
        observed = Observed(verdict.request, verdict.decision_id, verdict.at, verdict.call.agent, verdict.action,
                            verdict.resource, verdict.outcome, tuple(p.policy_id for p in verdict.determining),
                            verdict.revision)
        try:
            self._queue.put_nowait(observed)
        except queue.Full:
            self.skipped += 1
            shadow_calls("skipped")

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every call queued so far has been judged and its disagreement written or counted as
        lost (tests, and a clean stop)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._queue.unfinished_tasks

    def watch(self, interval: float) -> None:
        """Poll the directory: load the set once it is valid, then reload it as the live set reloads."""
        if self._watcher or interval <= 0:
            return

        def loop() -> None:
            pending = None
            while not self._stop.wait(interval):
                if self.engine is not None:
                    self.engine.watch(interval)  # the live set's own watcher from here on
                    return
                try:
                    signature = directory_signature(self.directory) if self.directory.is_dir() else ()
                except OSError:
                    signature = ()
                if signature == self._signature or signature != pending:
                    pending = None if signature == self._signature else signature
                    continue
                pending = None
                self._load()

        self._watcher = threading.Thread(target=loop, name="cedargate-shadow-watch", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        if self.engine is not None:
            self.engine.close()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass

    def _load(self) -> None:
        try:
            self._signature = directory_signature(self.directory) if self.directory.is_dir() else ()
            self.engine = Engine(self.directory, reports=SHADOW_POLICIES)
        except (PolicyLoadError, OSError) as exc:
            self._error = (f"{exc}", datetime.now(UTC))
            log.error("shadow policies in %s not loaded (live decisions are unaffected): %s", self.directory, exc)
            return
        self._error = None
        bundle = self.engine.snapshot.bundle
        log.info("shadow policies loaded from %s: revision %s (%d policies), evaluated beside the live set and "
                 "never enforced", self.directory, bundle.revision[:12], len(bundle.policies))

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]  # idle: blocked here, at no cost
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            judged = self.evaluated
            try:
                for observed in batch:
                    if observed is None:
                        return
                    try:
                        self._judge(observed)
                    except Exception:  # one odd call must not end the shadow for every later one
                        log.exception("shadow evaluation failed")
                    if len(self._rows) >= ROW_BATCH:
                        self._write_rows()
            finally:
                # Before task_done: `flush` returns only once the rows judged so far are written (or lost).
                self._write_rows()
                shadow_calls("judged", self.evaluated - judged)  # once a batch: a mapped file's lock each time
                for _ in batch:
                    self._queue.task_done()
            # Let the next calls gather: a busy proxy then wakes this thread LINGER apart, not once per
            # call (each wake-up takes the GIL from the proxy's event loop, which costs more than a
            # cached judgement).
            self._stop.wait(LINGER)

    def _judge(self, observed: Observed) -> None:
        engine = self.engine
        if engine is None:
            return
        snapshot = engine.snapshot
        judged = judge(engine, observed.request, snapshot)
        self.evaluated += 1
        live, shadow = observed.live.value, judged.outcome.value
        if live == shadow:
            return
        self.disagreements += 1
        self.on_disagreement(live, shadow)
        if self.recorder is not None:
            self._rows.append(_row(observed, [p.policy_id for p in judged.determining], snapshot.bundle.revision,
                                   shadow))

    def _write_rows(self) -> None:
        """Write the disagreements judged so far in a transaction of their own; if the store refuses them,
        drop them and count them lost: they enforce nothing, and keeping them would either grow without
        bound or make someone wait."""
        rows, self._rows = self._rows, []
        if not rows or self.recorder is None:
            return
        try:
            write_disagreements(self.recorder.engine, rows)
        except Exception as exc:
            self.lost += len(rows)
            shadow_calls("lost", len(rows))
            if not self._writing_failed:
                log.error("shadow disagreements could not be written and are dropped (live decisions are "
                          "unaffected; /status shadow.lost counts them): %s", _short(exc))
            self._writing_failed = True
            return
        if self._writing_failed:
            log.warning("shadow disagreements are written again (%d lost meanwhile)", self.lost)
        self._writing_failed = False


def judged_by(status: ShadowStatus, pids: Iterable[int]) -> ShadowStatus:
    """`status` (this process's shadow set) with the counts of the processes `pids` instead, summed from
    the metrics they share (`cedargate run --workers N`: the workers judge the calls, the API's process
    none); as it is when values are not shared."""
    if metrics.shared_directory() is None:
        return status
    counts = {"judged": 0, "skipped": 0, "lost": 0, "disagreements": 0}
    for samples in metrics.by_process(("cedargate_shadow_calls_total", "cedargate_shadow_disagreements_total"),
                                      pids).values():
        for (name, labels), value in samples.items():
            key = dict(labels).get("result", "") if name == "cedargate_shadow_calls_total" else "disagreements"
            if key in counts:
                counts[key] += int(value)
    return replace(status, evaluated=counts["judged"], disagreements=counts["disagreements"],
                   skipped=counts["skipped"], lost=counts["lost"])


def _row(observed: Observed, shadow_policies: list[str], shadow_revision: str, shadow: str) -> dict[str, Any]:
    return {
        "decision_id": observed.decision_id, "at": observed.at, "agent": observed.agent,
        "action": observed.action, "resource": observed.resource,
        "live_decision": observed.live.value, "shadow_decision": shadow,
        "live_policies": json.dumps(list(observed.live_policies)),
        "shadow_policies": json.dumps(shadow_policies),
        "live_revision": observed.live_revision, "shadow_revision": shadow_revision,
    }


def _short(exc: BaseException) -> str:
    """The driver's first line (what follows it is SQL, which stays out of the log)."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:300] if lines else ''}"
