"""Oversight: an escalatable denial held for a human, then released once or refused with the reason why.

These run the real core (`Runtime.start`: Cedar engine, SQLite record, override store, holds) with no
proxy in front: a verdict from the gate goes into `Oversight.resolve`, and a reviewer on another thread
votes through the workflow, which wakes the hold, as the override API does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from proxy_support import make_call, wait_until, write_policy_file
from sqlalchemy.exc import OperationalError

from proxy.decision.gate import Outcome, Verdict
from proxy.oversight.held_calls import Resolution, requested_wait
from proxy.oversight.overrides import OverrideError
from proxy.record.store import AmbiguousCommit, StoreUnavailable
from proxy.runtime import Runtime
from proxy.settings.config import AgentCredential, ApproverCredential, Settings
from proxy.vocabulary.problems import Problem

STOP_URL = "http://127.0.0.1:9000/v1/instances/i-1/stop"
REASON = "Stopping an instance on a production-critical host needs a human decision."


# --- Prefer: how long the agent is willing to be held ---------------------------------------------


@pytest.mark.parametrize(
    ("prefer", "expected"),
    [
        (None, 55.0),
        ("", 55.0),
        ("wait=5", 5.0),
        ("wait = 7", 7.0),
        ("WAIT=3", 3.0),
        ("wait=0", 0.0),
        ("wait=600", 55.0),
        ("respond-async", 0.0),
        ("return=minimal, wait=4", 4.0),
        ("garbage", 55.0),
        ("wait=soon", 55.0),
        ("wait=-1", 55.0),
    ],
)
def test_requested_wait(prefer: str | None, expected: float):
    assert requested_wait(prefer, 55.0) == expected


@pytest.mark.parametrize("prefer", ["wait=5, respond-async", "respond-async, wait=5"])
def test_respond_async_with_a_wait_holds_for_that_wait(prefer: str):
    assert requested_wait(prefer, 55.0) == 5.0


# --- resolve, end to end at the core --------------------------------------------------------------


def credential_hash(name: str) -> str:
    return hashlib.sha256(f"token-of-{name}".encode()).hexdigest()


@pytest.fixture
def runtime_settings() -> dict[str, Any]:
    def approver(*roles: str) -> ApproverCredential:
        return ApproverCredential(token_sha256=credential_hash("|".join(roles)), roles=roles)

    return {
        "approvers": {"erin": approver("engineering-manager"), "sam": approver("security")},
        "agents": {"ops-bot": AgentCredential(token_sha256=credential_hash("ops-bot"))},
    }


def stop_verdict(runtime: Runtime, body: bytes = b'{"grace": 30}') -> Verdict:
    verdict = runtime.gate.decide(make_call("POST", STOP_URL, body=body,
                                            headers={"Content-Type": "application/json"}))
    assert verdict.outcome is Outcome.ESCALATE
    return verdict


def resolve(runtime: Runtime, verdict: Verdict, wait: float, *, justification: str | None = None,
            alive: bool = True) -> Resolution:
    return asyncio.run(runtime.oversight.resolve(verdict, wait, justification, client_alive=lambda: alive))


class Reviewer(threading.Thread):
    """A human on another thread: waits for the pending request, then acts on it and wakes the hold."""

    def __init__(self, runtime: Runtime, act: str, approver: str = "erin",
                 reason: str = "checked with on-call") -> None:
        super().__init__(daemon=True)
        self.runtime, self.act, self.approver, self.reason = runtime, act, approver, reason
        self.override_id: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            store = self.runtime.overrides
            wait_until(lambda: store.list(status="pending"), "a pending override request", timeout=10)
            [override] = store.list(status="pending")
            self.override_id = override.id
            if self.act == "sweep":
                self.runtime.workflow.expire_due()  # the core's expiry job, run once; it wakes the hold
            else:
                roles = self.runtime.roles_of(self.approver)
                self.runtime.workflow.vote(override.id, self.approver, roles, self.act, self.reason)
        except BaseException as exc:  # reported by finish(), in the test's thread
            self.error = exc

    def finish(self) -> str:
        self.join(timeout=15)
        assert not self.is_alive(), "the reviewer thread did not finish"
        if self.error:
            raise self.error
        assert self.override_id is not None
        return self.override_id


def events(runtime: Runtime, override_id: str) -> list[sqlite3.Row]:
    """The audit events recorded about one override, read from the file as an operator would."""
    assert runtime.recorder.flush(10)
    con = sqlite3.connect(runtime.settings.state_dir / "cedargate.db")
    con.row_factory = sqlite3.Row
    try:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'audit_log'").fetchone():
            pytest.skip("the audit_log table does not exist yet, so override events cannot be checked")
        query = "SELECT * FROM audit_log WHERE override_id = ? ORDER BY seq"
        return con.execute(query, (override_id,)).fetchall()
    finally:
        con.close()


def test_without_waiting_the_agent_is_told_a_request_is_pending(runtime: Runtime):
    verdict = stop_verdict(runtime)
    resolution = resolve(runtime, verdict, 0, justification="instance is wedged")

    assert not resolution.release
    refused = resolution.verdict
    assert refused.problem is Problem.OVERRIDE_PENDING and refused.status == 403
    assert refused.extra_headers["Retry-After"] == "10"
    body = refused.problem_body()
    assert body["type"] == "urn:cedargate:problem:override-pending"
    assert body["decision_id"] == verdict.decision_id
    assert body["override_id"] == resolution.override_id
    assert body["override_status"] == "pending"
    assert body["override_url"] == f"{runtime.api_base_url}/overrides/{resolution.override_id}"
    assert body["required_roles"] == ["engineering-manager"] and body["retry_after"] == 10
    assert body["detail"].startswith(REASON) and "retry the identical call" in body["detail"]

    stored = runtime.overrides.get(resolution.override_id)
    assert stored.status == "pending" and stored.justification == "instance is wedged"
    assert stored.decision_id == verdict.decision_id
    assert json.loads(stored.policies)[0]["id"] == "protect-production-instances"

    # Asking again joins the same request instead of opening another.
    assert resolve(runtime, stop_verdict(runtime), 0).override_id == resolution.override_id

    [created] = events(runtime, resolution.override_id)
    assert (created["kind"], created["decision_id"], created["agent"]) == (
        "override_created", verdict.decision_id, "ops-bot"
    )
    assert json.loads(created["payload"])["justification"] == "instance is wedged"


def test_a_held_call_is_released_once_when_approved(runtime: Runtime):
    verdict = stop_verdict(runtime)
    reviewer = Reviewer(runtime, "approve")
    reviewer.start()
    resolution = resolve(runtime, verdict, 5)
    override_id = reviewer.finish()

    assert resolution.release and resolution.override_id == override_id
    stored = runtime.overrides.get(override_id)
    assert stored.status == "released" and stored.release_decision_id == verdict.decision_id

    # The grant admitted exactly one call: the identical call again is a new request.
    again = resolve(runtime, stop_verdict(runtime), 0)
    assert not again.release and again.verdict.problem is Problem.OVERRIDE_PENDING
    assert again.override_id != override_id
    assert runtime.overrides.get(again.override_id).status == "pending"

    recorded = events(runtime, override_id)
    # The vote is recorded by the workflow that took it (erin's approval, then the grant it made).
    assert [e["kind"] for e in recorded] == ["override_created", "approval", "grant", "release"]
    assert [e["actor"] for e in recorded] == [None, "erin", "erin", None]
    created, *_, released = recorded
    assert {created["decision_id"], released["decision_id"]} == {verdict.decision_id}
    assert json.loads(released["payload"])["policy_revision"] == runtime.engine.status.revision
    assert [e["kind"] for e in events(runtime, again.override_id)] == ["override_created"]


def test_an_approval_releases_a_held_call_without_the_hold_reading_its_request_again(runtime: Runtime, monkeypatch):
    reads: list[str] = []
    read = runtime.overrides.get

    def counted(override_id: str) -> Any:
        reads.append(override_id)
        return read(override_id)

    monkeypatch.setattr(runtime.overrides, "get", counted)

    async def scenario() -> tuple[Resolution, str]:
        verdict = stop_verdict(runtime)
        hold = asyncio.create_task(runtime.oversight.resolve(verdict, 5, None, client_alive=lambda: True))
        while not reads:  # held, and its one read after subscribing done: the request is pending
            await asyncio.sleep(0.005)
        [override_id] = runtime.holds.waiting()
        await asyncio.to_thread(runtime.workflow.vote, override_id, "erin", runtime.roles_of("erin"), "approve",
                                "checked with on-call")
        return await hold, override_id

    resolution, override_id = asyncio.run(scenario())
    # The vote's wake-up brought the grant as committed: released by its conditional update, not a re-read.
    assert resolution.release and resolution.override_id == override_id
    assert reads == [override_id]
    assert runtime.overrides.get(override_id).status == "released"
    assert [e["kind"] for e in events(runtime, override_id)] == ["override_created", "approval", "grant", "release"]


def test_an_approval_committed_while_the_hold_reads_its_request_still_wakes_it(runtime: Runtime, monkeypatch):
    """The hold subscribes, then reads: a decision committed during that read must end its sleep, or a
    call held without end (`hold_max_wait: .inf`) would wait for ever on a request already granted."""
    read = runtime.overrides.get

    def approved_meanwhile(override_id: str) -> Any:
        pending = read(override_id)  # the hold's read (on a thread) sees the request pending
        monkeypatch.setattr(runtime.overrides, "get", read)
        runtime.workflow.vote(override_id, "erin", runtime.roles_of("erin"), "approve", "ok")  # and wakes it
        return pending

    monkeypatch.setattr(runtime.overrides, "get", approved_meanwhile)

    async def scenario() -> Resolution:
        hold = runtime.oversight.resolve(stop_verdict(runtime), math.inf, None, client_alive=lambda: True)
        return await asyncio.wait_for(hold, 60)  # a guard against a hang, not a measure

    resolution = asyncio.run(scenario())
    assert resolution.release
    assert runtime.overrides.get(resolution.override_id).status == "released"


def test_the_override_id_is_logged_when_the_hold_starts(runtime: Runtime, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="proxy.oversight.held_calls")
    logged_while_held: list[str] = []

    class Operator(Reviewer):
        """Looks for the request's id in the log while the call is still held, then approves it."""

        def run(self) -> None:
            try:
                store = self.runtime.overrides
                wait_until(lambda: store.list(status="pending"), "a pending override request", timeout=10)
                [override] = store.list(status="pending")
                wait_until(lambda: any(override.id in r.getMessage() and "holding" in r.getMessage()
                                       for r in caplog.records), "the hold's log line", timeout=10)
                logged_while_held.append(override.id)
            except BaseException as exc:
                self.error = exc
                return
            super().run()

    operator = Operator(runtime, "approve")
    operator.start()
    resolution = resolve(runtime, stop_verdict(runtime), 10)
    override_id = operator.finish()
    assert resolution.release and logged_while_held == [override_id]


