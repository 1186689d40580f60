"""The override workflow's one owner: opening a request, a reviewer's vote, releasing the grant, expiry.

Every adapter calls `OverrideWorkflow`: the API's routes (`vote`), the held call (`open`, `release`,
`refuse_release`, `refuse_open`) and the expiry job (`expire_due`, see `proxy.oversight.jobs`). Each
method checks what may happen, changes the request with a conditional UPDATE, and chains the audit
event that says so in the same database transaction, run by the recorder's writer thread
(`Recorder.transact`), so the change and its audit row commit together or not at all, in the order
of everything else recorded. The two steps on an approval's way to its held call also have a form for
the event loop (`vote_soon`, `release_soon`), which queues the same transaction and awaits its commit
without a thread of its own: a thread hand-off waits for the GIL and for a CPU, which a busy proxy
shares, and these two ran three each. Their transactions go ahead of the journaled rows of calls
already forwarded (`Recorder.transact_soon(ahead_of_calls=True)`): a reviewer waits on them, nobody on
those. Then it wakes the held calls waiting on that request (`Holds`), in this process at once and in
every other process sharing the database through the notification the transaction sends on commit
(`proxy.oversight.wakeups.announce`). A deciding approval on the loop carries the release of a call
held in this process with it (`Holds.pledge`): one transaction on the approval's way upstream, not two.

A grant whose release never reached the upstream (no connection, TLS failure) is put back
(`restore_grant`): the agent's retry goes through without a second approval. Expiry is swept by one
process at a time on PostgreSQL (an advisory lock); every process's holds hear of it.

Request more information (`request_info`): a reviewer who may decide a pending request asks the agent a
question; the request becomes needs_info (still live and undecided: reviewers may approve or deny it),
the held call is answered `override-needs-info` with the question, and the agent's next retry with a new
`X-Agent-Justification` is its answer (`open`): added to the request's conversation, the request pending
again, the retry held again. A denied or expired request's end is told to the agent once: by the held
call that learns it (`tell_outcome`), or else on the agent's retry (`open`), which then gets that end
instead of a new request; the retry after that asks the reviewers again.

Vote rules: only an undecided (pending or needs_info), unexpired request; never the agent's own
identity; the voter must hold one of the roles the request needs; one vote per approver, never
turned from approve to deny. A deny decides at once; approvals grant once `quorum_met` (the one
quorum rule, in `proxy.cedar.escalation`).

Approve with changes (`proxy.oversight.changes`): an approval may change the call's typed values. They
are checked against the fields the call has (422 otherwise), and the changed call is decided by the
current policies before the vote is taken (409, naming the policies, if they refuse it, or need
approvals the request does not ask for); the first approval sets the request's changes and every later
one must bring the same (409 otherwise), since the approvers must agree on what goes. At release the
real call, changed, is decided again, and that is the check that counts (`proxy.oversight.held_calls`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlmodel import Session

from proxy.calls.mapping import Call
from proxy.cedar.escalation import Escalation, is_escalatable, quorum_met
from proxy.decision.gate import Gate, Outcome, Verdict
from proxy.observe.metrics import observe_review
from proxy.oversight.chains import Routing, due_step, routing, step_payload
from proxy.oversight.changes import ChangeError, EditableField, apply_changes, check_changes, editable_fields
from proxy.oversight.holds import Holds, Pledge
from proxy.oversight.overrides import (
    UNDECIDED,
    Ballot,
    MessageKind,
    Override,
    OverrideError,
    OverrideStatus,
    OverrideStore,
    at_offset,
    aware,
    chain_of,
    elapsed,
    reachable_roles,
    requirements_of,
)
from proxy.oversight.wakeups import announce
from proxy.record.audit import EventKind
from proxy.record.store import AmbiguousCommit, Recorder, StoreUnavailable, utcnow
from proxy.vocabulary.problems import Problem

log = logging.getLogger(__name__)

Event = dict[str, Any]
T = TypeVar("T")

# Seconds a unit of work queued from the event loop may wait for the writer before it is withdrawn
# (`Recorder.transact`'s default, for the same units).
UNIT_TIMEOUT = 30.0


class _Conflict(Exception):
    """Someone else moved the request between this transaction's read and its UPDATE: look again."""


