"""Override requests on real databases: opening and joining, votes, expiry, the one-time grant, and races.

Every test runs against a temporary SQLite file and against PostgreSQL (an isolated schema), because
the store's promise, one consistent state whatever the interleaving, rests on each database's own
locking and must hold on both.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from proxy_support import make_call
from sqlalchemy import text
from sqlmodel import Session

from proxy.calls.mapping import Call
from proxy.cedar.escalation import Escalation, Requirement
from proxy.oversight.holds import Holds
from proxy.oversight.overrides import (
    Override,
    OverrideError,
    OverrideStatus,
    OverrideStore,
    fingerprint,
    fingerprints,
)
from proxy.oversight.workflow import OverrideWorkflow
from proxy.record.store import Recorder, make_engine, utcnow

STOP_URL = "http://127.0.0.1:9000/v1/instances/i-1/stop"
MANAGER = Requirement("protect-production-instances", ("engineering-manager",), 1)
TWO_MANAGERS = Requirement("two-managers", ("engineering-manager",), 2)
TWO_PERSON = Requirement("no-volume-deletion", ("security", "lead-engineer"), 2)

ERIN = ("erin", frozenset({"engineering-manager"}))
MAX = ("max", frozenset({"engineering-manager"}))
SAM = ("sam", frozenset({"security"}))
SUE = ("sue", frozenset({"security"}))
LEE = ("lee", frozenset({"lead-engineer"}))
PAT = ("pat", frozenset({"security", "lead-engineer"}))

ROUNDS = 4  # each race is repeated: one lucky interleaving proves little
THREADS = 8


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OverrideStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'overrides.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    database = make_engine(url)
    try:
        yield OverrideStore(database)
    finally:
        database.dispose()


@pytest.fixture
def workflow(store: OverrideStore) -> Iterator[OverrideWorkflow]:
    """The owner of every state change, recording on the store's database."""
    recorder = Recorder(store.engine)
    try:
        yield OverrideWorkflow(store, recorder, Holds())
    finally:
        recorder.close()


def stop_call(**changes: Any) -> Call:
    default_headers = {"Content-Type": "application/json", "Authorization": "Bearer agent-token"}
    headers = changes.pop("headers", default_headers)
    return make_call(changes.pop("method", "POST"), changes.pop("url", STOP_URL), headers=headers,
                     body=changes.pop("body", b'{"grace": 30}'), **changes)


def open_request(store: OverrideStore, call: Call | None = None, *requirements: Requirement,
                 expires_in: int = 1800) -> tuple[Override, bool]:
    call = call or stop_call()
    return store.open_or_attach(
        call, decision_id=str(uuid.uuid4()), escalation=Escalation(requirements or (MANAGER,), expires_in),
        policies=[{"id": r.policy_id, "reason": None, "annotations": {}} for r in requirements or (MANAGER,)],
        cedar_request={"principal": f'Agent::"{call.agent}"', "action": 'Action::"post"',
                       "resource": 'Host::"127.0.0.1"', "context": {"path": call.path}},
        revision="rev-1", justification="instance is wedged",
    )


def approve(workflow: OverrideWorkflow, override_id: str, who: tuple[str, frozenset[str]],
            reason: str = "checked with on-call") -> tuple[Override, bool]:
    return workflow.vote(override_id, who[0], who[1], "approve", reason)


def deny(workflow: OverrideWorkflow, override_id: str, who: tuple[str, frozenset[str]],
         reason: str = "not during business hours") -> tuple[Override, bool]:
    return workflow.vote(override_id, who[0], who[1], "deny", reason)


def release(workflow: OverrideWorkflow, override_id: str, decision_id: str = "d-1") -> bool:
    override = workflow.store.get(override_id)
    assert override is not None
    return workflow.release(override, decision_id=decision_id, payload={})


def status_of(store: OverrideStore, override_id: str) -> str:
    found = store.get(override_id)
    assert found is not None
    return found.status