def test_a_held_call_denied_gets_the_reviewers_reason(runtime: Runtime):
    reviewer = Reviewer(runtime, "deny", reason="customer traffic peak; stop it tonight")
    reviewer.start()
    resolution = resolve(runtime, stop_verdict(runtime), 5)
    override_id = reviewer.finish()

    assert not resolution.release and resolution.override_id == override_id
    body = resolution.verdict.problem_body()
    assert body["type"] == "urn:cedargate:problem:override-denied" and body["status"] == 403
    assert body["detail"] == "a reviewer denied the override: customer traffic peak; stop it tonight"
    assert body["override_status"] == "denied"
    assert runtime.overrides.get(override_id).status == "denied"


def test_a_held_call_is_answered_with_the_reviewers_question_and_its_answer_is_held_again(runtime: Runtime):
    asker = Asker(runtime, "Which customers are on i-1?")
    asker.start()
    asked = resolve(runtime, stop_verdict(runtime), 10, justification="instance is wedged")
    override_id = asker.finish()

    assert not asked.release and asked.override_id == override_id
    body = asked.verdict.problem_body()
    assert body["type"] == "urn:cedargate:problem:override-needs-info" and body["status"] == 403
    assert body["question"] == "Which customers are on i-1?" and body["override_id"] == override_id
    assert body["override_status"] == "needs_info" and "Which customers are on i-1?" in body["detail"]
    assert "X-Agent-Justification" in body["next_step"]

    # A retry that says nothing new hears the question again, at once.
    again = resolve(runtime, stop_verdict(runtime), 5, justification="instance is wedged")
    assert again.verdict.problem is Problem.OVERRIDE_NEEDS_INFO and again.override_id == override_id

    # The answer makes the request pending, and this retry is held until the reviewer approves.
    approver = Reviewer(runtime, "approve")
    approver.start()
    answered = resolve(runtime, stop_verdict(runtime), 10, justification="none: drained at 09:00")
    assert approver.finish() == override_id
    assert answered.release and answered.override_id == override_id
    assert [(m.kind, m.text) for m in runtime.overrides.messages(override_id)] == [
        ("question", "Which customers are on i-1?"), ("answer", "none: drained at 09:00")]
    assert [e["kind"] for e in events(runtime, override_id)] == [
        "override_created", "info_requested", "info_given", "approval", "grant", "release"]


