"""Assembling the core from settings: engine, recorder, gate, the override workflow and its jobs (the
notifications' sweep among them), and
directories, started and stopped together.

Both fronts use this: `cedargate run` builds one `Runtime` and hands it to the addons and the API, and
the enforcer addon builds its own when it runs under stock mitmproxy. Whoever composes the program also
starts and stops the core's background jobs (`jobs`) on its event loop.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from proxy.calls.capacity import Capacity
from proxy.calls.connections import open_file_limit
from proxy.calls.mapping import MappingOptions
from proxy.calls.redaction import Redaction
from proxy.cedar.engine import Engine
from proxy.cedar.escalation import parse_duration
from proxy.decision.gate import Gate, Outcome, Verdict
from proxy.decision.shadow import ShadowPolicies
from proxy.notify.notifier import SWEEP_INTERVAL, Notifier, missing_variables
from proxy.oversight.held_calls import Oversight, Resolution
from proxy.oversight.holds import Holds
from proxy.oversight.jobs import Job, Jobs
from proxy.oversight.limits import OverrideLimits
from proxy.oversight.overrides import OverrideStore
from proxy.oversight.reachability import UnreachableEscalation, approver_roles, unreachable_escalations
from proxy.oversight.workflow import OverrideWorkflow
from proxy.record.retention import RequestRetention
from proxy.record.store import Recorder, make_engine
from proxy.settings.agents import AgentDirectory
from proxy.settings.config import ConfigError, Settings
from proxy.vocabulary.printable import printable
from proxy.vocabulary.problems import Problem

log = logging.getLogger(__name__)

# Seconds a thread that wants the GIL waits before the running one is made to let go (Python's default is
# 5 ms). The recorder's writer thread commits the units a reviewer waits on (a vote, a release) while the
# event loop runs the proxy: each of the few times a unit's transaction lets go of the GIL (in SQLite's
# calls) it waited up to 5 ms to get it back from a busy loop. At 10,000 held calls with traffic flowing,
# 0.5 ms took approval to upstream from 139 to 103 ms at p50 and 282 to 196 ms at p99
# (`bench/held_calls.py --trace`, README *Speed*); the loop runs no less, it only yields sooner.
GIL_SWITCH_INTERVAL = 0.0005


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    recorder: Recorder
    gate: Gate
    agents: AgentDirectory
    approvers: AgentDirectory
    overrides: OverrideStore
    holds: Holds
    oversight: Oversight
    workflow: OverrideWorkflow
    jobs: Jobs
    capacity: Capacity
    api_base_url: str = field(default="")
    shadow: ShadowPolicies | None = None  # `shadow_policy_dir`'s set, judged beside the live one
    notifier: Notifier | None = None  # None: no notification routes configured
    # Under `cedargate run --workers N`, the pids of every proxy worker started, live or gone (set by the
    # supervisor): the processes whose figures /status reports, this one proxying nothing. None: this
    # process is the proxy.
    proxy_workers: Callable[[], list[int]] | None = None

    @classmethod
    def start(cls, settings: Settings) -> Runtime:
        """Load and validate everything, or raise; nothing half-started is left running."""
        private_state_dir(settings.state_dir)
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        engine = Engine(settings.policy_dir)
        database = make_engine(settings.effective_database_url)
        recorder = Recorder(database)
        redaction = Redaction.of(settings.secret_query_params)
        limits = OverrideLimits(max_pending_per_agent=settings.max_pending_overrides_per_agent,
                                rate_per_minute=settings.override_rate,
                                max_body_bytes=settings.max_override_body_bytes)
        overrides = OverrideStore(database, grant_ttl=parse_duration(settings.grant_ttl), limits=limits,
                                  redaction=redaction)
        mapping = MappingOptions(context_headers=settings.context_headers, max_body_bytes=settings.max_body_bytes,
                                 time_zone=ZoneInfo(settings.time_zone))
        gate = Gate(engine, recorder, mapping, default_expiry=parse_duration(settings.override_expiry),
                    protected=frozenset({(settings.api.host, settings.api.port)}), redaction=redaction)
        holds = Holds()
        approvers = AgentDirectory(settings.approvers, kind="approver")
        # The chains name a primary reviewer among those who can sign in: one without a token cannot act.
        reviewers, _ = approver_roles(settings.approvers, approvers.agent_ids)
        workflow = OverrideWorkflow(overrides, recorder, holds, gate, reviewers=reviewers)
        runtime = cls(
            settings, engine, recorder, gate, AgentDirectory(settings.agents), approvers,
            overrides, holds, None, workflow,  # type: ignore[arg-type]
            Jobs(workflow, retention=RequestRetention(recorder, parse_duration(settings.cedar_request_retention))),
            # The open-file limit as it is now: `cedargate run` raises it to the hard limit before this.
            Capacity.of(open_file_limit(), settings.max_proxy_connections, settings.max_held_calls),
            api_base_url=f"http://{settings.api.host}:{settings.api.port}",
        )
        runtime.oversight = Oversight(gate, workflow, lambda: runtime.api_base_url, runtime.capacity)
        runtime.notifier = notifier = Notifier(database, settings.notifications, settings.approvers,
                                               lambda: runtime.api_base_url)
        if notifier.active:
            runtime.jobs.add(Job("notifications", SWEEP_INTERVAL, notifier.sweep, stop=notifier.close))
            for missing in missing_variables(settings.notifications):
                log.warning("%s", missing)
        else:
            runtime.notifier = None
        engine.watch(settings.policy_reload_interval)
        if settings.shadow_policy_dir is not None:
            # Never raises: a missing or invalid shadow set is reported, and live decisions go on.
            runtime.shadow = gate.shadow = ShadowPolicies(settings.shadow_policy_dir, recorder)
            runtime.shadow.watch(settings.policy_reload_interval)
        revision = engine.status.revision
        assert revision is not None  # Engine() loads the policies or raises
        log.info(
            "policies loaded from %s: revision %s, %d policies",
            settings.policy_dir, revision[:12], len(engine.snapshot.bundle.policies),
        )
        runtime.warn_unreachable_escalations()
        engine.on_reload.append(lambda _: runtime.warn_unreachable_escalations())
        return runtime

    def warn_unreachable_escalations(self) -> None:
        for unreachable in self.unreachable_escalations():
            log.warning("%s; its calls would wait for nobody (see /status)", unreachable.message)

    def unreachable_escalations(self) -> list[UnreachableEscalation]:
        """The live policies' escalations that none of the approvers able to sign in could grant."""
        signed, idle = approver_roles(self.settings.approvers, self.approvers.agent_ids)
        return unreachable_escalations(self.engine.snapshot.bundle.policies.values(), signed, idle)

    def api_started(self, host: str, port: int) -> None:
        """The API's real address (port 0 picks one): protect it and link to it from answers."""
        self.api_base_url = f"http://{host}:{port}"
        self.gate.protected = frozenset({(host, port)})

    def refuse_holds(self, reason: str) -> None:
        """No reviewer can reach this process (`reason` says why): escalated calls are refused, not held."""
        if not isinstance(self.oversight, WithoutReview):
            self.oversight = WithoutReview(self.oversight, reason)  # type: ignore[assignment]

    def sees_all_overrides(self, roles: frozenset[str]) -> bool:
        """An auditor sees every override request, whether or not their roles can decide it."""
        return self.settings.auditor_role in roles

    def roles_of(self, approver: str) -> frozenset[str]:
        credential = self.settings.approvers.get(approver)
        return frozenset(credential.roles) if credential else frozenset()

    def close(self) -> None:
        self.jobs.stop()
        self.engine.close()
        if self.shadow is not None:
            self.shadow.flush(2.0)  # what it judged is recorded with the rest, as far as it gets
            self.shadow.close()
        self.recorder.close()


