"""Graceful escalation: turning an escalatable denial into a held call that a human may release once.

`Oversight.resolve` stores (or joins) the override request before the agent hears anything, holds the
call until a human decides or the hold ends, and returns a `Resolution`: release the call upstream, or
refuse it with a problem saying why (denied, expired, a reviewer's question, still pending with where to
look, or refused at release because current policy now hard-denies it). A denied or expired request's
end is told once (`OverrideWorkflow.tell_outcome`): by the held call that learns it, or else on the
agent's retry; a needs_info request answers the retry with its question until the retry brings an
answer. A grant is consumed by exactly one release.

At release the call is decided again under the current policies, by the same rule as any call: it goes
only if it is still allowed, or still denied only by escalatable forbids the grant covers, with a permit
beneath them. A grant with a reviewer's changes (`proxy.oversight.changes`) releases the call changed: it
is the changed call that is decided again, and the `Resolution` carries its body and the changes for the
adapter to send and tell the agent of.
An agent's retry of a granted call that current policy hard-denies never reaches a hold; `refuse_grant`
spends that grant as refused, so the agent (and the reviewer) learn why.
A call for which no request may be opened (see `proxy.oversight.limits`) is refused at once, not held, and the
refusal is recorded as an `override_refused` event.
A process holds at most `max_held_calls` calls (`proxy.calls.capacity`): past it, the request is opened
(or joined) all the same and the agent answered at once, as if it had sent `Prefer: respond-async`, so a
flood of escalations cannot take the files every other call and every reviewer needs.

Store trouble on this path (the store down or too slow, a driver error) is never answered as a policy
refusal, and never with the driver's words: a call that cannot be held is answered 503 `store-unavailable`
with Retry-After; a held call keeps holding while the store is away, looking again every
`STORE_RETRY_INTERVAL`, and is released if it was granted once the store is back within its hold.
A released call that never reached the upstream gets its grant back (`upstream_failed`), so the
agent's retry goes through without a second approval.

Every change of an override's state goes through `proxy.oversight.workflow.OverrideWorkflow`; this module
holds the call and turns the request's state into an answer.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Final, Literal

from proxy.calls.capacity import Capacity
from proxy.calls.mcp.binding import binding_of
from proxy.decision.gate import Gate, Outcome, Verdict
from proxy.decision.upstream import UpstreamFailure
from proxy.observe.metrics import HELD_CALLS
from proxy.oversight.changes import ChangeError
from proxy.oversight.holds import LONGEST_SLEEP, Prepared, Woken
from proxy.oversight.limits import OverrideRefused, Refusal
from proxy.oversight.overrides import MessageKind, Override, OverrideStatus
from proxy.oversight.workflow import OverrideWorkflow, release_refused
from proxy.record.store import StoreUnavailable, is_store_failure
from proxy.vocabulary.printable import printable
from proxy.vocabulary.problems import Problem

log = logging.getLogger(__name__)

# Why no request was opened -> what the agent is answered, with its problem's status.
REFUSALS = {
    Refusal.BODY_TOO_LARGE: Problem.OVERRIDE_BODY_TOO_LARGE,
    Refusal.TOO_MANY_PENDING: Problem.TOO_MANY_PENDING_OVERRIDES,
    Refusal.RATE_LIMITED: Problem.OVERRIDE_RATE_LIMITED,
}

# Seconds between two warnings that escalations are not held for the ceiling: once per flood, not per call.
CEILING_LOG_INTERVAL = 60.0

# How often a held call looks at its request again while the store fails: how soon after the store is
# back a granted call is released, against one failing query a second per held call.
STORE_RETRY_INTERVAL = 1.0
# Seconds past its deadline a held call waits for the vote that carries its release (`Holds.pledge`):
# a transaction's usual few milliseconds, and a bound should the writer be stuck.
PLEDGE_WAIT = 2.0


@dataclass(frozen=True)
class Resolution:
    release: bool
    verdict: Verdict  # for a refusal: the verdict to answer with
    override_id: str | None = None
    # Released with a reviewer's changes (`proxy.oversight.changes`): what they are, and the body that
    # goes upstream in place of the agent's.
    changes: dict[str, Any] | None = None
    body: bytes | None = None


def requested_wait(prefer: str | None, maximum: float) -> float:
    """How long to hold, from RFC 7240 `Prefer: wait=N` / `Prefer: respond-async`, capped at `maximum`."""
    if not prefer:
        return maximum
    preferences = [p.strip().lower() for p in prefer.split(",")]
    for preference in preferences:
        match = re.fullmatch(r"wait\s*=\s*(\d+)", preference)
        if match:  # with respond-async too: RFC 7240's "answer async if it takes longer than N"
            return min(float(match.group(1)), maximum)
    return 0.0 if "respond-async" in preferences else maximum


def _binding(verdict: Verdict) -> bytes | None:
    """What an override for the call binds to: from the decision's one reading of an MCP body, read
    here only for a verdict decided without that reading (an MCP call mapped on its own)."""
    assert verdict.request is not None
    if verdict.binding is not None:
        return verdict.binding
    return binding_of(verdict.request.action[1], verdict.call.body)


_HELD = (OverrideStatus.PENDING.value, OverrideStatus.GRANTED.value)  # statuses a call is held on
class _Pending(Enum):
    STILL = "still pending"  # `Oversight._answer`: the request is pending, the call keeps holding
    UNREAD = "read the store"  # `Oversight._decided`: no answer without reading the request


_STILL_PENDING: Final = _Pending.STILL
_UNREAD: Final = _Pending.UNREAD


class Oversight:
    def __init__(self, gate: Gate, workflow: OverrideWorkflow, api_base_url: Callable[[], str],
                 capacity: Capacity | None = None) -> None:
        self.gate = gate
        self.workflow = workflow
        self.overrides = workflow.store  # reads only
        self.holds = workflow.holds
        self.api_base_url = api_base_url
        self.capacity = capacity  # None: no ceiling on held calls (tests of the workflow alone)
        self._ceiling_warned = -CEILING_LOG_INTERVAL

    async def settle(self, verdict: Verdict, wait: float, justification: str | None,
                     client_alive: Callable[[], bool]) -> Resolution:
        """What becomes of a decided call, the one question an adapter asks: an allowed call is released;
        an escalated one is held until a human decides or `wait` ends (`resolve`); a hard-denied one is
        refused, spending a grant a human gave that exact call (`refuse_grant`). A failure on the override
        path refuses the call, never releases it."""
        if verdict.allowed:
            return Resolution(True, verdict)
        if verdict.outcome is Outcome.ESCALATE:
            try:
                return await self.resolve(verdict, wait, justification, client_alive)
            except Exception as exc:
                if is_store_failure(exc):  # passing trouble, said as such: never the driver's words
                    log.warning("override request for %s not stored: %s", self.gate.shown_url(verdict.call.url),
                                exc)
                    return Resolution(False, self.gate.store_unavailable(verdict))
                log.exception("override handling failed for %s", self.gate.shown_url(verdict.call.url))
                detail = f"{verdict.detail} (the override request could not be handled; the call was refused)"
                return Resolution(False, replace(verdict, detail=detail))
        try:
            refused = await self.refuse_grant(verdict)
        except Exception:  # the call is refused either way; only the better answer is lost
            log.exception("looking for a grant of %s failed", self.gate.shown_url(verdict.call.url))
            return Resolution(False, verdict)
        return refused if refused is not None else Resolution(False, verdict)

    async def resolve(self, verdict: Verdict, wait: float, justification: str | None,
                      client_alive: Callable[[], bool]) -> Resolution:
        assert verdict.outcome is Outcome.ESCALATE and verdict.escalation and verdict.request
        deadline = time.monotonic() + wait
        try:
            override = await self._open(verdict, justification)
            while True:
                not_held = False
                if override.status in _HELD and deadline > time.monotonic() and not self._may_hold(verdict):
                    deadline, not_held = time.monotonic(), True  # answered at once, as respond-async is
                elif override.status in _HELD:
                    self._log_hold(verdict, override, deadline - time.monotonic())
                # No await between the ceiling's check and `watching`, which counts this call as held.
                with self.holds.watching(override.id) as woken, HELD_CALLS.track_inprogress():
                    outcome = await self._hold(verdict, override, deadline, woken, client_alive, not_held)
                if outcome is not None:
                    return outcome
                # Another identical call consumed the grant first: this one is a new decision.
                override = await self._open(verdict, justification)
        except OverrideRefused as refused:
            return self._not_opened(verdict, refused)

    def _may_hold(self, verdict: Verdict) -> bool:
        capacity = self.capacity
        if capacity is None or capacity.may_hold(self.holds.held):
            return True
        now = time.monotonic()
        if now - self._ceiling_warned >= CEILING_LOG_INTERVAL:
            self._ceiling_warned = now
            log.warning("holding %d calls, the ceiling (max_held_calls): escalations are answered at once "
                        "until held calls end (%d so far)", self.holds.held, capacity.not_held)
        log.debug("not holding %s %s for %s: max_held_calls reached", printable(verdict.call.method),
                  self.gate.shown_url(verdict.call.url), verdict.call.agent)
        return False

    def _log_hold(self, verdict: Verdict, override: Override, wait: float) -> None:
        # Said when the hold starts, so an operator watching a call that seems to hang can look the
        # request up (and a reviewer be pointed at it) while it is still held, not only once it ends.
        log.info("holding %s %s for %s under override %s (%s, up to %.0f s)", printable(verdict.call.method),
                 self.gate.shown_url(verdict.call.url), verdict.call.agent, override.id, override.status,
                 max(0.0, wait))

    def _not_opened(self, verdict: Verdict, refused: OverrideRefused) -> Resolution:
        """Refuse a call for which no override request may be opened; record why."""
        problem = REFUSALS[refused.reason]
        status = problem.entry.status
        headers, extra = dict(verdict.extra_headers), {}
        if refused.retry_after is not None:
            headers["Retry-After"] = str(refused.retry_after)
            extra["retry_after"] = refused.retry_after
        self.workflow.refuse_open(decision_id=verdict.decision_id, agent=verdict.call.agent,
                                  reason=refused.reason.value, detail=refused.detail,
                                  policies=[p.policy_id for p in verdict.determining])
        log.info("no override request opened for %s %s by %s: %s", printable(verdict.call.method),
                 self.gate.shown_url(verdict.call.url), verdict.call.agent, refused.reason.value)
        detail = f"{verdict.detail} No override request was opened: {refused.detail}"
        return Resolution(False, replace(verdict, problem=problem, status=status, detail=detail,
                                         extra_headers=headers, extra=extra))

    async def _hold(self, verdict: Verdict, override: Override, deadline: float, woken: Woken,
                    client_alive: Callable[[], bool], not_held: bool = False) -> Resolution | None:
        troubled = False
        while True:
            # Cleared before the look, not after it: a wake-up arriving while this hold reads or answers
            # (a decision committed during its read of the request, say) ends its next sleep at once.
            woken.clear()
            try:
                decided = await self._decided(verdict, override, woken.take(), client_alive)
                if decided is not _UNREAD:
                    woken.went = decided.release
                    return decided
                # Read after subscribing, so a decision committed from here on still wakes this hold.
                current = await asyncio.to_thread(self.overrides.get, override.id)
                override = current or override
                outcome = await self._answer(verdict, override, client_alive)
                troubled = False
            except Exception as exc:
                if not is_store_failure(exc):
                    raise
                if not troubled:
                    log.warning("held call under override %s keeps holding while the store fails: %s",
                                override.id, exc)
                troubled, outcome = True, _STILL_PENDING
            if outcome is not _STILL_PENDING:
                woken.went = outcome is not None and outcome.release
                return outcome  # a Resolution, or None: decide again
            remaining = deadline - time.monotonic()
            if remaining <= 0 and woken.decided is not None:
                continue  # a decision came while this hold looked: it answers, not the time
            if remaining <= 0:
                if troubled:
                    return Resolution(False, self.gate.store_unavailable(verdict), override.id)
                if not_held:
                    assert self.capacity is not None
                    return self._refuse(verdict, override, Problem.OVERRIDE_PENDING,
                                        f"{verdict.detail} An override request is waiting for review. The call "
                                        f"was not held: cedargate holds {self.capacity.max_held} calls, as many "
                                        "as it may (max_held_calls); retry the identical call after it is "
                                        "granted.", held=False)
                return self._refuse(verdict, override, Problem.OVERRIDE_PENDING,
                                    f"{verdict.detail} An override request is waiting for review; "
                                    "retry the identical call after it is granted.")
            # No polling: decisions made through any instance's API and expiries by any expiry job notify
            # this hold (`proxy.oversight.wakeups`); while the store fails, it looks again now and then.
            woken.release = None if troubled else functools.partial(self._prepared, verdict, override,
                                                                     client_alive)
            try:
                await self.holds.sleep(woken, min(remaining, STORE_RETRY_INTERVAL) if troubled else remaining)
            finally:
                woken.release = None
            pledge = woken.pledged
            if pledge is not None:  # a vote's transaction carries this call's release: its outcome first
                try:
                    # Until its deadline (a day at most, for a hold without one), and PLEDGE_WAIT past it.
                    await asyncio.wait_for(asyncio.shield(pledge.outcome),
                                           min(max(0.0, deadline - time.monotonic()), LONGEST_SLEEP) + PLEDGE_WAIT)
                except TimeoutError:  # the writer is stuck: leave the grant to the vote, unspent, and answer
                    pledge.abandoned = True

    async def _decided(self, verdict: Verdict, override: Override, decided: Override | None,
                       client_alive: Callable[[], bool]) -> Resolution | Literal[_Pending.UNREAD]:
        """The answer from the state a deciding vote's wake-up brought (`Holds.notify`), without reading
        the store: a grant goes straight to its release, a denial to its refusal, this call's release
        (committed with the grant, `Holds.pledge`) upstream. `_UNREAD` when there is no such state newer
        than the one this hold saw, or when the grant was gone by the release (used, refused or expired
        meanwhile): the stored request then says which."""
        if decided is None or decided.version <= override.version:
            return _UNREAD
        status = OverrideStatus(decided.status)
        if status is OverrideStatus.RELEASED and decided.release_decision_id == verdict.decision_id:
            self._log_released(verdict, decided, None)
        elif status not in (OverrideStatus.GRANTED, OverrideStatus.DENIED):
            return _UNREAD
        outcome = await self._answer(verdict, decided, client_alive)
        return outcome if isinstance(outcome, Resolution) else _UNREAD

    async def _answer(self, verdict: Verdict, override: Override,
                      client_alive: Callable[[], bool]) -> Resolution | None | Literal[_Pending.STILL]:
        """What the request's state means for the held call: a Resolution; None when an identical call
        used the grant (this one is a new decision); or `_STILL_PENDING`."""
        status = OverrideStatus(override.status)
        if status is OverrideStatus.GRANTED:
            if not client_alive():  # leave the grant for the agent's retry
                return self._refuse(verdict, override, Problem.OVERRIDE_PENDING, "the client went away")
            return await self._release(verdict, override)
        if status is OverrideStatus.RELEASED:
            if override.release_decision_id == verdict.decision_id:
                # This call's own release, committed with the vote that granted it (`Holds.pledge`), or
                # while the store's answer was lost: it goes, as granted, unless nobody waits for it now.
                if not client_alive():
                    await asyncio.to_thread(self.workflow.restore_grant, override.id, decision_id=verdict.decision_id,
                                            failure={"kind": "client-gone", "message": "the client went away"})
                    return self._refuse(verdict, override, Problem.OVERRIDE_PENDING, "the client went away")
                changes = json.loads(override.changes) if override.changes else None
                if changes is None:
                    return Resolution(True, verdict, override.id)
                try:
                    changed = self.workflow.changed_call(verdict.call, changes)
                except ChangeError as exc:
                    return self._refuse(verdict, override, Problem.RELEASE_REFUSED,
                                        f"the override was granted with changes that no longer fit the call: {exc}")
                return Resolution(True, verdict, override.id, changes, changed.body)
            return None  # an identical call used the grant: this one is a new decision
        if status is OverrideStatus.RELEASE_REFUSED:
            return self._refuse(verdict, override, Problem.RELEASE_REFUSED,
                                "the override was granted, but the current policies refuse the call")
        if status is OverrideStatus.NEEDS_INFO:
            return await asyncio.to_thread(self._needs_info, verdict, override)
        if status is OverrideStatus.DENIED:
            await asyncio.to_thread(self._told, verdict, override)
            return self._refuse(verdict, override, Problem.OVERRIDE_DENIED,
                                f"a reviewer denied the override: {override.decided_reason}",
                                reason=override.decided_reason)
        if status is not OverrideStatus.PENDING:
            await asyncio.to_thread(self._told, verdict, override)
            return self._refuse(verdict, override, Problem.OVERRIDE_EXPIRED,
                                "the override was granted, but its grant expired before the call was retried"
                                if status is OverrideStatus.GRANT_EXPIRED else
                                "the override request expired before enough approvals arrived")
        return _STILL_PENDING

    def _needs_info(self, verdict: Verdict, override: Override) -> Resolution:
        """Answer with the reviewer's question; the agent's retry with a new justification answers it."""
        asked = [m for m in self.overrides.messages(override.id) if m.kind == MessageKind.QUESTION.value]
        question = asked[-1].text if asked else ""
        return self._refuse(verdict, override, Problem.OVERRIDE_NEEDS_INFO,
                            f"a reviewer asks for more information before deciding: {question} Retry the identical "
                            "call with your answer in X-Agent-Justification; it is held for review again.",
                            question=question)

    def _told(self, verdict: Verdict, override: Override) -> None:
        """Mark the request's end as told, so the agent's next retry asks again rather than hear it twice."""
        try:
            self.workflow.tell_outcome(override, decision_id=verdict.decision_id)
        except Exception as exc:  # the agent is told all the same; its retry may be told once more
            log.warning("could not mark override %s's end as told: %s", override.id, exc)

    def upstream_failed(self, verdict: Verdict, override_id: str, failure: UpstreamFailure) -> Verdict:
        """The answer for a call released under `override_id` that failed on its way upstream.

        One that never left cedargate gets its grant back (recorded as `grant_restored`) and an answer
        saying so: the retry goes through without a new approval. Blocking: run it off the event loop.
        """
        refused = failure.refusal(verdict)
        if failure.sent or not failure.answerable:
            return refused
        return self.not_forwarded(refused, override_id, {"kind": failure.kind.value, "message": failure.message})

    def not_forwarded(self, refused: Verdict, override_id: str, why: dict[str, Any]) -> Verdict:
        """Put back the grant of a call released under `override_id` that cedargate did not forward after
        all (its upstream unreachable, or its record not committed: `why` says which, for the audit log),
        and add to `refused`, the agent's answer, that the grant is kept. Blocking: run it off the loop."""
        try:
            restored = self.workflow.restore_grant(override_id, decision_id=refused.decision_id, failure=why)
        except Exception:  # the grant is lost with the call; the agent hears what failed
            log.exception("could not put back the grant of override %s", override_id)
            return refused
        if not restored:
            return refused
        log.info("grant of override %s kept: the released call was not forwarded (%s)", override_id, why["kind"])
        extra = {**refused.extra, "override_id": override_id, "grant_kept": True,
                 "override_url": f"{self.api_base_url()}/overrides/{override_id}"}
        detail = (f"{refused.detail} The override grant is kept: retry the identical call and it goes "
                  "through without a new approval, while the grant lasts.")
        if refused.problem is Problem.STORE_UNAVAILABLE:  # the store's trouble stays the answer: retry later
            return replace(refused, detail=detail, extra=extra)
        problem = Problem.GRANT_KEPT
        return replace(refused, problem=problem, status=problem.entry.status, detail=detail, extra=extra)

    async def _open(self, verdict: Verdict, justification: str | None) -> Override:
        request, escalation, revision = verdict.request, verdict.escalation, verdict.revision
        # Only an escalated verdict is held (`resolve`), and the gate gives one all three.
        assert request is not None and escalation is not None and revision is not None
        policies = [{"id": p.policy_id, "reason": p.reason, "annotations": dict(p.annotations)}
                    for p in verdict.determining]
        override, _ = await asyncio.to_thread(
            self.workflow.open, verdict.call, decision_id=verdict.decision_id,
            escalation=escalation, policies=policies,
            cedar_request={"principal": f'Agent::"{request.principal[1]}"', "action": verdict.action,
                           "resource": verdict.resource, "context": request.context},
            revision=revision, justification=justification,
            binding=_binding(verdict), query_fields=request.query_fields,
        )
        return override

    async def refuse_grant(self, verdict: Verdict) -> Resolution | None:
        """For a call current policy hard-denies: spend a grant a human gave this exact call as refused,
        and answer with why; None when it has none (the hard deny stands as it is).

        Without this the grant would stay live, and be released should the policies change back.
        """
        if verdict.request is None or verdict.outcome not in (Outcome.DENY, Outcome.ERROR):
            return None
        binding = _binding(verdict)
        override = await asyncio.to_thread(self.overrides.granted_for, verdict.call, binding)
        if override is None:
            return None
        return await asyncio.to_thread(self._refuse_release, verdict, verdict, override, True)

    async def _release(self, verdict: Verdict, override: Override) -> Resolution | None:
        """Check the call (with the reviewers' changes, if any) against the current policies, then consume
        the grant; None if already consumed.

        On the event loop, where an allowed call is decided too (on a thread for a large body, as the
        enforcer does), the grant consumed by a transaction this loop awaits (`release_soon`): the way
        from an approval to its upstream crosses no thread but the writer's. A refusal, which reads the
        store, is answered from a thread."""
        call, changes = verdict.call, json.loads(override.changes) if override.changes else None
        if changes is not None:
            try:
                call = self.workflow.changed_call(verdict.call, changes)
            except ChangeError as exc:
                recheck = replace(verdict, outcome=Outcome.ERROR, problem=Problem.RELEASE_REFUSED,
                                  detail=f"the changes it was granted with no longer fit the call: {exc}")
                return await asyncio.to_thread(self._refuse_release, verdict, recheck, override, False)
        # The release decides the real call as it will go (changed): this check is the one that counts.
        recheck = (await asyncio.to_thread(self.gate.decide, call) if len(call.body) > self.gate.mapping.max_body_bytes
                   else self.gate.decide(call))
        if recheck.problem is Problem.STORE_UNAVAILABLE:  # passing trouble: keep the grant, keep holding
            raise StoreUnavailable("the decision store cannot record the release now")
        if release_refused(recheck, override):
            # A hard deny now (no permit beneath any more, say), or policies that changed to need
            # approvals nobody gave: never release.
            return await asyncio.to_thread(self._refuse_release, verdict, recheck, override, False)
        payload = _release_payload(recheck, changes)
        if not await self.workflow.release_soon(override, decision_id=verdict.decision_id, payload=payload):
            return None
        self._log_released(verdict, override, changes)
        if changes is None:
            return Resolution(True, verdict, override.id)
        return Resolution(True, verdict, override.id, changes, call.body)

    def _prepared(self, verdict: Verdict, override: Override, client_alive: Callable[[], bool]) -> Prepared | None:
        """This held call's release, checked now against the current policies as `_release` checks it, for
        a deciding vote to commit with the grant (`Holds.pledge`); None where `_release` must decide after
        the vote: a request with changes (the changed call is decided), a client gone (the grant is left
        for the retry), a large body (decided on a thread), or a recheck that does not let it go (refused
        after the vote, with its reason). On the event loop, as `_release` runs."""
        call = verdict.call
        if override.changes is not None or not client_alive() or len(call.body) > self.gate.mapping.max_body_bytes:
            return None
        recheck = self.gate.decide(call)
        if recheck.problem is Problem.STORE_UNAVAILABLE or release_refused(recheck, override):
            return None
        return Prepared(verdict.decision_id, _release_payload(recheck, None))

    def _log_released(self, verdict: Verdict, override: Override, changes: dict[str, Any] | None) -> None:
        log.info("released %s %s for %s under override %s%s", printable(verdict.call.method),
                 self.gate.shown_url(verdict.call.url), verdict.call.agent, override.id,
                 f", changed ({', '.join(sorted(changes))})" if changes else "")

    def _refuse_release(self, verdict: Verdict, recheck: Verdict, override: Override,
                        only_if_spent: bool) -> Resolution | None:
        """Move the grant to release_refused and answer with the recheck's reason.

        `only_if_spent`: None when this caller did not move it (it expired or was used meanwhile).
        """
        # The recheck's detail may quote the URL: its query secrets stay out of the record.
        spent = self.workflow.refuse_release(override, decision_id=verdict.decision_id, payload={
            "recheck": self.gate.redaction.scrub(recheck.problem_body(), verdict.call.query)})
        if not spent and only_if_spent:
            return None
        override = self.overrides.get(override.id) or override  # report the status it has now
        return self._refuse(replace(recheck, decision_id=verdict.decision_id), override, Problem.RELEASE_REFUSED,
                            f"the override was granted, but the current policies refuse the call: {recheck.detail}")

    def _refuse(self, verdict: Verdict, override: Override, problem: Problem, detail: str,
                **more: Any) -> Resolution:
        status_url = f"{self.api_base_url()}/overrides/{override.id}"
        extra: dict[str, Any] = {"override_id": override.id, "override_status": override.status,
                                 "override_url": status_url, **more}
        headers = dict(verdict.extra_headers)
        if problem is Problem.OVERRIDE_PENDING:
            headers["Retry-After"] = "10"
            extra["retry_after"] = 10
            extra["required_roles"] = sorted(verdict.escalation.roles) if verdict.escalation else []
        refused = replace(verdict, problem=problem, status=403, detail=detail, extra=extra,
                          extra_headers=headers)
        return Resolution(False, refused, override.id)


def _release_payload(recheck: Verdict, changes: dict[str, Any] | None) -> dict[str, Any]:
    """What a `release` event records: the check that let the call go, and the reviewers' changes."""
    payload: dict[str, Any] = {"policy_revision": recheck.revision, "recheck": recheck.outcome.value,
                               "policies": [p.policy_id for p in recheck.determining]}
    if changes is not None:
        payload["changes"] = changes
    return payload
