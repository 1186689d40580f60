"""Shadow policies: a second policy directory evaluated beside the live set on every decided call, never
enforced (AWS AgentCore's LOG_ONLY mode). An operator sees what a policy change would do to real traffic
before it does anything.

The live decision is taken and recorded first; the gate then hands the verdict here (`observe`), which
only queues it: a thread of its own judges the call's Cedar request against the shadow set by the gate's
rules (`proxy.decision.judgement`), and where the outcome differs (allow, deny, escalate, error) it
records a disagreement (`proxy.record.shadow`) with both sides' determining policies, written with the
decisions around it, and counts it (`cedargate_shadow_disagreements_total{live,shadow}`). So the agent's
call never waits for the shadow set; the queue is bounded, and a call that finds it full is counted as
skipped rather than making anyone wait.

The shadow set is loaded and reloaded like the live one (`proxy.cedar.engine.Engine`, polled, taken only
once the files look the same on two polls), but it may be missing or invalid at start, or become so: that
is reported (the log, `/status` under `shadow`) and never touches live decisions; the last good shadow set
stays in use. The shadow judges the request as the live set's mapping made it (the live manifest).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.cedar.engine import Engine
from proxy.cedar.policy import PolicyLoadError, directory_signature
from proxy.decision.judgement import judge
from proxy.observe.metrics import shadow_disagreed
from proxy.record.shadow import disagreements
from proxy.record.store import Recorder

if TYPE_CHECKING:
    from proxy.decision.gate import Verdict

log = logging.getLogger(__name__)

QUEUE_SIZE = 10_000  # calls waiting for their shadow judgement; past it, calls are skipped and counted
LINGER = 0.02  # seconds between a busy shadow thread's batches


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


class ShadowPolicies:
    def __init__(self, directory: Path, recorder: Recorder | None, *, queue_size: int = QUEUE_SIZE,
                 on_disagreement: Callable[[str, str], None] = shadow_disagreed) -> None:
        self.directory = Path(directory)
        self.recorder = recorder
        self.engine: Engine | None = None
        self._error: tuple[str, datetime] | None = None  # why no shadow set was ever loaded
        self._signature: object = None  # the files last tried while none was loaded
        self._queue: queue.Queue[Verdict | None] = queue.Queue(queue_size)
        self.evaluated = self.disagreements = self.skipped = 0
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
                              skipped=self.skipped)
        if self.engine is not None:
            live = self.engine.status
            status.revision, status.loaded_at = live.revision, live.loaded_at
            status.last_error, status.last_error_at = live.last_error, live.last_error_at
        elif self._error is not None:
            status.last_error, status.last_error_at = self._error
        return status

    def observe(self, verdict: Verdict) -> None:
        """Queue a decided call (it has a Cedar request) for its shadow judgement; never blocks."""
        if self.engine is None:
            return
        try:
            self._queue.put_nowait(verdict)
        except queue.Full:
            self.skipped += 1

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every call queued so far has been judged (tests, and a clean stop)."""
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
            self.engine = Engine(self.directory)
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
            for verdict in batch:
                try:
                    if verdict is None:
                        return
                    self._judge(verdict)
                except Exception:  # one odd call must not end the shadow for every later one
                    log.exception("shadow evaluation failed")
                finally:
                    self._queue.task_done()
            # Let the next calls gather: a busy proxy then wakes this thread LINGER apart, not once per
            # call (each wake-up takes the GIL from the proxy's event loop, which costs more than a
            # cached judgement).
            self._stop.wait(LINGER)

    def _judge(self, verdict: Verdict) -> None:
        engine, request = self.engine, verdict.request
        if engine is None or request is None:
            return
        snapshot = engine.snapshot
        judged = judge(engine, request, snapshot)
        self.evaluated += 1
        live, shadow = verdict.outcome.value, judged.outcome.value
        if live == shadow:
            return
        self.disagreements += 1
        self.on_disagreement(live, shadow)
        if self.recorder is not None:
            self.recorder.record_row(disagreements, _row(verdict, judged.determining, snapshot.bundle.revision,
                                                         shadow))


def _row(verdict: Verdict, shadow_policies: Any, shadow_revision: str, shadow: str) -> dict[str, Any]:
    return {
        "decision_id": verdict.decision_id, "at": verdict.at, "agent": verdict.call.agent,
        "action": verdict.action, "resource": verdict.resource,
        "live_decision": verdict.outcome.value, "shadow_decision": shadow,
        "live_policies": json.dumps([p.policy_id for p in verdict.determining]),
        "shadow_policies": json.dumps([p.policy_id for p in shadow_policies]),
        "live_revision": verdict.revision, "shadow_revision": shadow_revision,
    }
