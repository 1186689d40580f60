"""The override workflow's one owner on real databases: each state change and its audit event commit
together or not at all, in the order of everything else recorded, and the chain still verifies.

A database that refuses a write is made with a trigger, as a full disk or a broken constraint would
refuse it: the workflow never learns how, only that its transaction failed.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from proxy_support import make_call
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from proxy.cedar.escalation import Escalation, Requirement
from proxy.oversight.overrides import Override, OverrideError, OverrideStatus
from proxy.oversight.workflow import OverrideWorkflow
from proxy.record import audit

MANAGER = Requirement("protect-production-instances", ("engineering-manager",), 1)
SECURITY_AND_LEAD = Requirement("no-volume-deletion", ("security", "lead-engineer"), 2)
ERIN = frozenset({"engineering-manager"})


def open_request(workflow: OverrideWorkflow, *requirements: Requirement, expires_in: int = 1800,
                 body: bytes = b'{"grace": 30}') -> Override:
    call = make_call("POST", "http://127.0.0.1:9000/v1/instances/i-1/stop", body=body)
    override, created = workflow.open(
        call, decision_id=str(uuid.uuid4()), escalation=Escalation(requirements or (MANAGER,), expires_in),
        policies=[{"id": r.policy_id, "reason": None, "annotations": {}} for r in requirements or (MANAGER,)],
        cedar_request={"principal": 'Agent::"ops-bot"', "action": 'Action::"post"',
                       "resource": 'Host::"127.0.0.1"', "context": {}},
        revision="rev-1", justification="instance is wedged",
    )
    assert created
    return override


def audit_rows(workflow: OverrideWorkflow, override_id: str | None = None) -> list[Any]:
    assert workflow.recorder.flush()
    query = "SELECT * FROM audit_log" + (" WHERE override_id = :id" if override_id else "") + " ORDER BY seq"
    with workflow.store.engine.connect() as conn:
        return list(conn.execute(text(query), {"id": override_id}).all())


def kinds(workflow: OverrideWorkflow, override_id: str) -> list[str]:
    return [row.kind for row in audit_rows(workflow, override_id)]


def refuse_writes(workflow: OverrideWorkflow, table: str, operation: str) -> None:
    """Make the database refuse every INSERT or UPDATE on `table`, as a failing store would."""
    engine = workflow.store.engine
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(text(f"CREATE TRIGGER refuse_{table} BEFORE {operation} ON {table} "
                              "BEGIN SELECT RAISE(ABORT, 'the store refuses the write'); END"))
        else:
            conn.execute(text("CREATE OR REPLACE FUNCTION refuse_write() RETURNS trigger AS $$ BEGIN "
                              "RAISE EXCEPTION 'the store refuses the write'; END $$ LANGUAGE plpgsql"))
            conn.execute(text(f"CREATE TRIGGER refuse_{table} BEFORE {operation} ON {table} "
                              "FOR EACH ROW EXECUTE FUNCTION refuse_write()"))


def allow_writes(workflow: OverrideWorkflow, table: str) -> None:
    engine = workflow.store.engine
    with engine.begin() as conn:
        on = "" if engine.dialect.name == "sqlite" else f" ON {table}"
        conn.execute(text(f"DROP TRIGGER refuse_{table}{on}"))


# --- a change and its event, together ------------------------------------------------------------


def test_opening_records_the_request_in_the_same_transaction(workflow: OverrideWorkflow):
    override = open_request(workflow)
    [created] = audit_rows(workflow, override.id)
    assert (created.kind, created.agent) == ("override_created", "ops-bot")
    assert workflow.store.get(override.id).status == "pending"


def test_a_granting_vote_records_the_approval_and_the_grant_and_the_chain_verifies(
        workflow: OverrideWorkflow):
    override = open_request(workflow)

    granted, decided = workflow.vote(override.id, "erin", ERIN, "approve", "checked with on-call")

    assert decided and granted.status == "granted" and granted.grant_expires_at is not None
    rows = audit_rows(workflow, override.id)
    assert [(r.kind, r.actor) for r in rows] == [
        ("override_created", None), ("approval", "erin"), ("grant", "erin")]
    assert audit.verify(workflow.store.engine).ok


def test_a_denial_vote_and_the_denied_request_are_two_events(workflow: OverrideWorkflow):
    override = open_request(workflow)

    denied, decided = workflow.vote(override.id, "erin", ERIN, "deny", "not now")

    assert decided and denied.status == "denied"
    assert kinds(workflow, override.id) == ["override_created", "denial", "denied"]


def test_quorum_across_two_roles_grants_on_the_second_vote(workflow: OverrideWorkflow):
    override = open_request(workflow, SECURITY_AND_LEAD)

    first, decided = workflow.vote(override.id, "sam", frozenset({"security"}), "approve", "fine by security")
    assert (first.status, decided) == ("pending", False)
    second, decided = workflow.vote(override.id, "lee", frozenset({"lead-engineer"}), "approve", "fine by me")

    assert (second.status, decided) == ("granted", True)
    assert kinds(workflow, override.id) == ["override_created", "approval", "approval", "grant"]


def test_a_refused_vote_records_nothing(workflow: OverrideWorkflow):
    override = open_request(workflow)
    with pytest.raises(OverrideError) as caught:
        workflow.vote(override.id, "sam", frozenset({"security"}), "approve", "ok")
    assert caught.value.status == 403
    assert kinds(workflow, override.id) == ["override_created"]
    assert workflow.store.votes(override.id) == []


def test_a_vote_is_chained_after_what_was_recorded_before_it(workflow: OverrideWorkflow):
    override = open_request(workflow)
    workflow.recorder.record_event({"kind": "passthrough", "agent": "ops-bot", "payload": {"n": 1}})
    workflow.vote(override.id, "erin", ERIN, "approve", "ok")
    workflow.recorder.record_event({"kind": "passthrough", "agent": "ops-bot", "payload": {"n": 2}})

    assert [r.kind for r in audit_rows(workflow)] == [
        "override_created", "passthrough", "approval", "grant", "passthrough"]
    assert audit.verify(workflow.store.engine).ok


# --- one without the other never happens ---------------------------------------------------------


def test_a_failed_audit_write_leaves_the_request_unchanged(workflow: OverrideWorkflow):
    override = open_request(workflow)
    refuse_writes(workflow, "audit_log", "INSERT")

    with pytest.raises((OverrideError, DBAPIError)):
        workflow.vote(override.id, "erin", ERIN, "approve", "ok")

    stored = workflow.store.get(override.id)
    assert (stored.status, stored.version) == ("pending", 0)
    assert workflow.store.votes(override.id) == []
    allow_writes(workflow, "audit_log")
    assert kinds(workflow, override.id) == ["override_created"]
    # The store recovered: the same vote now goes through, and the chain has no gap.
    assert workflow.vote(override.id, "erin", ERIN, "approve", "ok")[0].status == "granted"
    assert kinds(workflow, override.id) == ["override_created", "approval", "grant"]
    assert audit.verify(workflow.store.engine).ok


def test_a_failed_audit_write_leaves_the_grant_unreleased(workflow: OverrideWorkflow):
    override = open_request(workflow)
    granted, _ = workflow.vote(override.id, "erin", ERIN, "approve", "ok")
    refuse_writes(workflow, "audit_log", "INSERT")

    with pytest.raises(DBAPIError):
        workflow.release(granted, decision_id="call-1", payload={})

    assert workflow.store.get(override.id).status == "granted"
    allow_writes(workflow, "audit_log")
    assert workflow.release(granted, decision_id="call-1", payload={})
    assert kinds(workflow, override.id) == ["override_created", "approval", "grant", "release"]


def test_a_failed_state_change_records_no_event(workflow: OverrideWorkflow):
    override = open_request(workflow)
    due = open_request(workflow, expires_in=0, body=b"due")
    refuse_writes(workflow, "overrides", "UPDATE")

    with pytest.raises((OverrideError, DBAPIError)):
        workflow.vote(override.id, "erin", ERIN, "approve", "ok")
    with pytest.raises(DBAPIError):
        workflow.expire_due()

    assert kinds(workflow, override.id) == ["override_created"]
    assert workflow.store.votes(override.id) == []  # the vote row went with the failed UPDATE
    assert kinds(workflow, due.id) == ["override_created"]
    assert workflow.store.get(due.id).status == "pending"
    assert audit.verify(workflow.store.engine).ok


def test_expiry_records_each_request_it_expires(workflow: OverrideWorkflow):
    due = open_request(workflow, expires_in=0, body=b"due")
    live = open_request(workflow, body=b"live")

    assert workflow.expire_due() == [(due.id, OverrideStatus.EXPIRED)]
    assert workflow.expire_due() == []

    assert kinds(workflow, due.id) == ["override_created", "expired"]
    assert kinds(workflow, live.id) == ["override_created"]
    assert audit.verify(workflow.store.engine).ok