@pytest.mark.parametrize("version_loaded", [True, False])
def test_a_request_held_in_a_session_is_as_the_database_after_it_is_moved(store: OverrideStore,
                                                                          version_loaded: bool):
    """`move` on a session keeps the request it holds in step with the row, whether or not the session had
    its version loaded (an expired one is read afresh, never counted up from the row already moved)."""
    override, _ = open_request(store)
    with Session(store.engine) as session:
        held = session.get(Override, override.id)
        assert held is not None and held.version == override.version
        if not version_loaded:
            session.expire(held, ["version"])
        assert store.move(session, override.id, OverrideStatus.PENDING, OverrideStatus.DENIED,
                          decided_reason="no")
        seen = (held.status, held.version, held.decided_reason)  # before the commit, which expires it all
        session.commit()
    stored = store.get(override.id)
    assert stored is not None
    assert seen == (stored.status, stored.version, stored.decided_reason) == ("denied", override.version + 1, "no")


# --- opening and joining --------------------------------------------------------------------------


def test_a_denied_call_opens_a_pending_request_that_keeps_the_call_without_secrets(store: OverrideStore):
    override, created = open_request(store)
    assert created
    stored = store.get(override.id)
    assert stored.status == "pending" and stored.version == 0
    assert (stored.agent, stored.method, stored.url, stored.host, stored.path) == (
        "ops-bot", "POST", STOP_URL, "127.0.0.1", "/v1/instances/i-1/stop"
    )
    assert (stored.action, stored.resource) == ('Action::"post"', 'Host::"127.0.0.1"')
    assert stored.body == b'{"grace": 30}'
    # Reviewers see that the call carried credentials, never their values.
    assert json.loads(stored.headers) == {"Content-Type": "application/json", "Authorization": "[redacted]"}
    assert json.loads(stored.requirements) == [
        {"policy_id": "protect-production-instances", "roles": ["engineering-manager"], "approvals": 1}
    ]
    assert stored.justification == "instance is wedged"
    assert stored.expires_at - stored.created_at == timedelta(minutes=30)
    assert store.list(status="pending")[0].id == override.id


def test_an_identical_call_joins_the_pending_request(store: OverrideStore):
    first, _ = open_request(store)
    again, created = open_request(store)
    assert (again.id, created) == (first.id, False)
    assert len(store.list()) == 1


def test_the_fingerprint_ignores_host_spelling_and_hop_headers_but_binds_the_rest(store: OverrideStore):
    first, _ = open_request(store)
    hop = stop_call(headers={"Content-Type": "application/json", "Authorization": "Bearer agent-token",
                             "Connection": "keep-alive", "Proxy-Authorization": "Basic eA=="})
    short_host = stop_call(url="http://127.1:9000/v1/instances/i-1/stop")
    assert {fingerprint(c) for c in (hop, short_host)} == {fingerprint(stop_call())}
    for call in (hop, short_host):
        joined, created = open_request(store, call)
        assert (joined.id, created) == (first.id, False)
    # Upstreams act on these and policies read them: a grant never covers a call that differs in one.
    for headers in ({"Content-Type": "application/json", "Authorization": "Bearer other"},
                    {"Content-Type": "application/json"},
                    {"Content-Type": "application/json", "Authorization": "Bearer agent-token",
                     "X-HTTP-Method-Override": "DELETE"}):
        assert fingerprint(stop_call(headers=headers)) != fingerprint(stop_call())


def test_a_retry_that_changes_only_how_to_answer_or_what_the_agent_says_joins_the_request(
        store: OverrideStore):
    first, _ = open_request(store, stop_call(headers={
        "Content-Type": "application/json", "Authorization": "Bearer agent-token", "Prefer": "wait=30",
        "X-Agent-Justification": "instance is wedged", "X-Agent-Confidence": "0.9"}))
    for said in ({"Prefer": "respond-async"}, {"X-Agent-Justification": "it is still wedged"},
                 {"X-Agent-Confidence": "0.1", "X-Agent-Session": "s-2"}, {}):
        retry = stop_call(headers={"Content-Type": "application/json", "Authorization": "Bearer agent-token",
                                   **said})
        joined, created = open_request(store, retry)
        assert (joined.id, created) == (first.id, False)
    assert len(store.list()) == 1