class WithoutReview:
    """The override workflow where nobody can review: an escalated call is answered at once, never held.

    Holding it would only make the agent wait for a decision no one can make (under stock mitmproxy, when
    the override API could not start); the answer says so. Everything else is the workflow's own.
    """

    def __init__(self, oversight: Oversight, reason: str) -> None:
        self._oversight = oversight
        self.reason = reason

    async def resolve(self, verdict: Verdict, wait: float, justification: str | None,
                      client_alive: Callable[[], bool]) -> Resolution:
        log.info("refused to hold %s %s for %s: %s", printable(verdict.call.method),
                 self._oversight.gate.shown_url(verdict.call.url), verdict.call.agent, self.reason)
        detail = (f"{verdict.detail} A human could grant an exception, but none can review one now: "
                  f"{self.reason}. The call was not held and no override request was opened; "
                  "ask the operator.")
        return Resolution(False, replace(verdict, problem=Problem.REVIEW_UNAVAILABLE, detail=detail))

    async def settle(self, verdict: Verdict, wait: float, justification: str | None,
                     client_alive: Callable[[], bool]) -> Resolution:
        if verdict.outcome is Outcome.ESCALATE:
            return await self.resolve(verdict, wait, justification, client_alive)
        return await self._oversight.settle(verdict, wait, justification, client_alive)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._oversight, name)


def private_state_dir(state_dir: Path) -> None:
    """Make the state dir, or tighten an existing one, to 0700: it holds the CA key and the record.

    `mkdir(mode=...)` only applies to a directory it creates; one made earlier (by hand, by an older
    release, under a loose umask) keeps its mode unless it is changed here.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        if state_dir.stat().st_mode & 0o777 != 0o700:
            os.chmod(state_dir, 0o700)
    except OSError as exc:
        raise ConfigError(
            f"state dir {state_dir} cannot be made private (mode 0700): {exc.strerror}; it holds the CA key "
            "and the decision record, so run cedargate as the directory's owner or choose another state_dir"
        ) from exc
