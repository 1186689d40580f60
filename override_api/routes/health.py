"""Liveness and status: is the proxy able to decide calls, and with which policies.

/healthz and /status answer anyone who can reach the API (a load balancer, a monitor). Each proxy
process's own figures, with its pid (`GET /status/processes`), are for auditors only, as /report is: which
worker has the least headroom, and its process id, help whoever means to flood it, and /status's sums
say what a monitor needs.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError

from override_api.deps import CurrentApprover, RuntimeDep
from proxy.calls.capacity import proxy_processes
from proxy.calls.mcp.hints import kept_by
from proxy.cedar.context import time_context
from proxy.decision.shadow import judged_by
from proxy.observe import metrics
from proxy.record.store import utcnow
from proxy.runtime import Runtime

router = APIRouter(tags=["health"])


class PolicyStatus(BaseModel):
    directory: str
    revision: str | None
    loaded_at: datetime | None
    policies: int
    files: list[str]
    last_reload_error: str | None
    last_reload_error_at: datetime | None


class StoreStatus(BaseModel):
    healthy: bool
    pending_records: int
    records_written: int
    last_error: str | None
    journal_segments_waiting: int = Field(
        0, description="journal segments of stopped processes the last look could not replay (their calls went "
                       "upstream and are not in the record yet); 0 when there is no journal")
    journal_rows_set_aside: int = Field(
        0, description="journaled rows of stopped processes the store refused, since this process started: "
                       "NOT in the record, kept in the journal directory's *.rejected files")


class UnreachableEscalationStatus(BaseModel):
    policy_id: str
    file: str
    line: int
    roles: list[str] = Field(description="the roles it escalates to that no approver able to sign in holds")
    why: str
    tiers: list[int] = Field(default_factory=list, description="the tiers of its escalation chain that reach "
                             "nobody (2 and up); empty when its first tier (@escalate) does")


class MetricsStatus(BaseModel):
    path: str = "/metrics"
    shared_between_processes: bool = Field(
        description="every process's values are summed at each scrape (cedargate run); false: this process's only")
    token_required: bool = Field(description="a scrape must send Authorization: Bearer $CEDARGATE_METRICS_TOKEN")


class ShadowStatus(BaseModel):
    directory: str
    revision: str | None = Field(description="the shadow set in use; null while none could be loaded")
    loaded_at: datetime | None
    last_error: str | None = Field(description="why the shadow directory could not be (re)loaded; live "
                                   "decisions are never affected")
    last_error_at: datetime | None
    evaluated: int = Field(description="calls judged by the shadow set since cedargate started (with --workers "
                           "N, by every worker, summed)")
    disagreements: int = Field(description="of those, the calls it decided otherwise than the live set "
                               "(each is a row of shadow_disagreements)")
    skipped: int = Field(description="calls not judged because too many were waiting")
    lost: int = Field(0, description="disagreements judged but not written, because the store refused them "
                      "(dropped and logged; live decisions never wait on them)")


class NotificationChannelStatus(BaseModel):
    pending: int = Field(description="messages owed to this channel, waiting to be delivered")
    delivered: int
    failed: int = Field(description="messages the channel refused for good (kept, not retried)")
    last_delivery_at: datetime | None
    failing_since: datetime | None = Field(description="set while the channel fails: since its first failed try")
    retry_at: datetime | None = Field(description="while failing: when it is tried again")
    last_error: str | None = Field(description="what the last failed try met (hosts only, never a URL or secret)")


class ClockStatus(BaseModel):
    time_zone: str = Field(description="`time_zone` of the config: the wall clock of context.local")
    now: datetime = Field(description="this process's clock (UTC): what context.time says of a call now")
    local: dict[str, Any] = Field(description="context.local for a call decided now (hour, minute, weekday, date)")


class ProxyProcessLimits(BaseModel):
    """One process serving the proxy: its ceilings and what it has open now."""

    pid: int
    held_calls: int = Field(description="calls it holds for review now")
    max_held_calls: int = Field(description="past it, an escalation it gets is answered at once, not held")
    proxy_connections: int = Field(description="agents' and upstream connections it has open now")
    agent_connections: int
    upstream_connections: int
    max_proxy_connections: int = Field(description="past it, a new agent connection to it gets 503 proxy-saturated")
    refused_connections: int = Field(description="agent connections it refused at its ceiling since it started")
    not_held: int = Field(description="escalations it answered at once at its held ceiling since it started")


class LimitsStatus(BaseModel):
    """The proxy's saturation ceilings (proxy.calls.capacity) and the headroom now: of this process, or with
    --workers N of every worker, summed (each worker's own figures: `GET /status/processes`, auditors only)."""

    held_calls: int = Field(description="calls held for review now")
    max_held_calls: int = Field(description="past it, an escalation is answered at once, not held (with "
                                            "--workers N, the workers' ceilings summed: each has its own)")
    proxy_connections: int = Field(description="agents' and upstream connections open now")
    agent_connections: int
    upstream_connections: int
    max_proxy_connections: int = Field(description="past it, a new agent connection gets 503 proxy-saturated "
                                                   "(with --workers N, summed: each worker has its own)")
    refused_connections: int = Field(description="agent connections refused at the ceiling since cedargate "
                                                 "started (with --workers N, by every worker, replaced ones too)")
    not_held: int = Field(description="escalations answered at once at the held ceiling since cedargate started")
    open_file_limit: int = Field(description="this process's; the workers of --workers N inherit it")
    proxy_workers: int = Field(description="the processes serving the proxy: with --workers N, N others "
                                           "than the API's")


class ChainsStatus(BaseModel):
    escalated: int = Field(description="requests waiting whose escalation chain has moved past its first tier")
    steps_due: int = Field(description="tiers reached or reminders due and not yet announced: more than a "
                                       "few for more than a few seconds means the chain job is not keeping up")


class Status(BaseModel):
    status: str
    policies: PolicyStatus
    clock: ClockStatus = Field(description="when policies on the time take a call to be, were it decided now")
    tool_hints: dict[str, int] = Field(
        description="MCP servers whose tool annotations (context.hints) this process keeps, with how many "
                    "tools each; under --workers N (the API's process proxies nothing, each worker keeps its "
                    "own) the most any live worker keeps")
    store: StoreStatus
    shadow: ShadowStatus | None = Field(None, description="the shadow policies (`shadow_policy_dir`), when "
                                        "configured: evaluated beside the live set, never enforced")
    notifications: dict[str, NotificationChannelStatus] = Field(
        description="each notification channel's outbox and health; empty when none is configured")
    limits: LimitsStatus
    escalation_chains: ChainsStatus | None = Field(
        None, description="where the waiting requests stand in their escalation chains; null when the store "
                          "cannot say")
    unreachable_escalations: list[UnreachableEscalationStatus] = Field(
        description="escalating policies no configured approver with a token could grant: their calls would "
                    "be held, and their requests wait, for nobody")
    metrics: MetricsStatus


@router.get("/healthz", summary="Can the proxy decide and record calls?")
def healthz(runtime: RuntimeDep) -> JSONResponse:
    reason = runtime.recorder.unavailable_reason()
    if reason:
        return JSONResponse({"status": "unavailable", "detail": reason}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/status", response_model=Status,
            summary="Live policy revision, reload errors, store health, escalations nobody could grant, "
                    "notification channels")
def status(request: Request, runtime: RuntimeDep) -> Status:
    engine, recorder = runtime.engine, runtime.recorder
    bundle = engine.snapshot.bundle
    return Status(
        status="degraded" if engine.status.last_error or not recorder.healthy else "ok",
        policies=PolicyStatus(
            directory=str(engine.policy_dir),
            revision=engine.status.revision,
            loaded_at=engine.status.loaded_at,
            policies=len(bundle.policies),
            files=list(bundle.files),
            last_reload_error=engine.status.last_error,
            last_reload_error_at=engine.status.last_error_at,
        ),
        store=StoreStatus(
            healthy=recorder.healthy,
            pending_records=recorder.pending,
            records_written=recorder.written,
            last_error=recorder.last_error,
            journal_segments_waiting=recorder.journal_kept,
            journal_rows_set_aside=recorder.journal_rejected,
        ),
        limits=_limits(runtime),
        unreachable_escalations=[UnreachableEscalationStatus.model_validate(u.as_dict())
                                 for u in runtime.unreachable_escalations()],
        metrics=MetricsStatus(shared_between_processes=metrics.shared_directory() is not None,
                              token_required=request.app.state.metrics_token is not None),
        shadow=_shadow(runtime),
        notifications=_notifications(runtime),
        escalation_chains=_chains(runtime),
        clock=_clock(runtime),
        tool_hints=_tool_hints(runtime),
    )


@router.get("/status/processes", response_model=list[ProxyProcessLimits],
            summary="Each process serving the proxy (this one, or with --workers N each live worker): its pid, "
                    "ceilings and load (auditors only)")
def processes(runtime: RuntimeDep, approver: CurrentApprover) -> list[ProxyProcessLimits]:
    if not runtime.sees_all_overrides(approver.roles):
        raise HTTPException(403, detail=f"each process's figures are for approvers holding the auditor role "
                                        f"({runtime.settings.auditor_role}); {approver.id} does not")
    return _processes(runtime)[0]


def _processes(runtime: Runtime) -> tuple[list[ProxyProcessLimits], int, int]:
    """Each proxy process's figures, and the refusals and escalations not held since start (replaced
    workers' included, so not the sum of the live ones')."""
    here = runtime.capacity.figures(runtime.holds.held, os.getpid())
    processes, refused, not_held = [here], here.refused_connections, here.not_held
    # Under --workers N the proxy's figures are the workers', read from the metrics they share.
    if runtime.proxy_workers is not None and (workers := proxy_processes(runtime.proxy_workers())) is not None:
        processes, refused, not_held = workers.processes, workers.refused_connections, workers.not_held
    each = [ProxyProcessLimits(
        pid=p.pid, held_calls=p.held, max_held_calls=p.max_held, proxy_connections=p.agents + p.upstreams,
        agent_connections=p.agents, upstream_connections=p.upstreams, max_proxy_connections=p.max_connections,
        refused_connections=p.refused_connections, not_held=p.not_held) for p in processes]
    return each, refused, not_held


def _limits(runtime: Runtime) -> LimitsStatus:
    each, refused, not_held = _processes(runtime)
    return LimitsStatus(
        held_calls=sum(p.held_calls for p in each), max_held_calls=sum(p.max_held_calls for p in each),
        proxy_connections=sum(p.proxy_connections for p in each),
        agent_connections=sum(p.agent_connections for p in each),
        upstream_connections=sum(p.upstream_connections for p in each),
        max_proxy_connections=sum(p.max_proxy_connections for p in each),
        refused_connections=refused, not_held=not_held, open_file_limit=runtime.capacity.open_files,
        proxy_workers=runtime.settings.workers,
    )


def _shadow(runtime: Runtime) -> ShadowStatus | None:
    if runtime.shadow is None:
        return None
    status = runtime.shadow.status
    if runtime.proxy_workers is not None:  # the workers judge the calls; this process judges none
        status = judged_by(status, runtime.proxy_workers())
    return ShadowStatus.model_validate(asdict(status))


def _tool_hints(runtime: Runtime) -> dict[str, int]:
    # Under --workers N the hints are the workers', read from the metrics they share.
    if runtime.proxy_workers is not None and (kept := kept_by(runtime.proxy_workers())) is not None:
        return kept
    return runtime.gate.hints.known()


def _chains(runtime: Runtime) -> ChainsStatus | None:
    try:
        escalated, due = runtime.overrides.chain_standing(utcnow())
    except SQLAlchemyError:
        return None  # the store's own health says why; /status must still answer
    return ChainsStatus(escalated=escalated, steps_due=due)


def _clock(runtime: Runtime) -> ClockStatus:
    now = runtime.gate.clock()
    local = time_context(now, runtime.gate.mapping.time_zone)["local"]
    return ClockStatus(time_zone=runtime.settings.time_zone, now=now, local=local)


def _notifications(runtime: Runtime) -> dict[str, NotificationChannelStatus]:
    if runtime.notifier is None:
        return {}
    try:
        channels = runtime.notifier.status()
    except SQLAlchemyError:
        return {}  # the store's own health says why; /status must still answer
    return {c.channel: NotificationChannelStatus(
        pending=c.pending, delivered=c.delivered, failed=c.failed, last_delivery_at=c.last_delivery_at,
        failing_since=c.failing_since, retry_at=c.retry_at, last_error=c.last_error) for c in channels}