def test_a_live_request_stored_under_the_previous_fingerprint_is_still_found(store: OverrideStore):
    """An upgrade loses nothing: a request opened by the previous release, whose fingerprint bound
    `Prefer` and `X-Agent-*`, still takes the identical call's retry, and its grant is still found."""
    call = stop_call(headers={"Content-Type": "application/json", "Authorization": "Bearer agent-token",
                              "Prefer": "respond-async", "X-Agent-Justification": "wedged"})
    current, previous = fingerprints(call)
    assert current == fingerprint(call) and previous != current
    first, _ = open_request(store, call)
    with store.engine.begin() as conn:  # as the previous release stored it
        conn.execute(text("UPDATE overrides SET fingerprint = :fp WHERE id = :id"), {"fp": previous, "id": first.id})
    joined, created = open_request(store, call)
    assert (joined.id, created) == (first.id, False)
    assert fingerprints(stop_call()) == (fingerprint(stop_call()),)  # nothing to say: one fingerprint


@pytest.mark.parametrize(
    "changed",
    [
        {"body": b'{"grace": 0}'},
        {"method": "PUT"},
        {"url": "http://127.0.0.1:9000/v1/instances/i-2/stop"},
        {"url": STOP_URL + "?force=1"},
        {"url": "http://127.0.0.1:9001/v1/instances/i-1/stop"},
        {"agent": "other-bot"},
        {"headers": {"Content-Type": "text/plain"}},
    ],
    ids=["body", "method", "path", "query", "port", "agent", "content-type"],
)
def test_a_call_that_differs_opens_its_own_request(store: OverrideStore, changed: dict):
    first, _ = open_request(store)
    other, created = open_request(store, stop_call(**changed))
    assert created and other.id != first.id
    assert fingerprint(stop_call(**changed)) != fingerprint(stop_call())


def test_a_retry_joins_the_granted_request_until_it_is_released(store: OverrideStore,
                                                                workflow: OverrideWorkflow):
    first, _ = open_request(store)
    approve(workflow, first.id, ERIN)
    granted, created = open_request(store)
    assert (granted.id, granted.status, created) == (first.id, "granted", False)

    assert release(workflow, first.id)
    fresh, created = open_request(store)
    assert created and fresh.id != first.id and fresh.status == "pending"


def test_a_call_after_its_request_expired_is_told_so_once_then_opens_a_new_one(store: OverrideStore):
    stale, _ = open_request(store, expires_in=0)
    told, created = open_request(store)
    assert not created and (told.id, told.status) == (stale.id, "expired") and told.outcome_told_at is not None
    fresh, created = open_request(store)
    assert created and fresh.id != stale.id


