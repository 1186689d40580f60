"""The decision path: one agent call in, one `Verdict` out, and the record of it.

`Gate.decide` never raises and never returns "allow" unless the call mapped cleanly, Cedar allowed it
with no evaluation errors, and the record can take the row. Every other path is a refusal with a
problem type saying why. A call that may go upstream (or into a hold) is put on the record first
(`Gate.record`: its adapter waits for the commit before forwarding, and refuses with `store_unavailable`
if the store cannot take it), and what became of it is added when known (`Gate.outcome`); a refused
call is recorded whole (`Gate.finish`). The verdict keeps the determining policies with their annotations, which is
what a later step needs to turn a denial into an override request.

A denial escalates only if every determining forbid carries `@escalate` and the call would be allowed
with those forbids lifted (see `proxy.cedar.escalation`); otherwise it is a hard deny: `no-permit` when no
permit allows the call even then, `policy-denied` when a forbid without `@escalate` matches.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from proxy.calls.mapping import Call, MappingError, MappingOptions, Reading, UnknownAction, map_call
from proxy.calls.mcp.hints import ToolHints
from proxy.calls.redaction import Redaction
from proxy.cedar.context import MCP_DETAIL
from proxy.cedar.engine import CedarRequest, Engine, Snapshot
from proxy.cedar.escalation import Escalation, escalation_of
from proxy.cedar.manifest import MCP_ACTIONS, TOOL_NAME, McpEndpointSpec
from proxy.cedar.policy import PolicyInfo
from proxy.decision.judgement import Outcome as Outcome  # re-exported: the gate's verdicts say it
from proxy.decision.judgement import judge
from proxy.observe.metrics import count_decision
from proxy.record.store import Recorder, utcnow
from proxy.vocabulary.canonical import canonical_text
from proxy.vocabulary.hosts import canonical_host, is_local
from proxy.vocabulary.printable import printable
from proxy.vocabulary.problems import Problem, problem_document

if TYPE_CHECKING:
    from proxy.decision.shadow import ShadowPolicies
    from proxy.decision.upstream import UpstreamFailure

log = logging.getLogger(__name__)

STORE_RETRY_AFTER = 5  # seconds an agent refused for store trouble is told to wait before retrying


class _RandomIds:
    """Version 4 UUIDs as text, from the OS's random source read 4 KiB at a time.

    `str(uuid.uuid4())` makes one getrandom system call per id: under load it was 4% of the event loop's
    samples, a call the kernel often preempts the loop at. The bytes are the same as uuid4's, only read 256
    ids at a time; a forked child reads a pool of its own, so no two processes give the same ids.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._pool, self._at = b"", 0

    def __call__(self) -> str:
        with self._lock:
            if self._at >= len(self._pool):
                self._pool, self._at = os.urandom(4096), 0
            raw = bytearray(self._pool[self._at:self._at + 16])
            self._at += 16
        raw[6] = raw[6] & 0x0F | 0x40  # version 4, as uuid.UUID(bytes=..., version=4) sets it
        raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
        text = raw.hex()
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


new_decision_id = _RandomIds()  # a decision's id: random, unique across calls, processes and restarts