class OverrideWorkflow:
    RETRIES = 20

    def __init__(self, store: OverrideStore, recorder: Recorder, holds: Holds, gate: Gate | None = None,
                 reviewers: Mapping[str, frozenset[str]] | None = None) -> None:
        self.store = store
        self.recorder = recorder
        self.holds = holds
        self.gate = gate  # decides a changed call before an approval with changes is taken; None: none are
        # The approvers who can sign in, with their roles: whom each step of a chain may name (`chains`).
        self.reviewers = dict(reviewers or {})

    # --- opening ----------------------------------------------------------------------------------

    def open(self, call: Call, *, decision_id: str, escalation: Escalation, policies: list[dict[str, Any]],
             cedar_request: dict[str, Any], revision: str, justification: str | None,
             binding: bytes | None = None,
             query_fields: Sequence[tuple[str, str]] | None = None) -> tuple[Override, bool]:
        """The live request for this exact call, or a new pending one recorded as `override_created`.

        A needs_info request takes the call's new `justification` as the agent's answer (`info_given`)
        and is pending again. A denied or expired request the agent was not told of is returned as it is,
        marked told (`outcome_told`). Raises `OverrideRefused` (nothing stored, nothing recorded) when a
        new one may not be opened.
        """
        def work(conn: Connection) -> tuple[tuple[Override, bool], list[Event]]:
            lapsed: list[tuple[Override, OverrideStatus]] = []
            told: list[Override] = []
            answered = False
            with _session(conn) as session:
                override, created = self.store.open_or_attach(
                    call, decision_id=decision_id, escalation=escalation, policies=policies,
                    cedar_request=cedar_request, revision=revision, justification=justification,
                    binding=binding, session=session, lapsed=lapsed, told=told, query_fields=query_fields)
                if (justification and override.status == OverrideStatus.NEEDS_INFO.value
                        and _is_new(session, self.store, override, justification)):
                    self.store.add_message(session, override.id, override.agent, MessageKind.ANSWER,
                                           justification, utcnow())
                    if not self.store.move(session, override.id, OverrideStatus.NEEDS_INFO, OverrideStatus.PENDING,
                                           version=override.version):
                        raise _Conflict
                    session.commit()
                    session.refresh(override)
                    answered = True
            events = [_event(_EXPIRY_EVENTS[status], old) for old, status in lapsed]
            for old, _ in lapsed:
                announce(conn, old.id)
            events += [_event(EventKind.OUTCOME_TOLD, ended, decision_id=decision_id,
                              payload={"status": ended.status, "told_on": "retry"}) for ended in told]
            if answered:
                announce(conn, override.id)
                events.append(_event(EventKind.INFO_GIVEN, override, decision_id=decision_id, actor=override.agent,
                                     payload={"answer": justification}))
            if created:
                chain = chain_of(override)
                with _session(conn) as session:
                    route = self._route(session, override, chain.tiers[0].roles, utcnow())
                    if route.primary is not None:
                        self.store.advance(session, override.id, 1, 0, utcnow(), primary_reviewer=route.primary)
                        override.primary_reviewer = route.primary
                    session.commit()
                events.append(_event(EventKind.OVERRIDE_CREATED, override, decision_id=decision_id, payload={
                    "policies": policies, "requirements": override.requirements,
                    "expires_at": override.expires_at.isoformat(), "justification": justification,
                    **step_payload(override, chain, 1, chain.tiers[0].roles, route),
                }))
            return (override, created), events

        for _ in range(self.RETRIES):
            try:
                return self.recorder.transact(work)
            except _Conflict:
                continue  # a reviewer decided the request while its answer came: look again
        raise StoreUnavailable("the override request is too contended to update; retry")

    # --- asking the agent -------------------------------------------------------------------------

    def request_info(self, override_id: str, approver: str, roles: frozenset[str], question: str) -> Override:
        """A reviewer who may decide the request asks the agent `question`, recorded as `info_requested`:
        the request becomes needs_info and the held call is answered with the question.

        Raises `OverrideError` (with the HTTP status to answer) when it may not be asked.
        """
        question = (question or "").strip()
        if not question:
            raise OverrideError(422, "a question is required: ask the agent what you need to know to decide")
        if len(question) > MAX_QUESTION:
            raise OverrideError(422, f"the question is {len(question)} characters long; at most {MAX_QUESTION}")
        for _ in range(self.RETRIES):
            try:
                override = self.recorder.transact(
                    lambda conn: self._request_info(conn, override_id, approver, roles, question))
            except (_Conflict, IntegrityError, OperationalError):
                continue  # a vote or an answer moved it first, or a busy SQLite writer: look again
            except AmbiguousCommit as exc:
                current = self.store.get(override_id)
                asked = self.store.messages(override_id) if current is not None else []
                if not (current is not None and current.status == OverrideStatus.NEEDS_INFO.value and asked
                        and (asked[-1].by, asked[-1].text) == (approver, question)):
                    raise OverrideError(503, f"{exc}; whether the question was recorded is unknown: look at "
                                        "the request before asking again") from exc
                override = current
            except (StoreUnavailable, TimeoutError) as exc:
                log.warning("a question on override %s was not recorded: %s", override_id, exc)
                raise OverrideError(503, "the decision store is unavailable; the question was not recorded: "
                                         "retry in a little while") from exc
            self.holds.notify(override_id)
            return override
        raise OverrideError(503, "the override request is too contended to update; retry")

    def _request_info(self, conn: Connection, override_id: str, approver: str, roles: frozenset[str],
                      question: str) -> tuple[Override, list[Event]]:
        with _session(conn) as session:
            override = session.get(Override, override_id)
            if override is None:
                raise OverrideError(404, f"no override request {override_id}")
            if override.status == OverrideStatus.NEEDS_INFO.value:
                raise OverrideError(409, "the request already waits for the agent's answer to a question; "
                                         "approve or deny it, or wait for the answer")
            now = utcnow()
            check_voter(override, approver, roles, now)
            self.store.add_message(session, override_id, approver, MessageKind.QUESTION, question, now)
            if not self.store.move(session, override_id, OverrideStatus.PENDING, OverrideStatus.NEEDS_INFO,
                                   version=override.version):
                raise _Conflict
            session.commit()
            announce(conn, override_id)
            session.refresh(override)
            session.expunge(override)
        return override, [_event(EventKind.INFO_REQUESTED, override, actor=approver,
                                 payload={"question": question, "roles": sorted(roles)})]

    def tell_outcome(self, override: Override, *, decision_id: str) -> bool:
        """Mark a denied or expired request's end as told to the agent (by the held call answered with it),
        recorded as `outcome_told`; True if this caller did. The agent's retry then opens a new request."""
        def work(conn: Connection) -> tuple[bool, list[Event]]:
            with _session(conn) as session:
                told = self.store.tell(session, override.id, utcnow())
                session.commit()
            return told, [_event(EventKind.OUTCOME_TOLD, override, decision_id=decision_id,
                                 payload={"status": override.status, "told_on": "held call"})] if told else []

        return self.recorder.transact(work)

    def refuse_open(self, *, decision_id: str, agent: str, reason: str, detail: str,
                    policies: list[str]) -> None:
        """Record that no request was opened for a call (the limits refused it): no state changes."""
        self.recorder.record_event({
            "kind": EventKind.OVERRIDE_REFUSED.value, "decision_id": decision_id, "agent": agent,
            "payload": {"reason": reason, "detail": detail, "policies": policies},
        })

    # --- voting -----------------------------------------------------------------------------------

    def vote(self, override_id: str, approver: str, roles: frozenset[str], ballot: Ballot | str,
             reason: str, changes: Mapping[str, Any] | None = None) -> tuple[Override, bool]:
        """One approver's approve or deny, recorded as `approval`/`denial` (and `grant`/`denied` when it
        decides the request); returns the request and whether this vote decided it. An approval may
        bring `changes` to the call's values (see the module's docstring); an empty one is none.

        Raises `OverrideError` (with the HTTP status to answer) when the vote may not be cast.
        """
        ballot = Ballot(ballot)
        _check_reason(reason)
        changes = dict(changes) if changes else None
        if changes is not None:
            if ballot is not Ballot.APPROVE:
                raise OverrideError(422, "only an approval can change the call; a denial refuses it as sent",
                                    problem=Problem.OVERRIDE_CHANGES_INVALID)
            current = self.store.get(override_id)
            if current is None:
                raise OverrideError(404, f"no override request {override_id}")
            check_voter(current, approver, roles, utcnow())  # whether they may vote, before what they change
            changes = self.check_changes(override_id, changes)
        for _ in range(self.RETRIES):
            voted: tuple[Override, bool] | None
            try:
                voted = self.recorder.transact(
                    lambda conn: self._vote(conn, override_id, approver, roles, ballot, reason, changes))
            except _VOTE_FAILURES as exc:
                voted = self._vote_failed(exc, override_id, approver, ballot)
                if voted is None:
                    continue  # not recorded: cast it again, against the request as it is now
            return self._voted(override_id, *voted)
        raise OverrideError(503, "the override request is too contended to update; retry")

    async def vote_soon(self, override_id: str, approver: str, roles: frozenset[str], ballot: Ballot | str,
                        reason: str, changes: Mapping[str, Any] | None = None) -> tuple[Override, bool]:
        """`vote`, from the event loop: the same transaction, queued to the writer and awaited here, so
        a deciding vote wakes its holds from this loop with no worker thread between. A vote with
        changes (read and decided against the store first) and the rare look after an ambiguous
        commit run on a thread."""
        if changes:
            return await asyncio.to_thread(self.vote, override_id, approver, roles, ballot, reason, changes)
        ballot = Ballot(ballot)
        _check_reason(reason)
        for _ in range(self.RETRIES):
            voted: tuple[Override, bool] | None
            try:
                voted = (await committed(self._queue_vote(override_id, approver, roles, ballot, reason)))[:2]
            except _VOTE_FAILURES as exc:
                voted = (await asyncio.to_thread(self._vote_failed, exc, override_id, approver, ballot)
                         if isinstance(exc, AmbiguousCommit) else self._vote_failed(exc, override_id, approver, ballot))
                if voted is None:
                    continue
            return self._voted(override_id, *voted)
        raise OverrideError(503, "the override request is too contended to update; retry")

    def _queue_vote(self, override_id: str, approver: str, roles: frozenset[str], ballot: Ballot,
                    reason: str) -> Future[tuple[Override, bool, Override | None]]:
        """Queue a vote's transaction (`_vote_releasing`), ahead of the calls' rows, with the release of a
        call held here on this request should the vote grant it (`Holds.pledge`). The pledged hold is
        settled from the writer's answer itself, not from the awaiting task: should the API's request be
        cancelled while its vote commits, the hold still learns whether its call was released."""
        pledge = self.holds.pledge(override_id, self._unused) if ballot is Ballot.APPROVE else None
        try:
            unit = self.recorder.transact_soon(
                functools.partial(self._vote_releasing, override_id=override_id, approver=approver, roles=roles,
                                  ballot=ballot, reason=reason, pledge=pledge),
                UNIT_TIMEOUT, ahead_of_calls=True)
        except BaseException:
            if pledge is not None:  # nothing was queued: the hold goes on as it was
                self.holds.settle(pledge, None)
            raise
        if pledge is not None:
            loop = asyncio.get_running_loop()
            awaiting = contextvars.copy_context()  # an approver's: the way upstream goes first (urgency)

            def on_thread(done: Future[tuple[Override, bool, Override | None]]) -> None:
                released = None if done.cancelled() or done.exception() is not None else done.result()[2]
                if not loop.is_closed():
                    loop.call_soon_threadsafe(self.holds.settle, pledge, released, context=awaiting)

            unit.add_done_callback(on_thread)
        return unit

    def _unused(self, pledge: Pledge) -> None:
        """On the loop: put back the grant of a release committed with its vote for a held call that ended
        without going (its task cancelled: the proxy stopping, the client gone; or answered once it stopped
        waiting for the vote), on a thread."""
        failure = {"kind": "hold-ended", "message": "the held call ended while the vote releasing it committed"}

        def restore() -> None:
            try:
                self.restore_grant(pledge.override_id, decision_id=pledge.release.decision_id, failure=failure)
            except Exception:  # the grant is lost with the call, as when a forwarded call's restore fails
                log.exception("could not put back the grant of override %s", pledge.override_id)

        try:
            asyncio.get_running_loop().run_in_executor(None, restore)
        except RuntimeError:  # the loop's threads are shut down: the proxy is stopping
            log.warning("the grant of override %s stays spent: its released call was not forwarded, and the "
                        "proxy is stopping", pledge.override_id)

    def _vote_failed(self, exc: Exception, override_id: str, approver: str,
                     ballot: Ballot) -> tuple[Override, bool] | None:
        """What a vote's failed transaction means: None to cast it again (another vote or process moved
        the request first, or a busy SQLite writer); the vote as stored, if an ambiguous commit landed;
        otherwise `OverrideError` (503) raised. Reads the store after an ambiguous commit only."""
        if isinstance(exc, _Conflict | IntegrityError | OperationalError):
            return None
        if isinstance(exc, AmbiguousCommit):
            try:
                return self._vote_landed(override_id, approver, ballot)  # None: it did not land
            except SQLAlchemyError:
                raise OverrideError(503, f"{exc}; whether the vote was recorded is unknown: look at the "
                                    "request before voting again") from exc
        # The driver's words (hosts, ports) go to the log, not to the reviewer.
        log.warning("a vote on override %s was not recorded: %s", override_id, exc)
        raise OverrideError(503, "the decision store is unavailable; the vote was not recorded: "
                                 "retry in a little while") from exc

    def _voted(self, override_id: str, override: Override, decided: bool) -> tuple[Override, bool]:
        if decided:
            # With the request as the vote committed it: a hold here releases without reading it again.
            self.holds.notify(override_id, decided=override)
            _observe_review(override)
        return override, decided

    def _vote_landed(self, override_id: str, approver: str,
                     ballot: Ballot) -> tuple[Override, bool] | None:
        """After a vote's ambiguous commit: the request and whether it is decided, if the vote is stored
        (with its events: they commit together); None if it is not."""
        if not any(v.approver == approver and v.verdict == ballot.value for v in self.store.votes(override_id)):
            return None
        override = self.store.get(override_id)
        assert override is not None  # the vote is stored, so is its request
        return override, OverrideStatus(override.status) not in UNDECIDED

    def _vote_releasing(self, conn: Connection, override_id: str, approver: str, roles: frozenset[str],
                        ballot: Ballot, reason: str, pledge: Pledge | None
                        ) -> tuple[tuple[Override, bool, Override | None], list[Event]]:
        """`_vote`, and with a grant it decides, the pledged held call's release (`Holds.pledge`) in the
        same transaction; the request as the release left it, or None. A grant with changes is left to
        its hold, which decides the changed call."""
        (override, decided), events = self._vote(conn, override_id, approver, roles, ballot, reason)
        if (pledge is None or pledge.abandoned or override.status != OverrideStatus.GRANTED.value
                or override.changes is not None):
            return (override, decided, None), events
        release = pledge.release
        if self.gate is not None and self.gate.engine.snapshot.bundle.revision != release.payload["policy_revision"]:
            return (override, decided, None), events  # the policies changed since its check: it checks again
        values = {"released_at": utcnow(), "release_decision_id": release.decision_id}
        moved, more = self._move_work(override, OverrideStatus.GRANTED, OverrideStatus.RELEASED,
                                      EventKind.RELEASE, release.decision_id, release.payload, True, values)(conn)
        if not moved:
            return (override, decided, None), events
        return (override, decided, self.store.read(conn, override_id)), events + more

    def _vote(self, conn: Connection, override_id: str, approver: str, roles: frozenset[str], ballot: Ballot,
              reason: str, changes: dict[str, Any] | None = None) -> tuple[tuple[Override, bool], list[Event]]:
        # Four statements in Core (`OverrideStore.read`, `ballots`, `cast`, `moved`): the request, every
        # vote on it, the new vote, the conditional UPDATE returning the request as it leaves it.
        override = self.store.read(conn, override_id)
        if override is None:
            raise OverrideError(404, f"no override request {override_id}")
        now = utcnow()
        check_voter(override, approver, roles, now)
        ballots = self.store.ballots(conn, override_id)
        approvals = {voter: held for voter, (verdict, held) in ballots.items() if verdict == Ballot.APPROVE.value}
        values: dict[str, Any] = {}
        if ballot is Ballot.APPROVE:
            others = set(approvals) - {approver}
            if others:
                _check_agreement(override, others, changes)
            else:  # the first approval says what is approved: the call as sent, or changed
                values["changes"] = None if changes is None else json.dumps(changes)
        prior = ballots.get(approver)
        if prior is None:
            self.store.cast(conn, override_id, approver, roles, ballot, reason, now)
            if ballot is Ballot.APPROVE:
                approvals[approver] = roles
        elif prior[0] != ballot.value:
            raise OverrideError(409, f"{approver} already voted to {prior[0]} this request")
        target: OverrideStatus | None = None
        if ballot is Ballot.DENY:
            target = OverrideStatus.DENIED
            values.update(decided_at=now, decided_reason=reason)
        elif quorum_met(requirements_of(override), approvals, elapsed(override, now)):
            target = OverrideStatus.GRANTED
            values.update(decided_at=now, decided_reason=reason,
                          grant_expires_at=now + timedelta(seconds=self.store.grant_ttl))
        moved = self.store.moved(conn, override_id, OverrideStatus(override.status), target,
                                 version=override.version, **values)
        if moved is None:
            raise _Conflict
        override = moved  # as this transaction leaves it, and commits it with the events
        if target is not None:
            announce(conn, override_id)
        vote_payload: dict[str, Any] = {"reason": reason, "roles": sorted(roles)}
        decided_payload: dict[str, Any] = {"reason": reason}
        if ballot is Ballot.APPROVE and override.changes is not None:
            vote_payload["changes"] = decided_payload["changes"] = json.loads(override.changes)
        events = [_event(EventKind.APPROVAL if ballot is Ballot.APPROVE else EventKind.DENIAL, override,
                         actor=approver, payload=vote_payload)]
        if target is not None:
            events.append(_event(EventKind.GRANT if target is OverrideStatus.GRANTED else EventKind.DENIED,
                                 override, actor=approver, payload=decided_payload))
        return (override, target is not None), events

    # --- approving with changes -------------------------------------------------------------------

    def editable_fields(self, override: Override) -> list[EditableField]:
        """The values of the request's call a reviewer may change, under the current action manifest."""
        manifest = self.gate.engine.snapshot.bundle.manifest if self.gate is not None else None
        return editable_fields(manifest, override.host, override.method, override.path, override.body)

    def changed_call(self, call: Call, changes: Mapping[str, Any]) -> Call:
        """The real call being released, with the request's changes; raises ChangeError when they no
        longer fit it (the manifest changed meanwhile, say)."""
        manifest = self.gate.engine.snapshot.bundle.manifest if self.gate is not None else None
        fields = editable_fields(manifest, call.host, call.method, call.path, call.body)
        return apply_changes(call, fields, check_changes(fields, changes))

    def check_changes(self, override_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """The changes, if they fit the request's call and current policy would let the changed call go
        under the request's grant; raises `OverrideError` 422 (a field not editable, or mistyped) or 409
        (the policies refuse the changed call, or would need approvals the request does not ask for).

        A preview of the release's check, on the call as stored (its secrets redacted): the release
        decides the real call, changed, again.
        """
        override = self.store.get(override_id)
        if override is None:
            raise OverrideError(404, f"no override request {override_id}")
        if self.gate is None:
            raise OverrideError(409, "this cedargate cannot check a changed call; approve it as sent or deny it")
        fields = self.editable_fields(override)
        try:
            checked = check_changes(fields, changes)
        except ChangeError as exc:
            raise OverrideError(422, f"the changes do not fit this call: {exc}",
                                problem=Problem.OVERRIDE_CHANGES_INVALID,
                                errors=exc.errors, editable_fields=[f.as_dict() for f in fields]) from None
        recheck = self.gate.decide(apply_changes(stored_call(override), fields, checked))
        if recheck.problem is Problem.STORE_UNAVAILABLE:
            raise OverrideError(503, "the decision store is unavailable; the vote was not recorded: retry in a "
                                     "little while")
        if release_refused(recheck, override):
            # Named: the policies the request's approval does not lift (a forbid the grant covers is not why).
            granted_for = {p["id"] for p in json.loads(override.policies)}
            refusing = [p for p in recheck.determining if not (is_escalatable(p) and p.policy_id in granted_for)]
            why = "; ".join(p.reason or p.policy_id for p in refusing) or recheck.detail
            named = [p.policy_id for p in refusing]
            raise OverrideError(
                409, f"the policies refuse the changed call ({', '.join(named) or recheck.outcome.value}): {why}",
                problem=Problem.OVERRIDE_CHANGES_REFUSED, policies=named, changes=checked)
        return checked

    # --- releasing --------------------------------------------------------------------------------

    def release(self, override: Override, *, decision_id: str, payload: Mapping[str, Any]) -> bool:
        """Consume the grant for the call being released: True for exactly one caller, recorded as
        `release`; False when the grant was used, refused or expired meanwhile."""
        return self._move(override, OverrideStatus.GRANTED, OverrideStatus.RELEASED, EventKind.RELEASE,
                          decision_id=decision_id, payload=payload, unexpired_grant=True,
                          released_at=utcnow(), release_decision_id=decision_id)

    async def release_soon(self, override: Override, *, decision_id: str, payload: Mapping[str, Any]) -> bool:
        """`release`, from the event loop: the same transaction, queued to the writer and awaited here."""
        values = {"released_at": utcnow(), "release_decision_id": decision_id}
        work = self._move_work(override, OverrideStatus.GRANTED, OverrideStatus.RELEASED, EventKind.RELEASE,
                               decision_id, payload, True, values)
        try:
            moved = await committed(self.recorder.transact_soon(work, UNIT_TIMEOUT, ahead_of_calls=True))
        except AmbiguousCommit:
            moved = await asyncio.to_thread(self._move_landed, override, OverrideStatus.RELEASED, values)
        if moved:
            self.holds.notify(override.id)
        return moved

    def refuse_release(self, override: Override, *, decision_id: str, payload: Mapping[str, Any]) -> bool:
        """Spend a grant that current policy refuses, recorded as `release_refused`; True if this
        caller did."""
        return self._move(override, OverrideStatus.GRANTED, OverrideStatus.RELEASE_REFUSED,
                          EventKind.RELEASE_REFUSED, decision_id=decision_id, payload=payload,
                          released_at=utcnow(), release_decision_id=decision_id)

    def restore_grant(self, override_id: str, *, decision_id: str, failure: Mapping[str, Any]) -> bool:
        """Put back a grant whose released call never reached the upstream, recorded as `grant_restored`:
        True if it was (it is granted again, for the agent's retry); False if that release is not the
        request's last state (nothing to put back)."""
        override = self.store.get(override_id)
        if override is None or override.release_decision_id != decision_id:
            return False
        return self._move(override, OverrideStatus.RELEASED, OverrideStatus.GRANTED, EventKind.GRANT_RESTORED,
                          decision_id=decision_id, payload={"not_forwarded": dict(failure)},
                          released_at=None, release_decision_id=None)

    # --- expiry -----------------------------------------------------------------------------------

    def expire_due(self) -> list[tuple[str, OverrideStatus]]:
        """Expire pending requests and unused grants past their time, each recorded as `expired` or
        `grant_expired` and its holds woken; returns (id, new status) of the ones this call moved.

        On PostgreSQL one process sweeps at a time (the others skip this round): the moves are
        conditional, so two sweeps would not expire one request twice, but each would read and try them
        all, which is work for nothing on every instance every second.
        """
        with self.store.engine.connect() as lock:
            if lock.dialect.name == "postgresql" and not lock.execute(_SWEEP_LOCK).scalar_one():
                return []  # another process is sweeping; held until this transaction ends
            now = utcnow()
            expired = []
            for override_id, status in self.store.due(now):
                override = self.store.get(override_id)
                if override is None:
                    continue
                target = _EXPIRED[status]
                # Who was asked, so the notifications can tell each of them (and the requester) it ended.
                payload = ({"tier": override.tier, "roles": sorted(reachable_roles(override, now))}
                           if status in UNDECIDED else {})
                if self._move(override, status, target, _EXPIRY_EVENTS[target], payload=payload, decided_at=now):
                    expired.append((override_id, target))
            return expired

    # --- escalation chains ------------------------------------------------------------------------

    def advance_due(self) -> list[tuple[str, EventKind]]:
        """Announce every step of a chain that has come: each tier reached (`escalated`), a reminder of
        the current tier (`reminder`), recorded once with the request's new standing in one transaction;
        returns (id, kind) of the events this call wrote.

        Nothing is woken: a step changes no held call's answer, and who may vote is read off the clock.
        On PostgreSQL one process sweeps at a time (the others skip the round); the move is conditional
        on where the request stood, so two sweeps never announce one step twice anywhere.
        """
        with self.store.engine.connect() as lock:
            if lock.dialect.name == "postgresql" and not lock.execute(_CHAIN_LOCK).scalar_one():
                return []
            written: list[tuple[str, EventKind]] = []
            for override_id in self.store.chain_due(utcnow()):
                try:
                    written += self.recorder.transact(functools.partial(self._advance, override_id=override_id))
                except AmbiguousCommit:
                    # Whether it landed is in the row (the events commit with it): the next round looks.
                    log.warning("a step of override %s's chain may not have been recorded", override_id)
            return written

    def _advance(self, conn: Connection, *, override_id: str
                 ) -> tuple[list[tuple[str, EventKind]], list[Event]]:
        with _session(conn) as session:
            override = session.get(Override, override_id)
            now = utcnow()
            if (override is None or OverrideStatus(override.status) not in UNDECIDED
                    or aware(override.expires_at) <= now):
                return [], []
            step = due_step(override, now)
            chain = chain_of(override)
            events: list[Event] = []
            values: dict[str, Any] = {"tier": step.tier, "reminders_sent": step.reminders_sent,
                                      "next_step_at": step.next_step_at}
            route = Routing(override.primary_reviewer, ())
            for number in step.escalate_to:
                roles = chain.tiers[number - 1].roles
                route = self._route(session, override, roles, now)
                events.append(_event(EventKind.ESCALATED, override,
                                     payload=step_payload(override, chain, number, roles, route)))
            if step.escalate_to:
                values.update(tier_started_at=now, primary_reviewer=route.primary)
            elif step.remind:
                # Everyone who may decide now is reminded; the primary is named afresh among the tier's.
                route = self._route(session, override, chain.tiers[step.tier - 1].roles, now)
                events.append(_event(EventKind.REMINDER, override, payload={
                    **step_payload(override, chain, step.tier, reachable_roles(override, now), route),
                    "reminder": step.reminders_sent}))
                values["primary_reviewer"] = route.primary
            if not self.store.advance(session, override_id, override.tier, override.reminders_sent, now, **values):
                return [], []  # another sweep moved it first: it wrote the events
            session.commit()
        return [(override_id, EventKind(e["kind"])) for e in events], events

    def _route(self, session: Session, override: Override, roles: Iterable[str], now: datetime) -> Routing:
        if not self.reviewers:
            return Routing(None, ())
        return routing(override, roles, self.reviewers, lambda: self.store.waiting(session, now), now)

    def _move(self, override: Override, from_status: OverrideStatus, to_status: OverrideStatus,
              kind: EventKind,
              *, decision_id: str | None = None, payload: Mapping[str, Any] | None = None,
              unexpired_grant: bool = False, **values: Any) -> bool:
        """One conditional transition and its event in one transaction, then wake the holds."""
        work = self._move_work(override, from_status, to_status, kind, decision_id, payload, unexpired_grant,
                               values)
        try:
            moved = self.recorder.transact(work)
        except AmbiguousCommit:
            moved = self._move_landed(override, to_status, values)
        if moved:
            self.holds.notify(override.id)
        return moved

    def _move_work(self, override: Override, from_status: OverrideStatus, to_status: OverrideStatus,
                   kind: EventKind, decision_id: str | None, payload: Mapping[str, Any] | None,
                   unexpired_grant: bool, values: dict[str, Any]) -> Callable[[Connection], tuple[bool, list[Event]]]:
        def work(conn: Connection) -> tuple[bool, list[Event]]:
            # No ORM objects in it: the UPDATE in Core, with no session to keep in step (`OverrideStore.move`).
            moved = self.store.move(conn, override.id, from_status, to_status, unexpired_grant=unexpired_grant,
                                    **values)
            if moved:
                announce(conn, override.id)
            event = _event(kind, override, decision_id=decision_id, payload=dict(payload or {}))
            return moved, [event] if moved else []

        return work

    def _move_landed(self, override: Override, to_status: OverrideStatus, values: Mapping[str, Any]) -> bool:
        """After a move's ambiguous commit (its acknowledgement lost, and the log could not say whether it
        happened): the request's state does (its events committed with it, or neither did). A release that
        did not land must not go ahead; one that did must (its grant is spent)."""
        current = self.store.get(override.id)
        return current is not None and current.status == to_status.value and (
            current.release_decision_id == values.get("release_decision_id"))


_EXPIRED = {OverrideStatus.PENDING: OverrideStatus.EXPIRED, OverrideStatus.NEEDS_INFO: OverrideStatus.EXPIRED,
            OverrideStatus.GRANTED: OverrideStatus.GRANT_EXPIRED}
MAX_QUESTION = 2000  # characters: a question for the agent, as long as the justification it may answer with
_EXPIRY_EVENTS = {OverrideStatus.EXPIRED: EventKind.EXPIRED, OverrideStatus.GRANT_EXPIRED: EventKind.GRANT_EXPIRED}
# A transaction-level advisory lock, keyed by schema like the migration lock: held by one sweeping
# process until its connection's transaction ends (the `with` in `expire_due`).
_SWEEP_LOCK = text("SELECT pg_try_advisory_xact_lock(hashtext('cedargate-expiry:' || coalesce(current_schema(), '')))")
_CHAIN_LOCK = text("SELECT pg_try_advisory_xact_lock(hashtext('cedargate-chains:' || coalesce(current_schema(), '')))")


_VOTE_FAILURES = (_Conflict, IntegrityError, OperationalError, StoreUnavailable, TimeoutError)


async def committed(future: Future[T]) -> T:
    """The outcome of a unit of work queued with `Recorder.transact_soon`, awaited on the event loop
    with one callback from the writer thread (as the enforcer awaits its record, `all_done`). A unit
    the writer did not start within its timeout was withdrawn: its future holds `TimeoutError`, as
    `transact` raises. Should the awaiting task be cancelled, the unit still runs to its outcome, as a
    thread's would."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    awaiting = contextvars.copy_context()  # the hand-back goes in the awaiting task's lane (urgency)

    def now_done() -> None:  # on the loop
        if not done.done():
            done.set_result(None)

    def on_thread(_: Future[T]) -> None:  # on the writer thread (or this one, if already done)
        if not loop.is_closed():
            loop.call_soon_threadsafe(now_done, context=awaiting)

    future.add_done_callback(on_thread)
    await done
    return future.result()


def _check_reason(reason: str) -> None:
    if not (reason or "").strip():
        # The reason is what the agent is told (a denial's, on its retry) and what the record keeps.
        raise OverrideError(422, "a reason is required: say why; it is shown to the agent and kept in the record")


def release_refused(recheck: Verdict, override: Override) -> bool:
    """Whether a call decided again (at release, or changed by an approval) may not go under the
    request's grant: a hard deny now (no permit beneath any more, say), or policies that need
    approvals nobody gave."""
    if recheck.outcome in (Outcome.DENY, Outcome.ERROR):
        return True
    granted_for = {p["id"] for p in json.loads(override.policies)}
    return recheck.outcome is Outcome.ESCALATE and not {p.policy_id for p in recheck.determining} <= granted_for


def stored_call(override: Override) -> Call:
    """The request's call as stored for its reviewers (query secrets and secret headers redacted)."""
    parts = urlsplit(override.url)
    default = {"http": 80, "https": 443}.get(parts.scheme, 80)
    return Call(agent=override.agent, method=override.method, scheme=parts.scheme, host=override.host,
                port=parts.port or default, path=override.path, query=parts.query,
                headers=json.loads(override.headers), body=override.body)


def _check_agreement(override: Override, others: set[str], changes: dict[str, Any] | None) -> None:
    """Raise 409 unless an approval brings the changes the request's earlier approvals agreed on."""
    agreed = json.loads(override.changes) if override.changes else None
    if agreed == changes:
        return
    who = ", ".join(sorted(others))
    said = f"with the changes {json.dumps(agreed)}" if agreed is not None else "as sent, without changes"
    raise OverrideError(409, f"{who} approved this request {said}; approvers must agree on what goes: "
                             "approve it the same way, or deny it", problem=Problem.OVERRIDE_CHANGES_DISAGREE,
                        changes=agreed)


def _observe_review(override: Override) -> None:
    """How long the request waited for its reviewers, in the metrics (by the process whose vote decided it)."""
    if override.decided_at is None:
        return
    waited = (aware(override.decided_at) - aware(override.created_at)).total_seconds()
    observe_review((p["id"] for p in json.loads(override.policies)), override.status, waited)


def check_voter(override: Override, approver: str, roles: frozenset[str], now: datetime) -> None:
    """Raise `OverrideError` unless `approver`, holding `roles`, may vote on `override` now."""
    if OverrideStatus(override.status) not in UNDECIDED:
        raise OverrideError(409, f"the override request is {override.status}, not pending")
    if approver == override.agent:
        raise OverrideError(403, "an approver cannot decide on a call made under their own identity")
    if aware(override.expires_at) <= now:
        raise OverrideError(409, "the override request has expired")
    needed = reachable_roles(override, now)
    if not roles & needed:
        chain = chain_of(override)
        later = [(number, tier) for number, tier in enumerate(chain.tiers, start=1) if roles & set(tier.roles)]
        if later:
            # A later tier's approver: not yet, and the answer says when.
            number, tier = later[0]
            opens = at_offset(override.created_at, tier.after)
            assert opens is not None
            raise OverrideError(403, f"{approver} may decide this request from its escalation tier {number}, "
                                     f"reached at {opens.isoformat(timespec='seconds')} (in "
                                     f"{max(1, math.ceil((opens - now).total_seconds()))} s); until then it "
                                     f"needs {', '.join(sorted(needed))}")
        raise OverrideError(
            403, f"{approver} holds none of the roles this request needs ({', '.join(sorted(needed))})"
        )


def _is_new(session: Session, store: OverrideStore, override: Override, justification: str) -> bool:
    """Whether a retry's justification answers the question: one the request has not heard before."""
    heard = {override.justification} | {m.text for m in store.conversation(session, override.id)
                                        if m.kind == MessageKind.ANSWER.value}
    return justification not in heard


def _session(conn: Connection) -> Session:
    # Joins the connection's transaction: the session's commit only flushes, and the transaction commits
    # (or rolls back) with the audit rows the recorder appends after the work.
    return Session(bind=conn, expire_on_commit=False)


def _event(kind: EventKind, override: Override, *, decision_id: str | None = None, actor: str | None = None,
           payload: Mapping[str, Any] | None = None) -> Event:
    return {"kind": kind.value, "override_id": override.id, "decision_id": decision_id,
            "agent": override.agent,
            "actor": actor, "payload": dict(payload or {})}