class Asker(Reviewer):
    """A reviewer who asks the agent a question instead of deciding."""

    def __init__(self, runtime: Runtime, question: str) -> None:
        super().__init__(runtime, "ask")
        self.question = question

    def run(self) -> None:
        try:
            store = self.runtime.overrides
            wait_until(lambda: store.list(status="pending"), "a pending override request", timeout=10)
            [override] = store.list(status="pending")
            self.override_id = override.id
            self.runtime.workflow.request_info(override.id, "erin", self.runtime.roles_of("erin"), self.question)
        except BaseException as exc:
            self.error = exc


def test_a_held_call_denied_tells_the_agent_once_and_its_retry_asks_again(runtime: Runtime):
    reviewer = Reviewer(runtime, "deny", reason="not during the sale")
    reviewer.start()
    denied = resolve(runtime, stop_verdict(runtime), 5)
    override_id = reviewer.finish()
    assert denied.verdict.problem is Problem.OVERRIDE_DENIED
    assert denied.verdict.problem_body()["reason"] == "not during the sale"
    assert [e["kind"] for e in events(runtime, override_id)][-1] == "outcome_told"

    again = resolve(runtime, stop_verdict(runtime), 0)
    assert again.verdict.problem is Problem.OVERRIDE_PENDING and again.override_id != override_id


def test_an_agent_that_did_not_wait_learns_the_denial_and_its_reason_on_its_retry(runtime: Runtime):
    first = resolve(runtime, stop_verdict(runtime), 0)  # Prefer: respond-async
    assert first.verdict.problem is Problem.OVERRIDE_PENDING
    runtime.workflow.vote(first.override_id, "erin", runtime.roles_of("erin"), "deny", "not during the sale")

    told = resolve(runtime, stop_verdict(runtime), 0)
    body = told.verdict.problem_body()
    assert (body["type"], body["override_id"]) == ("urn:cedargate:problem:override-denied", first.override_id)
    assert body["reason"] == "not during the sale" and "not during the sale" in body["detail"]
    assert resolve(runtime, stop_verdict(runtime), 0).override_id not in (None, first.override_id)


def test_a_held_call_whose_request_expires_is_refused_as_expired(runtime: Runtime, policy_dir: Path):
    ops = policy_dir / "ops.cedar"
    write_policy_file(ops, ops.read_text().replace('@expires("30m")', '@expires("0s")'))
    assert runtime.engine.reload()
    reviewer = Reviewer(runtime, "sweep")  # the core's expiry job, run once
    reviewer.start()
    resolution = resolve(runtime, stop_verdict(runtime), 5)
    override_id = reviewer.finish()

    assert not resolution.release
    assert resolution.verdict.problem is Problem.OVERRIDE_EXPIRED
    assert runtime.overrides.get(override_id).status == "expired"
    # The held call told the agent how it ended: its retry asks the reviewers again.
    assert [e["kind"] for e in events(runtime, override_id)] == ["override_created", "expired", "outcome_told"]
    again = resolve(runtime, stop_verdict(runtime), 0)
    assert again.verdict.problem is Problem.OVERRIDE_PENDING and again.override_id != override_id