@dataclass(frozen=True)
class Verdict:
    decision_id: str
    outcome: Outcome
    call: Call
    at: datetime
    started: float
    request: CedarRequest | None = None
    determining: tuple[PolicyInfo, ...] = ()
    errors: tuple[str, ...] = ()
    revision: str | None = None
    problem: Problem | None = None
    status: int = 200
    detail: str = ""
    extra_headers: dict[str, str] = field(default_factory=dict)
    escalation: Escalation | None = None
    # The permits that allow the call once its escalatable forbids are lifted: what a grant releases under.
    beneath: tuple[PolicyInfo, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # more problem members, e.g. the override id
    # What an override for this MCP message binds to (`Message.binding`), from the one parse of its body;
    # None for other calls, or where the call was mapped without a reading of it.
    binding: bytes | None = None

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW

    @property
    def action(self) -> str:
        return f'Action::"{self.request.action[1]}"' if self.request else ""

    @property
    def resource(self) -> str:
        return f'{self.request.resource[0]}::"{self.request.resource[1]}"' if self.request else ""

    def problem_body(self) -> dict[str, Any]:
        """RFC 9457 problem details for a refused call."""
        assert self.problem is not None
        return {
            **problem_document(self.problem, self.status, self.detail),
            "decision_id": self.decision_id,
            "policies": [{"id": p.policy_id, "effect": p.effect, "reason": p.reason} for p in self.determining],
            "errors": list(self.errors),
            "policy_revision": self.revision,
            "agent": self.call.agent,
            "action": self.action or None,
            "resource": self.resource or None,
            **self.extra,
        }

    def problem_json(self) -> bytes:
        return json.dumps(self.problem_body()).encode()


class Gate:
    def __init__(
        self, engine: Engine, recorder: Recorder | None, mapping: MappingOptions | None = None, *,
        default_expiry: int = 3600, protected: frozenset[tuple[str, int]] = frozenset(),
        redaction: Redaction = Redaction(), clock: Callable[[], datetime] = utcnow,
        hints: ToolHints | None = None,
    ) -> None:
        self.engine = engine
        # When a call is decided: its record's `at` and its `context.time` (tests give a fixed clock).
        self.clock = clock
        # What MCP servers' tool lists said of their tools (`observe_tools`), for `context.hints`.
        self.hints = hints or ToolHints()
        self.recorder = recorder
        self.mapping = mapping or MappingOptions()
        self.redaction = redaction  # query secrets, cut out of what is recorded and logged
        self.default_expiry = default_expiry
        # (host, port) of cedargate's own API: an agent must never reach it through the proxy.
        self.protected = protected
        # Policies judged beside the live set once a verdict is on the record, never enforced.
        self.shadow: ShadowPolicies | None = None
        # `record`ed verdicts not yet counted in the metrics (their commit, or refusal, still to come).
        self._uncounted: dict[str, Verdict] = {}

    def decide(self, call: Call, reading: Reading | None = None, snapshot: Snapshot | None = None) -> Verdict:
        """The verdict on one call (one message of a batch: see `proxy.decision.decisions.decide_call`).

        `reading` is what was read of the call before (its MCP endpoint and messages), under `snapshot`,
        the policy revision to decide it by; without them the call is read here, under the current one.
        """
        started = time.perf_counter()
        base: dict[str, Any] = dict(decision_id=new_decision_id(), call=call, at=self.clock(), started=started)
        try:
            return self._decide(call, base, reading, self.engine.snapshot if snapshot is None else snapshot)
        except Exception as exc:  # anything unforeseen refuses the call; it never lets it through
            log.exception("decision failed for %s %s", printable(call.method), self.shown_url(call.url))
            return Verdict(
                **base, outcome=Outcome.ERROR, problem=Problem.EVALUATION_ERROR, status=403,
                errors=(f"{type(exc).__name__}: {exc}",), detail="cedargate could not decide this call",
            )

    def _decide(self, call: Call, base: dict[str, Any], reading: Reading | None, snapshot: Snapshot) -> Verdict:
        if self.recorder is not None and self.recorder.unavailable_reason():
            # The reason itself is for operators (/status, the log); it may describe others' calls.
            return self.store_unavailable(Verdict(**base, outcome=Outcome.ERROR))
        if self._addresses_own_api(call):
            return Verdict(
                **base, outcome=Outcome.DENY, problem=Problem.PROXY_API, status=403,
                detail="cedargate's override API is for humans; the proxy never forwards calls to it",
            )
        try:
            request = map_call(call, self.mapping, snapshot.bundle.manifest, reading, at=base["at"],
                               hints=self.hints.of)
        except UnknownAction as exc:
            return Verdict(**base, outcome=Outcome.DENY, problem=Problem.UNKNOWN_ACTION, status=exc.status,
                           detail=str(exc), revision=snapshot.bundle.revision)
        except MappingError as exc:
            return Verdict(
                **base, outcome=Outcome.ERROR, problem=Problem.MAPPING_ERROR, status=exc.status, detail=str(exc)
            )
        return self._judged(call, request, base, reading, snapshot)

    def redecide(self, call: Call, request: CedarRequest, snapshot: Snapshot | None = None) -> Verdict:
        """The verdict on a Cedar request mapped before (a recorded decision's, for `cedargate explain
        --decision`), judged now under `snapshot` (default the live one), as `decide` would word it."""
        base: dict[str, Any] = dict(decision_id=new_decision_id(), call=call, at=self.clock(),
                                    started=time.perf_counter())
        return self._judged(call, request, base, None, self.engine.snapshot if snapshot is None else snapshot)

    def _judged(self, call: Call, request: CedarRequest, base: dict[str, Any], reading: Reading | None,
                snapshot: Snapshot) -> Verdict:
        judged = judge(self.engine, request, snapshot)
        common = dict(base, request=request, determining=judged.determining, errors=judged.errors,
                      revision=judged.revision, binding=_binding(request, reading))
        if judged.outcome is Outcome.ALLOW:
            return Verdict(**common, outcome=Outcome.ALLOW)
        if judged.outcome is Outcome.ERROR:
            return Verdict(
                **common, outcome=Outcome.ERROR, problem=Problem.EVALUATION_ERROR, status=403,
                detail="a policy could not be evaluated for this call, so it is refused: "
                + "; ".join(judged.errors or (f"Cedar returned {judged.cedar_decision}",)),
            )
        forbids = judged.forbids
        default_deny = f"no policy permits {call.agent} to {call.method.upper()} {call.url} (default deny)"
        reasons = "; ".join(p.reason or f'forbidden by policy "{p.policy_id}"' for p in forbids)
        if judged.outcome is Outcome.ESCALATE:
            return Verdict(
                **common, outcome=Outcome.ESCALATE, problem=Problem.POLICY_DENIED, status=403, detail=reasons,
                escalation=escalation_of(forbids, self.default_expiry), beneath=judged.beneath,
            )
        if judged.problem is Problem.POLICY_DENIED:
            return Verdict(**common, outcome=Outcome.DENY, problem=Problem.POLICY_DENIED, status=403,
                           detail=reasons)
        if not forbids:
            return Verdict(**common, outcome=Outcome.DENY, problem=Problem.NO_PERMIT, status=403,
                           detail=default_deny)
        ids = ", ".join(f'"{p.policy_id}"' for p in forbids)
        return Verdict(
            **common, outcome=Outcome.DENY, problem=Problem.NO_PERMIT, status=403,
            detail=f"{default_deny}. The matching escalatable {'forbid' if len(forbids) == 1 else 'forbids'} "
            f"{ids} cannot make it grantable: an override lifts a forbid, it never stands in for a permit.",
        )

    def mcp_endpoint(self, call: Call, snapshot: Snapshot | None = None) -> McpEndpointSpec | None:
        """The MCP endpoint the call is addressed to, if the action manifest names one there."""
        manifest = (snapshot or self.engine.snapshot).bundle.manifest
        return manifest.mcp_endpoint(canonical_host(call.host), call.path) if manifest else None

    def visible_tools(self, call: Call, names: Iterable[str]) -> set[str]:
        """Of the tools an MCP server lists in answer to `call`, those the agent could ever be allowed to call.

        A tool is hidden only when every call of it is denied without a human able to override: no
        permit's scope holds, an unconditional forbid without @escalate does, or the manifest refuses it
        as unknown. A tool that policy allows only for some arguments stays visible.
        """
        snapshot = self.engine.snapshot  # one revision for the endpoint and the policies
        endpoint = self.mcp_endpoint(call, snapshot)
        if endpoint is None:
            return set(names)
        agent, action = ("Agent", call.agent), ("Action", "call_tool")
        return {
            name for name in names
            if TOOL_NAME.match(name) and (name in endpoint.tools or endpoint.unknown_tools == "policy")
            and snapshot.could_allow(agent, action, ("Tool", f"{endpoint.server}/{name}"), call.path)
        }

    def observe_tools(self, call: Call, answer: Any) -> None:
        """Keep what an MCP server's answer to `call` says of its tools (their annotations), for the
        tools the manifest leaves to policy; see `proxy.calls.mcp.hints`. Never raises."""
        endpoint = self.mcp_endpoint(call)
        if endpoint is None or endpoint.unknown_tools != "policy":
            return  # elsewhere a tool the manifest does not list is refused: its hints are never read
        try:
            self.hints.observe(endpoint.server, answer, endpoint.tools)
        except Exception:  # hints only ever add caution: losing one must not lose the answer
            log.exception("cannot read the tool hints of MCP server %s", endpoint.server)

    def _addresses_own_api(self, call: Call) -> bool:
        return self.reaches_own_api([call.host], call.port)

    def reaches_own_api(self, hosts: Iterable[str], port: int) -> bool:
        """Whether any of `hosts` (the names a call uses, or the addresses they resolve to) on `port`
        is cedargate's own API. The proxy asks with the name at decision time and again with the
        resolved addresses before it connects, so no alias reaches the API."""
        api_hosts = [api_host for api_host, api_port in self.protected if api_port == port]
        if not api_hosts:  # the common case, decided without looking at the host
            return False
        for host in map(canonical_host, hosts):
            for api_host in api_hosts:
                if host == canonical_host(api_host) or is_local(host) and is_local(api_host):
                    return True
        return False

    def shown_url(self, url: str) -> str:
        """A call's URL for a log line or a person: query secrets redacted, escapes made visible."""
        return printable(self.redaction.url(url))

    def record(self, verdict: Verdict) -> Future[None]:
        """Put the verdict on the record before its call goes anywhere (upstream, or into a hold): the
        future resolves once the row is committed. For an allowed call it fails (`StoreUnavailable`) if
        the store cannot take it now; a held call's waits until the row is in (it is retried), since a
        failure that passed before a human decides must not refuse the call then. What became of the
        call is added later (`outcome`)."""
        assert self.recorder is not None  # a gate without a record (explain's) decides, never records
        committed = self.recorder.commit(self._row(verdict, self._errors(verdict), None),
                                         fail_fast=verdict.outcome is not Outcome.ESCALATE)
        self._shadow(verdict)
        # Counted once its fate is known: as decided if the row is in, else as the refusal it becomes. The
        # future handed back resolves after the count, so whoever waits on it finds the count made.
        self._uncounted[verdict.decision_id] = verdict
        counted: Future[None] = Future()

        def settle(done: Future[None]) -> None:
            failure = done.exception()
            self._count_once(verdict if failure is None else self.store_unavailable(verdict))
            if failure is None:
                counted.set_result(None)
            else:
                counted.set_exception(failure)

        committed.add_done_callback(settle)
        return counted

    def outcome(self, verdict: Verdict, upstream_status: int | None = None,
                failure: UpstreamFailure | None = None, refused: Verdict | None = None) -> None:
        """Add to a `record`ed verdict what became of its call: the upstream's status, or how the exchange
        failed (kept in `errors`, as "upstream <kind>: ..."), or the refusal it ended in (not forwarded)."""
        assert self.recorder is not None
        if refused is not None and refused.problem is Problem.STORE_UNAVAILABLE:
            # Refused before its commit was known (too slow): counted as refused, not when the row lands.
            self._count_once(refused)
        extra = [failure.recorded] if failure is not None else []
        if refused is not None and refused.problem is not None:
            extra.append(f"not forwarded: {refused.problem.value}")
        self.recorder.record_outcome(verdict.decision_id, verdict.call.agent, {
            "upstream_status": upstream_status,
            "duration_ms": round((time.perf_counter() - verdict.started) * 1000, 3),
            "errors": json.dumps(self._errors(verdict, extra)),
        })

    def finish(self, verdict: Verdict, upstream_status: int | None = None,
               failure: UpstreamFailure | None = None) -> None:
        """Append a verdict whose call is done to the record in one row (a refused call: nothing was
        forwarded, so nobody waits for the commit), with the upstream's status if it went, or how the
        exchange failed. A call refused because the store cannot take it is counted, not written."""
        assert self.recorder is not None  # a gate without a record (explain's) decides, never finishes
        _count(verdict)
        if verdict.problem is Problem.STORE_UNAVAILABLE:
            self.recorder.count_refusal(verdict.call.agent)
            return
        extra = [failure.recorded] if failure is not None else []
        self.recorder.record(self._row(verdict, self._errors(verdict, extra), upstream_status))
        self._shadow(verdict)

    def _count_once(self, verdict: Verdict) -> None:
        if self._uncounted.pop(verdict.decision_id, None) is not None:
            _count(verdict)

    def _shadow(self, verdict: Verdict) -> None:
        """Hand a recorded verdict to the shadow policies, which judge it off the call's path."""
        if self.shadow is not None and verdict.request is not None:
            self.shadow.observe(verdict)

    def store_unavailable(self, verdict: Verdict) -> Verdict:
        """`verdict`'s call refused because the record cannot take it: a 503 that says to retry, and
        never why in the store's words (they are for operators, and may name hosts or others' calls)."""
        return replace(
            verdict, outcome=Outcome.ERROR, problem=Problem.STORE_UNAVAILABLE, status=503, determining=(),
            errors=(), escalation=None, extra={},
            detail="cedargate cannot record decisions right now, so it forwards nothing; retry later",
            extra_headers={"Retry-After": str(STORE_RETRY_AFTER)},
        )

    def _errors(self, verdict: Verdict, extra: list[str] | None = None) -> list[str]:
        call = verdict.call
        errors = list(verdict.errors) + ([verdict.detail] if verdict.outcome is Outcome.ERROR else [])
        errors += extra or []
        if errors and call.query:  # a message may quote the query, or a value taken from it
            errors = self.redaction.scrub(errors, call.query)
        return errors

    def _row(self, verdict: Verdict, errors: list[str], upstream_status: int | None) -> dict[str, Any]:
        call = verdict.call
        return {
            "decision_id": verdict.decision_id,
            "at": verdict.at,
            "agent": call.agent,
            "method": call.method.upper(),
            "scheme": call.scheme,
            "host": call.host,
            "port": call.port,
            "path": call.path,
            "action": verdict.action,
            "resource": verdict.resource,
            "decision": verdict.outcome.value,
            "determining_policies": json.dumps([p.policy_id for p in verdict.determining]),
            "errors": json.dumps(errors),
            "policy_revision": verdict.revision,
            "upstream_status": upstream_status,
            "duration_ms": round((time.perf_counter() - verdict.started) * 1000, 3),
            **_session_and_tool(verdict),
            "cedar_request": self.stored_request(verdict),
            **self._detail(verdict),
        }

    def stored_request(self, verdict: Verdict) -> str | None:
        """The Cedar request the verdict was made on, as the record keeps it (canonical JSON, Cedar's own
        request form) so that it can be explained and replayed later; None for a call refused before it
        was mapped. Never a secret: credentials never enter a context (`proxy.calls.mapping`), and query
        secrets are redacted as in every other view of the call (`Redaction.context`)."""
        request = verdict.request
        if request is None:
            return None
        return canonical_text({
            "principal": {"type": request.principal[0], "id": request.principal[1]},
            "action": {"type": request.action[0], "id": request.action[1]},
            "resource": {"type": request.resource[0], "id": request.resource[1]},
            "context": self.redaction.context(request.context, verdict.call.query, request.query_fields),
        })

    @staticmethod
    def _detail(verdict: Verdict) -> dict[str, Any]:
        """For the audit log: what an MCP message was, which path and method do not say."""
        request = verdict.request
        if request is None or request.action[1] not in MCP_ACTIONS:
            return {}
        return {"detail": {k: request.context[k] for k in MCP_DETAIL if k in request.context}}


def _count(verdict: Verdict) -> None:
    """The decision in the metrics, once per call decided, when its outcome is final (a refusal for the
    store is an error, whatever was decided before)."""
    request = verdict.request
    count_decision(verdict.outcome.value, request.action[1] if request is not None else "",
                   tuple(p.policy_id for p in verdict.determining))


def _session_and_tool(verdict: Verdict) -> dict[str, Any]:
    """The agent's session and the MCP tool of a call, kept in columns so a reviewer can be shown the
    session's recent calls. Always both keys (None when unknown): a batch's rows are one INSERT."""
    context = verdict.request.context if verdict.request is not None else {}
    statements = context.get("agent")
    session = statements.get("session") if isinstance(statements, dict) else None
    tool = context.get("tool") if verdict.request is not None and verdict.request.action[1] == "call_tool" else None
    return {"session": session if isinstance(session, str) else None,
            "tool": tool if isinstance(tool, str) else None}


def _binding(request: CedarRequest, reading: Reading | None) -> bytes | None:
    """The binding of the one MCP message a call carries, from what was read of it."""
    body = reading.body if reading is not None else None
    if request.action[1] not in MCP_ACTIONS or body is None or body.batch or len(body.messages) != 1:
        return None
    return body.messages[0].binding()