def test_identical_calls_at_once_share_one_request(store: OverrideStore):
    results = race(THREADS, lambda _: open_request(store))
    assert len({override.id for override, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len(store.list()) == 1


# --- votes ----------------------------------------------------------------------------------------


def test_an_approver_with_the_role_grants(store: OverrideStore, workflow: OverrideWorkflow):
    override, _ = open_request(store)
    granted, changed = approve(workflow, override.id, ERIN, "checked with on-call")
    assert changed and granted.status == "granted" and granted.version == 1
    stored = store.get(override.id)
    assert stored.status == "granted" and stored.decided_reason == "checked with on-call"
    assert stored.grant_expires_at - stored.decided_at == timedelta(seconds=store.grant_ttl)
    [vote] = store.votes(override.id)
    assert (vote.approver, vote.roles, vote.verdict, vote.reason) == (
        "erin", frozenset({"engineering-manager"}), "approve", "checked with on-call"
    )


def test_an_approver_without_the_role_is_refused_and_nothing_is_recorded(store: OverrideStore,
                                                                         workflow: OverrideWorkflow):
    override, _ = open_request(store)
    with pytest.raises(OverrideError) as caught:
        approve(workflow, override.id, SAM)
    assert caught.value.status == 403
    assert "sam holds none of the roles this request needs (engineering-manager)" in caught.value.detail
    assert status_of(store, override.id) == "pending" and store.votes(override.id) == []


def test_an_approver_cannot_decide_on_a_call_made_under_their_own_identity(store: OverrideStore,
                                                                         workflow: OverrideWorkflow):
    override, _ = open_request(store, stop_call(agent="erin"))
    for vote in (approve, deny):
        with pytest.raises(OverrideError) as caught:
            vote(workflow, override.id, ERIN)
        assert caught.value.status == 403 and "own identity" in caught.value.detail
    assert status_of(store, override.id) == "pending" and store.votes(override.id) == []


def test_a_denial_is_final(store: OverrideStore, workflow: OverrideWorkflow):
    override, _ = open_request(store, None, TWO_MANAGERS)
    denied, changed = deny(workflow, override.id, ERIN, "not during business hours")
    assert changed and denied.status == "denied" and denied.decided_reason == "not during business hours"
    with pytest.raises(OverrideError) as caught:
        approve(workflow, override.id, MAX)
    assert caught.value.status == 409 and "denied, not pending" in caught.value.detail
    assert [(v.approver, v.verdict) for v in store.votes(override.id)] == [("erin", "deny")]


def test_the_same_approver_twice_counts_once(store: OverrideStore, workflow: OverrideWorkflow):
    override, _ = open_request(store, None, TWO_MANAGERS)
    for _ in range(2):
        pending, changed = approve(workflow, override.id, ERIN)
        assert not changed and pending.status == "pending"
    assert [v.approver for v in store.votes(override.id)] == ["erin"]
    granted, changed = approve(workflow, override.id, MAX)
    assert changed and granted.status == "granted"


def test_an_approver_cannot_turn_an_approval_into_a_denial(store: OverrideStore, workflow: OverrideWorkflow):
    override, _ = open_request(store, None, TWO_MANAGERS)
    approve(workflow, override.id, ERIN)
    with pytest.raises(OverrideError) as caught:
        deny(workflow, override.id, ERIN)
    assert caught.value.status == 409 and "erin already voted to approve" in caught.value.detail
    assert status_of(store, override.id) == "pending"


def test_two_person_rule_across_roles(store: OverrideStore, workflow: OverrideWorkflow):
    both, _ = open_request(store, stop_call(url="http://localhost:9000/v1/volumes/v-1", method="DELETE"),
                           TWO_PERSON)
    assert approve(workflow, both.id, PAT)[0].status == "pending"  # one person, two roles: one person

    override, _ = open_request(store, None, TWO_PERSON)
    assert approve(workflow, override.id, SAM)[0].status == "pending"
    assert approve(workflow, override.id, SUE)[0].status == "pending"  # two of one role
    granted, changed = approve(workflow, override.id, LEE)
    assert changed and granted.status == "granted"
    assert sorted(v.approver for v in store.votes(override.id)) == ["lee", "sam", "sue"]


def test_a_vote_on_an_unknown_request_is_404(store: OverrideStore, workflow: OverrideWorkflow):
    with pytest.raises(OverrideError) as caught:
        approve(workflow, "no-such-id", ERIN)
    assert caught.value.status == 404


# --- expiry and the one-time grant ----------------------------------------------------------------


def test_an_expired_request_cannot_be_voted_on_and_is_swept_to_expired(store: OverrideStore,
                                                                       workflow: OverrideWorkflow):
    override, _ = open_request(store, expires_in=0)
    with pytest.raises(OverrideError) as caught:
        approve(workflow, override.id, ERIN)
    assert caught.value.status == 409 and "expired" in caught.value.detail
    assert store.votes(override.id) == []

    assert workflow.expire_due() == [(override.id, "expired")]
    assert status_of(store, override.id) == "expired"
    assert workflow.expire_due() == []
    with pytest.raises(OverrideError) as caught:
        approve(workflow, override.id, ERIN)
    assert caught.value.status == 409


def test_live_requests_are_not_swept(store: OverrideStore, workflow: OverrideWorkflow):
    pending, _ = open_request(store)
    granted, _ = open_request(store, stop_call(body=b"{}"))
    approve(workflow, granted.id, ERIN)
    assert workflow.expire_due() == []
    assert (status_of(store, pending.id), status_of(store, granted.id)) == ("pending", "granted")


def test_an_unused_grant_expires(store: OverrideStore, workflow: OverrideWorkflow):
    short_lived = OverrideWorkflow(OverrideStore(store.engine, grant_ttl=0), workflow.recorder,
                                   workflow.holds)
    override, _ = open_request(store)
    approve(short_lived, override.id, ERIN)
    assert short_lived.expire_due() == [(override.id, "grant_expired")]
    assert status_of(store, override.id) == "grant_expired"
    assert not release(workflow, override.id)
    # The grant is gone: the identical call is told so, once, then is a new request.
    told, created = open_request(store)
    assert not created and (told.id, told.status) == (override.id, "grant_expired")
    fresh, created = open_request(store)
    assert created and fresh.id != override.id


def test_a_grant_is_released_exactly_once(store: OverrideStore, workflow: OverrideWorkflow):
    override, _ = open_request(store)
    approve(workflow, override.id, ERIN)
    assert release(workflow, override.id, "d-1")
    assert not release(workflow, override.id, "d-2")
    stored = store.get(override.id)
    assert (stored.status, stored.release_decision_id, stored.version) == ("released", "d-1", 2)


# --- races ----------------------------------------------------------------------------------------


def race(n: int, work: Callable[[int], Any]) -> list[Any]:
    """Run work(0..n-1) on n threads released together; each result is a return value or the exception."""
    barrier = threading.Barrier(n)

    def run(i: int) -> Any:
        barrier.wait(timeout=30)
        try:
            return work(i)
        except OverrideError as exc:
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_concurrent_approvals_grant_once_with_exactly_the_needed_votes(store: OverrideStore,
                                                                       workflow: OverrideWorkflow):
    managers = [(f"manager-{i}", frozenset({"engineering-manager"})) for i in range(THREADS)]
    for round_ in range(ROUNDS):
        override, _ = open_request(store, stop_call(body=f"round {round_}".encode()), TWO_MANAGERS)

        results = race(THREADS, lambda i: approve(workflow, override.id, managers[i]))

        stored = store.get(override.id)
        assert stored.status == "granted"
        votes = store.votes(override.id)
        assert len(votes) == 2 and {v.verdict for v in votes} == {"approve"}
        assert len({v.approver for v in votes}) == 2
        assert stored.version == 2  # one version per committed vote, nothing more
        succeeded = {managers[i][0] for i, r in enumerate(results) if not isinstance(r, Exception)}
        assert succeeded == {v.approver for v in votes}
        assert sum(1 for r in results if not isinstance(r, Exception) and r[1]) == 1
        refused = [r for r in results if isinstance(r, Exception)]
        assert [e.status for e in refused] == [409] * (THREADS - 2)


def test_concurrent_approve_and_deny_end_in_exactly_one_decision(store: OverrideStore,
                                                                 workflow: OverrideWorkflow):
    for round_ in range(ROUNDS):
        override, _ = open_request(store, stop_call(body=f"round {round_}".encode()))

        approved, denied = race(2, lambda i: approve(workflow, override.id, ERIN) if i == 0
                                else deny(workflow, override.id, MAX))

        final = status_of(store, override.id)
        assert final in ("granted", "denied")
        winner, loser = (approved, denied) if final == "granted" else (denied, approved)
        assert not isinstance(winner, Exception) and winner[1] and winner[0].status == final
        # Either verdict changes a one-approval request, so the later one finds it decided.
        assert isinstance(loser, OverrideError) and loser.status == 409
        [vote] = store.votes(override.id)
        assert vote.verdict == ("approve" if final == "granted" else "deny")


def test_concurrent_releases_consume_the_grant_once(store: OverrideStore, workflow: OverrideWorkflow):
    for round_ in range(ROUNDS):
        override, _ = open_request(store, stop_call(body=f"round {round_}".encode()))
        approve(workflow, override.id, ERIN)

        results = race(THREADS, lambda i: release(workflow, override.id, f"call-{i}"))

        assert results.count(True) == 1 and results.count(False) == THREADS - 1
        stored = store.get(override.id)
        assert stored.status == "released"
        assert stored.release_decision_id == f"call-{results.index(True)}"
        assert stored.version == 2


# --- who sees a request ---------------------------------------------------------------------------


def test_a_listing_for_some_roles_shows_only_the_requests_they_can_decide(store: OverrideStore):
    store.LIST_PAGE = 2  # so the filtered listing reads several pages
    managers = [open_request(store, stop_call(body=f"m{i}".encode()))[0] for i in range(3)]
    volumes = [open_request(store, stop_call(body=f"v{i}".encode()), TWO_PERSON)[0] for i in range(3)]

    # All pending, with the same expiry: the first opened is the first to expire, so listed first.
    assert [o.id for o in store.list(roles=ERIN[1])] == [o.id for o in managers]
    assert [o.id for o in store.list(roles=SAM[1], limit=2)] == [o.id for o in volumes][:2]
    assert [o.id for o in store.list(roles=LEE[1], limit=1)] == [volumes[0].id]
    assert store.list(roles=frozenset({"auditor"})) == []
    assert len(store.list()) == 6  # unfiltered: the core's own use


def test_a_listing_puts_the_undecided_first_by_deadline_then_the_decided_latest_first(
        store: OverrideStore, workflow: OverrideWorkflow):
    later = open_request(store, stop_call(body=b"later"), expires_in=3000)[0]
    sooner = open_request(store, stop_call(body=b"sooner"), expires_in=60)[0]
    first_decided = open_request(store, stop_call(body=b"d1"))[0]
    volume = open_request(store, stop_call(body=b"d2"), TWO_PERSON)[0]
    deny(workflow, first_decided.id, ERIN)
    deny(workflow, volume.id, SAM)

    assert [o.id for o in store.list()] == [sooner.id, later.id, volume.id, first_decided.id]
    assert [o.id for o in store.list(decided=False)] == [sooner.id, later.id]
    assert [o.id for o in store.list(decided=True)] == [volume.id, first_decided.id]
    assert [o.id for o in store.list(policy="no-volume-deletion")] == [volume.id]
    assert [o.id for o in store.list(policy="no-volume")] == []  # an @id, not a part of one
    assert [o.id for o in store.list(policy="protect-production-instances", decided=True,
                                     roles=ERIN[1])] == [first_decided.id]
    assert store.list(since=utcnow() + timedelta(seconds=5)) == []
    assert len(store.list(since=utcnow() - timedelta(minutes=5))) == 4


def test_the_query_secrets_of_a_call_are_not_stored_but_its_grant_binds_to_them(store: OverrideStore):
    call = stop_call(url=STOP_URL + "?access_token=tok_live_5e1f&zone=a")
    override, _ = store.open_or_attach(
        call, decision_id="d-1", escalation=Escalation((MANAGER,), 1800), policies=[], revision="rev-1",
        cedar_request={"principal": 'Agent::"ops-bot"', "action": 'Action::"post"',
                       "resource": 'Host::"127.0.0.1"', "context": {"path": call.path, "query": call.query}},
        justification=None,
    )
    stored = store.get(override.id)
    assert stored.url == STOP_URL + "?access_token=[redacted]&zone=a"
    assert json.loads(stored.cedar_request)["context"]["query"] == "access_token=[redacted]&zone=a"
    assert stored.fingerprint == fingerprint(call)
    other, created = open_request(store, stop_call(url=STOP_URL + "?access_token=tok_other&zone=a"))
    assert created and other.id != override.id  # another credential is another call