def test_a_grant_waits_for_the_agents_retry_when_the_held_client_went_away(runtime: Runtime):
    verdict = stop_verdict(runtime)
    override_id = resolve(runtime, verdict, 0).override_id
    runtime.workflow.vote(override_id, "erin", runtime.roles_of("erin"), "approve", "ok")

    gone = resolve(runtime, verdict, 5, alive=False)
    assert not gone.release and gone.verdict.problem is Problem.OVERRIDE_PENDING
    assert runtime.overrides.get(override_id).status == "granted"  # not spent on a call nobody waits for

    retry = resolve(runtime, stop_verdict(runtime), 0)
    assert retry.release and retry.override_id == override_id
    assert runtime.overrides.get(override_id).status == "released"


def test_two_held_identical_calls_share_the_grant_and_only_one_goes_through(runtime: Runtime):
    async def scenario() -> tuple[list[Resolution], str]:
        oversight, holds = runtime.oversight, runtime.holds
        calls = [asyncio.create_task(oversight.resolve(verdict, 1.5, None, client_alive=lambda: True))
                 for verdict in (stop_verdict(runtime), stop_verdict(runtime))]
        for _ in range(2000):  # both calls held on the one request before the human decides
            if holds.held == 2:
                break
            await asyncio.sleep(0.005)
        assert holds.held == 2
        [request] = runtime.overrides.list(status="pending")
        erin = runtime.roles_of("erin")
        await asyncio.to_thread(runtime.workflow.vote, request.id, "erin", erin, "approve", "ok")
        return list(await asyncio.gather(*calls)), request.id

    resolutions, granted_id = asyncio.run(scenario())
    released = [r for r in resolutions if r.release]
    refused = [r for r in resolutions if not r.release]
    assert len(released) == 1 and released[0].override_id == granted_id
    # The other identical call found the grant spent: it is a new decision, waiting for its own review.
    [other] = refused
    assert other.verdict.problem is Problem.OVERRIDE_PENDING and other.override_id != granted_id
    assert runtime.overrides.get(granted_id).status == "released"
    assert runtime.overrides.get(other.override_id).status == "pending"


def test_two_held_identical_calls_approved_on_the_event_loop_release_one_and_the_other_asks_again(
        runtime: Runtime):
    async def scenario() -> tuple[list[Resolution], str]:
        verdicts = (stop_verdict(runtime), stop_verdict(runtime))
        calls = [asyncio.create_task(runtime.oversight.resolve(verdict, 1.5, None, client_alive=lambda: True))
                 for verdict in verdicts]
        for _ in range(2000):  # both asleep on the one request before the human decides
            [request] = runtime.overrides.list(status="pending") or [None]
            if request is not None and runtime.holds.held == 2 and runtime.holds.asleep(request.id):
                break
            await asyncio.sleep(0.005)
        assert request is not None
        await runtime.workflow.vote_soon(request.id, "erin", runtime.roles_of("erin"), "approve", "ok")
        return list(await asyncio.gather(*calls)), request.id

    resolutions, granted_id = asyncio.run(scenario())
    [released] = [r for r in resolutions if r.release]
    [other] = [r for r in resolutions if not r.release]
    assert released.override_id == granted_id
    assert runtime.overrides.get(granted_id).release_decision_id == released.verdict.decision_id
    assert other.verdict.problem is Problem.OVERRIDE_PENDING and other.override_id != granted_id
    assert [e["kind"] for e in events(runtime, granted_id)] == ["override_created", "approval", "grant", "release"]


def make_stop_a_hard_deny(runtime: Runtime, policy_dir: Path) -> None:
    ops = policy_dir / "ops.cedar"
    write_policy_file(ops, ops.read_text().replace('@escalate("engineering-manager")\n', ""))
    assert runtime.engine.reload()
    assert runtime.gate.decide(make_call("POST", STOP_URL)).outcome is Outcome.DENY


def test_release_is_refused_when_current_policy_now_hard_denies_the_call(runtime: Runtime, policy_dir: Path):
    verdict = stop_verdict(runtime)
    override_id = resolve(runtime, verdict, 0).override_id
    _, changed = runtime.workflow.vote(override_id, "erin", runtime.roles_of("erin"), "approve", "ok")
    assert changed

    make_stop_a_hard_deny(runtime, policy_dir)
    resolution = resolve(runtime, verdict, 5)

    assert not resolution.release and resolution.override_id == override_id
    body = resolution.verdict.problem_body()
    assert body["type"] == "urn:cedargate:problem:override-release-refused" and body["status"] == 403
    assert body["decision_id"] == verdict.decision_id
    assert body["detail"].startswith("the override was granted, but the current policies refuse the call: ")
    assert REASON in body["detail"]
    assert body["policy_revision"] == runtime.engine.status.revision != verdict.revision
    assert runtime.overrides.get(override_id).status == "release_refused"
    assert [e["kind"] for e in events(runtime, override_id)] == [
        "override_created", "approval", "grant", "release_refused"]


def test_a_refused_release_reports_the_requests_current_status(runtime: Runtime, policy_dir: Path):
    verdict = stop_verdict(runtime)
    override_id = resolve(runtime, verdict, 0).override_id
    runtime.workflow.vote(override_id, "erin", runtime.roles_of("erin"), "approve", "ok")
    make_stop_a_hard_deny(runtime, policy_dir)

    body = resolve(runtime, verdict, 0).verdict.problem_body()

    assert body["override_status"] == runtime.overrides.get(override_id).status == "release_refused"


# --- calls for which no request may be opened -----------------------------------------------------


@pytest.fixture
def limited(policy_dir: Path, tmp_path: Path) -> Iterator[Runtime]:
    """A core whose agents may have one pending request, open two a minute, with bodies up to 64 bytes."""
    settings = Settings(policy_dir=policy_dir, state_dir=tmp_path / "state", policy_reload_interval=0,
                        max_pending_overrides_per_agent=1, override_rate=2, max_override_body_bytes=64)
    started = Runtime.start(settings)
    try:
        yield started
    finally:
        started.close()
        started.recorder.engine.dispose()


def refused_events(runtime: Runtime) -> list[sqlite3.Row]:
    assert runtime.recorder.flush(10)
    with sqlite3.connect(runtime.settings.state_dir / "cedargate.db") as con:
        con.row_factory = sqlite3.Row
        return con.execute("SELECT * FROM audit_log WHERE kind = 'override_refused' ORDER BY seq").fetchall()


def test_past_the_pending_cap_the_call_is_refused_at_once_with_retry_after(limited: Runtime):
    first = resolve(limited, stop_verdict(limited), 0)
    assert first.verdict.problem is Problem.OVERRIDE_PENDING

    other = limited.gate.decide(make_call("POST", STOP_URL.replace("i-1", "i-2")))
    refused = resolve(limited, other, 5)  # not held: refused before any request exists to wait on

    assert not refused.release and refused.override_id is None
    body = refused.verdict.problem_body()
    assert body["type"] == "urn:cedargate:problem:too-many-pending-overrides" and body["status"] == 429
    assert body["detail"].startswith(REASON) and "max_pending_overrides_per_agent" in body["detail"]
    assert 1 <= body["retry_after"] <= 60
    assert refused.verdict.extra_headers["Retry-After"] == str(body["retry_after"])
    assert [o.id for o in limited.overrides.list()] == [first.override_id]
    # The identical call of the pending request still finds it.
    assert resolve(limited, stop_verdict(limited), 0).override_id == first.override_id

    [event] = refused_events(limited)
    assert (event["decision_id"], event["agent"], event["override_id"]) == (
        other.decision_id, "ops-bot", None)
    payload = json.loads(event["payload"])
    assert payload["reason"] == "too-many-pending" and payload["policies"] == ["protect-production-instances"]


def test_an_escalated_call_with_a_body_too_large_to_review_is_refused_with_413(limited: Runtime):
    big = stop_verdict(limited, body=json.dumps({"grace": 30, "note": "x" * 64}).encode())
    refused = resolve(limited, big, 5)

    body = refused.verdict.problem_body()
    assert body["type"] == "urn:cedargate:problem:override-body-too-large" and body["status"] == 413
    assert "max_override_body_bytes" in body["detail"] and "Retry-After" not in refused.verdict.extra_headers
    assert limited.overrides.list() == []
    assert json.loads(refused_events(limited)[0]["payload"])["reason"] == "body-too-large"


# -- settle: the one question an adapter asks of a decided call -------------------------------------------

def settle(runtime: Runtime, verdict: Verdict, wait: float = 0.0) -> Resolution:
    return asyncio.run(runtime.oversight.settle(verdict, wait, None, client_alive=lambda: True))


def test_settle_releases_an_allowed_call_and_opens_nothing(runtime: Runtime):
    verdict = runtime.gate.decide(make_call("GET", "http://127.0.0.1:9000/v1/instances"))
    assert verdict.allowed
    assert settle(runtime, verdict) == Resolution(True, verdict)
    assert runtime.overrides.list(status="pending") == []


def test_settle_refuses_a_hard_deny_as_decided(runtime: Runtime):
    verdict = runtime.gate.decide(make_call("GET", "http://127.0.0.1:9000/v1/instances", agent="stranger"))
    assert verdict.outcome is Outcome.DENY  # no policy permits an unknown agent: nothing to grant
    assert settle(runtime, verdict) == Resolution(False, verdict)


def test_settle_holds_an_escalated_call_and_opens_its_request(runtime: Runtime):
    resolution = settle(runtime, stop_verdict(runtime))
    assert not resolution.release
    assert resolution.verdict.problem is Problem.OVERRIDE_PENDING
    assert [o.id for o in runtime.overrides.list(status="pending")] == [resolution.override_id]


def test_settle_refuses_an_escalated_call_whose_request_cannot_be_stored(runtime: Runtime, monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(runtime.workflow, "open", broken)
    verdict = stop_verdict(runtime)
    resolution = settle(runtime, verdict)
    assert not resolution.release
    assert resolution.verdict.problem is verdict.problem
    assert resolution.verdict.detail.endswith("(the override request could not be handled; the call was refused)")
    assert "disk full" not in resolution.verdict.problem_json().decode()


def test_store_trouble_on_the_override_path_is_answered_503_without_the_drivers_words(
        runtime: Runtime, monkeypatch):
    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("INSERT INTO overrides", {}, Exception(
            'connection to server at "db.internal" (10.0.0.7), port 5432 failed: Connection refused'))

    monkeypatch.setattr(runtime.workflow, "open", unreachable)
    resolution = settle(runtime, stop_verdict(runtime))
    assert not resolution.release
    refused = resolution.verdict
    assert refused.problem is Problem.STORE_UNAVAILABLE and refused.status == 503
    assert refused.extra_headers["Retry-After"] == "5"
    shown = refused.problem_json().decode()
    assert "10.0.0.7" not in shown and "5432" not in shown and "db.internal" not in shown


# --- store trouble while a call is held -------------------------------------------------------------

class FailingReads:
    """The override store's reads, and the release's write, failing as a driver fails them while `down`
    is set (a store outage). A reviewer's vote still lands: it is cast just before the outage is felt."""

    def __init__(self, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
        self.down = threading.Event()
        self.failed = 0
        read, release = runtime.overrides.get, runtime.workflow.release_soon

        def refused() -> OperationalError:
            return OperationalError("SELECT overrides", {}, Exception(
                'connection to server at "db.internal" (10.0.0.7), port 5432 failed: Connection refused'))

        def get(override_id: str) -> Any:
            if self.down.is_set():
                self.failed += 1
                raise refused()
            return read(override_id)

        async def failing_release(*args: Any, **kwargs: Any) -> bool:
            if self.down.is_set():  # the hold woken with the grant goes straight to its release
                raise refused()
            return await release(*args, **kwargs)

        monkeypatch.setattr(runtime.overrides, "get", get)
        monkeypatch.setattr(runtime.workflow, "release_soon", failing_release)


def held_while_the_store_fails(runtime: Runtime, reads: FailingReads, wait: float, recover: bool) -> Resolution:
    """Hold a call; the store fails; a reviewer approves; the hold finds it cannot read; then the store
    comes back (`recover`) or stays down."""
    async def scenario() -> Resolution:
        hold = asyncio.create_task(runtime.oversight.resolve(stop_verdict(runtime), wait, None,
                                                             client_alive=lambda: True))
        while not runtime.holds.waiting():
            await asyncio.sleep(0.01)
        [override_id] = runtime.holds.waiting()
        reads.down.set()
        await asyncio.to_thread(runtime.workflow.vote, override_id, "erin", runtime.roles_of("erin"), "approve",
                                "checked with on-call")
        while not reads.failed:  # the grant woke the hold, and its read failed
            await asyncio.sleep(0.01)
        assert not hold.done(), "a held call was answered while the store failed"
        if recover:
            reads.down.clear()
        return await hold

    return asyncio.run(scenario())


def test_a_call_approved_while_the_store_fails_keeps_holding_and_goes_once_the_store_is_back(
        runtime: Runtime, monkeypatch):
    reads = FailingReads(runtime, monkeypatch)
    resolution = held_while_the_store_fails(runtime, reads, wait=30, recover=True)
    assert resolution.release
    assert runtime.overrides.get(resolution.override_id).status == "released"


def test_a_held_call_whose_store_stays_down_is_answered_503_when_its_hold_ends(runtime: Runtime, monkeypatch):
    reads = FailingReads(runtime, monkeypatch)
    resolution = held_while_the_store_fails(runtime, reads, wait=2, recover=False)
    assert not resolution.release
    refused = resolution.verdict
    assert refused.problem is Problem.STORE_UNAVAILABLE and refused.status == 503
    assert refused.extra_headers["Retry-After"] == "5"
    assert "10.0.0.7" not in refused.problem_json().decode() and "5432" not in refused.problem_json().decode()
    reads.down.clear()
    assert runtime.overrides.get(resolution.override_id).status == "granted"  # kept for the retry


# --- an approval cast from the event loop (the API's approve and deny) ------------------------------

async def asleep(runtime: Runtime) -> str:
    """The id of the one request a call is held on, once that hold sleeps waiting for a decision."""
    for _ in range(2000):
        waiting = runtime.holds.waiting()
        if waiting and runtime.holds.asleep(next(iter(waiting))):
            [override_id] = waiting
            return override_id
        await asyncio.sleep(0.005)
    raise AssertionError("no held call went to sleep")


def held_and_voted_from_the_loop(runtime: Runtime, ballot: str = "approve",
                                 once_held: Callable[[], object] = lambda: None,
                                 verdict: Verdict | None = None) -> tuple[Resolution, str, Any]:
    """Hold a call, then (after `once_held`) cast a vote on the same event loop, as the API's routes do
    (`vote_soon`)."""
    async def scenario() -> tuple[Resolution, str, Any]:
        hold = asyncio.create_task(runtime.oversight.resolve(verdict or stop_verdict(runtime), 5, None,
                                                             client_alive=lambda: True))
        override_id = await asleep(runtime)
        once_held()
        voted = await runtime.workflow.vote_soon(override_id, "erin", runtime.roles_of("erin"), ballot,
                                                 "checked with on-call")
        return await hold, override_id, voted

    return asyncio.run(scenario())


def test_an_approval_cast_on_the_event_loop_releases_the_held_call_once(runtime: Runtime):
    resolution, override_id, (voted, decided) = held_and_voted_from_the_loop(runtime)
    assert decided and voted.id == override_id and voted.status == "granted"
    assert resolution.release and resolution.override_id == override_id
    assert runtime.overrides.get(override_id).status == "released"
    recorded = events(runtime, override_id)
    assert [e["kind"] for e in recorded] == ["override_created", "approval", "grant", "release"]
    assert [e["actor"] for e in recorded] == [None, "erin", "erin", None]


def test_an_approval_on_the_event_loop_commits_the_held_calls_release_with_its_grant(runtime: Runtime, monkeypatch):
    queued: list[str] = []
    queue = runtime.recorder.transact_soon

    def counted(work: Any, timeout: float | None = None, **options: Any) -> Future[Any]:
        queued.append(getattr(work, "func", work).__name__)
        return queue(work, timeout, **options)

    verdict = stop_verdict(runtime)
    resolution, override_id, (voted, decided) = held_and_voted_from_the_loop(
        runtime, once_held=lambda: monkeypatch.setattr(runtime.recorder, "transact_soon", counted),
        verdict=verdict)
    # One transaction from the approval to the call's way upstream: the vote's, with the release in it.
    assert queued == ["_vote_releasing"]
    assert decided and voted.status == "granted"  # the approver is answered with what the vote did
    assert resolution.release and resolution.override_id == override_id
    stored = runtime.overrides.get(override_id)
    assert stored.status == "released" and stored.release_decision_id == verdict.decision_id
    recorded = events(runtime, override_id)
    assert [e["kind"] for e in recorded] == ["override_created", "approval", "grant", "release"]
    released = recorded[-1]
    assert released["decision_id"] == verdict.decision_id and released["actor"] is None
    assert json.loads(released["payload"]) == {"policy_revision": runtime.engine.status.revision,
                                               "recheck": "escalate",
                                               "policies": ["protect-production-instances"]}


class PausedVote:
    """From now on the vote's transaction pauses on the writer, before its statements or after them (its
    commit still to come), until the test lets it go on: something happens to its held call meanwhile."""

    def __init__(self, runtime: Runtime, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
        self.paused, self.go = threading.Event(), threading.Event()
        voting = runtime.workflow._vote_releasing

        def paused(conn: Any, **vote: Any) -> Any:
            if where == "before":
                self.pause()
            voted = voting(conn, **vote)
            if where == "after":
                self.pause()
            return voted

        monkeypatch.setattr(runtime.workflow, "_vote_releasing", paused)

    def pause(self) -> None:
        self.paused.set()
        assert self.go.wait(30), "the test never let the vote go on"


def approved_while(runtime: Runtime, vote: PausedVote, meanwhile: Callable[[asyncio.Task[Resolution]], Any],
                   wait: float = 5, client_alive: Callable[[], bool] = lambda: True
                   ) -> tuple[Resolution | None, str]:
    """Hold a call; once it sleeps, approve it from the loop and, while the vote is paused on the writer,
    await `meanwhile` (given the held call's task); the held call's answer (None if it was cancelled) and
    its request."""
    async def scenario() -> tuple[Resolution | None, str]:
        hold = asyncio.create_task(runtime.oversight.resolve(stop_verdict(runtime), wait, None,
                                                             client_alive=client_alive))
        override_id = await asleep(runtime)
        voting = asyncio.create_task(runtime.workflow.vote_soon(override_id, "erin", runtime.roles_of("erin"),
                                                                "approve", "ok"))
        assert await asyncio.to_thread(vote.paused.wait, 30)
        await meanwhile(hold)
        vote.go.set()
        await voting
        try:
            return await hold, override_id
        except asyncio.CancelledError:
            return None, override_id

    return asyncio.run(scenario())


async def cancelled(hold: asyncio.Task[Resolution]) -> None:
    hold.cancel()
    await asyncio.wait([hold])


async def answered(hold: asyncio.Task[Resolution]) -> None:
    await asyncio.wait([hold])


def test_a_hold_whose_time_runs_out_while_the_vote_releasing_it_commits_goes_upstream(runtime: Runtime,
                                                                                       monkeypatch):
    """The vote carries the hold's release; the hold's deadline comes while that transaction runs. The
    call goes, as its grant is spent for it, rather than be refused as still pending."""
    vote = PausedVote(runtime, monkeypatch, "before")
    resolution, override_id = approved_while(runtime, vote, lambda hold: asyncio.sleep(1.5), wait=1.0)
    assert resolution is not None and resolution.release and resolution.override_id == override_id
    assert runtime.overrides.get(override_id).status == "released"


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_held_call_cancelled_while_the_vote_releasing_it_commits_leaves_the_grant(runtime: Runtime,
                                                                                     monkeypatch, where: str):
    """The proxy stops, or mitmproxy ends the flow, while the vote carrying the call's release commits:
    the grant is not spent on a call nobody forwards. Cancelled before the vote's statements ran, the
    release is left out; after them, it is put back (`grant_restored`)."""
    resolution, override_id = approved_while(runtime, PausedVote(runtime, monkeypatch, where), cancelled)
    assert resolution is None
    wait_until(lambda: runtime.overrides.get(override_id).status == "granted", "the grant left for the retry")
    kinds = [e["kind"] for e in events(runtime, override_id)]
    assert kinds == ["override_created", "approval", "grant"] + (["release", "grant_restored"] if where == "after"
                                                                  else [])
    retry = resolve(runtime, stop_verdict(runtime), 0)
    assert retry.release and retry.override_id == override_id


def test_a_hold_that_stops_waiting_for_a_stuck_vote_answers_and_the_grant_is_left(runtime: Runtime, monkeypatch):
    """The writer is stuck in the vote's transaction past the hold's deadline and its wait for the vote
    (`PLEDGE_WAIT`): the agent is answered that the request is pending, and the release the transaction
    then commits is put back, since nobody forwards that call."""
    monkeypatch.setattr("proxy.oversight.held_calls.PLEDGE_WAIT", 0.2)
    resolution, override_id = approved_while(runtime, PausedVote(runtime, monkeypatch, "after"), answered, wait=1.0)
    assert resolution is not None and not resolution.release
    assert resolution.verdict.problem is Problem.OVERRIDE_PENDING
    wait_until(lambda: runtime.overrides.get(override_id).status == "granted", "the grant left for the retry")
    assert [e["kind"] for e in events(runtime, override_id)] == [
        "override_created", "approval", "grant", "release", "grant_restored"]


def test_a_held_client_gone_while_the_vote_releasing_it_commits_leaves_the_grant(runtime: Runtime, monkeypatch):
    alive = [True]

    async def gone(hold: asyncio.Task[Resolution]) -> None:
        alive[0] = False

    resolution, override_id = approved_while(runtime, PausedVote(runtime, monkeypatch, "after"), gone,
                                             client_alive=lambda: alive[0])
    assert resolution is not None and not resolution.release
    assert resolution.verdict.problem is Problem.OVERRIDE_PENDING
    wait_until(lambda: runtime.overrides.get(override_id).status == "granted", "the grant left for the retry")
    assert [e["kind"] for e in events(runtime, override_id)] == [
        "override_created", "approval", "grant", "release", "grant_restored"]


def test_a_release_checked_before_the_policies_changed_is_not_committed_with_the_vote(
        runtime: Runtime, monkeypatch, policy_dir: Path):
    """The hold's release was checked under the policies before a reload that hard-denies its call: the
    vote grants without it, and the hold, checking again, refuses the release."""
    async def reloaded(hold: asyncio.Task[Resolution]) -> None:
        make_stop_a_hard_deny(runtime, policy_dir)

    resolution, override_id = approved_while(runtime, PausedVote(runtime, monkeypatch, "before"), reloaded)
    assert resolution is not None and not resolution.release
    assert resolution.verdict.problem is Problem.RELEASE_REFUSED
    assert runtime.overrides.get(override_id).status == "release_refused"


def test_a_grant_on_the_event_loop_waits_for_the_retry_when_the_held_client_went_away(runtime: Runtime):
    alive = [True]

    async def scenario() -> tuple[Resolution, str]:
        hold = asyncio.create_task(runtime.oversight.resolve(stop_verdict(runtime), 5, None,
                                                             client_alive=lambda: alive[0]))
        override_id = await asleep(runtime)
        alive[0] = False
        await runtime.workflow.vote_soon(override_id, "erin", runtime.roles_of("erin"), "approve", "ok")
        return await hold, override_id

    resolution, override_id = asyncio.run(scenario())
    assert not resolution.release and resolution.verdict.problem is Problem.OVERRIDE_PENDING
    assert runtime.overrides.get(override_id).status == "granted"  # not spent on a call nobody waits for
    assert [e["kind"] for e in events(runtime, override_id)] == ["override_created", "approval", "grant"]


def test_a_denial_cast_on_the_event_loop_refuses_the_held_call_with_its_reason(runtime: Runtime):
    resolution, override_id, (voted, decided) = held_and_voted_from_the_loop(runtime, "deny")
    assert decided and voted.status == "denied"
    assert not resolution.release and resolution.verdict.problem is Problem.OVERRIDE_DENIED
    assert resolution.verdict.extra["reason"] == "checked with on-call"


def ambiguous(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, lost: list[str]) -> None:
    """From now on every unit of work queued from the loop commits, but its caller hears the connection
    was lost during COMMIT and the log could not say whether it happened (`AmbiguousCommit`)."""
    queue = runtime.recorder.transact_soon

    def transact_soon(work: Any, timeout: float | None = None, **options: Any) -> Future[Any]:
        answered: Future[Any] = Future()

        def lose(done: Future[Any]) -> None:
            lost.append(str(done.result()))  # it did commit
            answered.set_exception(AmbiguousCommit("the connection was lost while committing"))

        queue(work, timeout, **options).add_done_callback(lose)
        return answered

    monkeypatch.setattr(runtime.recorder, "transact_soon", transact_soon)


def test_a_vote_and_a_release_whose_commits_went_unacknowledged_are_read_back_and_the_call_goes_once(
        runtime: Runtime, monkeypatch):
    lost: list[str] = []
    resolution, override_id, (voted, decided) = held_and_voted_from_the_loop(
        runtime, once_held=lambda: ambiguous(runtime, monkeypatch, lost))
    assert len(lost) == 1  # the vote, and the held call's release with it, committed unacknowledged
    # The vote is found stored (cast once, not twice), read back as its transaction left the request.
    assert decided and voted.status == "released"
    assert resolution.release
    assert runtime.overrides.get(override_id).status == "released"
    assert [v.approver for v in runtime.overrides.votes(override_id)] == ["erin"]
    assert [e["kind"] for e in events(runtime, override_id)] == ["override_created", "approval", "grant", "release"]


def test_a_vote_cast_on_the_event_loop_while_the_store_fails_is_answered_503_and_not_recorded(
        runtime: Runtime, monkeypatch):
    async def scenario() -> tuple[OverrideError, str]:
        hold = asyncio.create_task(runtime.oversight.resolve(stop_verdict(runtime), 1, None,
                                                             client_alive=lambda: True))
        override_id = await asleep(runtime)  # its release is offered to the vote, which fails: it holds on

        def failing(work: Any, timeout: float | None = None, **options: Any) -> Future[Any]:
            raise StoreUnavailable('the decision store is failing: connection to "db.internal" refused')

        monkeypatch.setattr(runtime.recorder, "transact_soon", failing)
        with pytest.raises(OverrideError) as refused:
            await runtime.workflow.vote_soon(override_id, "erin", runtime.roles_of("erin"), "approve", "ok")
        monkeypatch.undo()
        await hold
        return refused.value, override_id

    refused, override_id = asyncio.run(scenario())
    assert refused.status == 503 and "retry" in refused.detail and "db.internal" not in refused.detail
    assert runtime.overrides.get(override_id).status == "pending"
    assert runtime.overrides.votes(override_id) == []
