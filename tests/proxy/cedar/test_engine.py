"""The decision engine: evaluating calls, hot reload that never leaves a half set live, fail-closed errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import cedarpy
import pytest
from proxy_support import BUNDLED_IDS, POLICIES, make_call, write_policy_file

from proxy.calls.mapping import MappingOptions, map_call
from proxy.cedar.engine import Engine


def _evaluate(engine: Engine, method: str, url: str, agent: str = "ops-bot"):
    return engine.evaluate(map_call(make_call(method, url, agent=agent), MappingOptions()))


STOP_PROD = ("POST", "http://127.0.0.1:9000/v1/instances/i-1/stop")


def test_evaluate_reports_decision_determining_policies_and_revision(engine: Engine):
    listing = _evaluate(engine, "GET", "http://localhost:9000/v1/instances")
    assert (listing.decision, listing.determining, listing.errors) == ("Allow", ("ops-read",), ())
    assert listing.allowed
    assert listing.revision == engine.snapshot.bundle.revision == engine.status.revision

    stop = _evaluate(engine, *STOP_PROD)
    assert (stop.decision, stop.determining, stop.errors) == ("Deny", ("protect-production-instances",), ())
    assert not stop.allowed


def test_unlisted_agent_and_host_are_decided_without_errors(engine: Engine):
    stranger = _evaluate(engine, "GET", "http://localhost:9000/v1/instances", agent="stranger")
    assert (stranger.decision, stranger.determining, stranger.errors) == ("Deny", (), ())

    # An unlisted host has no tags, so the production forbid does not apply and is not an error.
    unlisted = _evaluate(engine, "POST", "http://new-host.example/v1/instances/i-9/stop")
    assert (unlisted.decision, unlisted.determining, unlisted.errors) == ("Allow", ("ops-stop-instance",), ())


def test_reload_if_changed_does_nothing_when_nothing_changed(engine: Engine):
    revision = engine.status.revision
    assert engine.reload_if_changed() is False
    assert engine.status.revision == revision
    assert engine.status.last_error is None


def test_hot_reload_swaps_keeps_last_good_set_on_error_and_recovers(engine: Engine, policy_dir: Path):
    ops = policy_dir / "ops.cedar"
    original = ops.read_text()
    first = engine.status.revision
    assert _evaluate(engine, *STOP_PROD).decision == "Deny"

    # 1. The operator removes the production forbid: the new set goes live.
    without_forbid = original.replace(
        '@id("protect-production-instances")', '@id("protect-production-instances-off")'
    )
    without_forbid = without_forbid.replace(
        'forbid (principal, action == Action::"post"', 'forbid (principal, action == Action::"put"'
    )
    write_policy_file(ops, without_forbid)
    assert engine.reload_if_changed() is True
    second = engine.status.revision
    assert second != first
    stop = _evaluate(engine, *STOP_PROD)
    assert (stop.decision, stop.determining, stop.revision) == ("Allow", ("ops-stop-instance",), second)
    assert "protect-production-instances-off" in engine.snapshot.bundle.policies

    # 2. A broken save: the last good set stays live and the status says what is wrong, and where.
    broken = without_forbid + '\n@id("half-typed")\npermit (principal, action, resource\n'
    write_policy_file(ops, broken)
    assert engine.reload_if_changed() is False
    assert engine.status.revision == second
    assert engine.status.last_error is not None
    assert "ops.cedar:" in engine.status.last_error and '@id("half-typed")' in engine.status.last_error
    assert engine.status.last_error_at is not None
    still = _evaluate(engine, *STOP_PROD)
    assert (still.decision, still.revision) == ("Allow", second)
    # Polling again without a further change does not retry or clear the error.
    assert engine.reload_if_changed() is False
    assert engine.status.last_error is not None

    # 3. The operator fixes the file (back to the original): the original set is live again.
    write_policy_file(ops, original)
    assert engine.reload_if_changed() is True
    assert engine.status.revision == first
    assert engine.status.last_error is None and engine.status.last_error_at is None
    assert _evaluate(engine, *STOP_PROD).decision == "Deny"
    assert set(engine.snapshot.bundle.policies) == BUNDLED_IDS


def test_a_new_file_that_fails_validation_is_not_loaded(engine: Engine, policy_dir: Path):
    first = engine.status.revision
    write_policy_file(
        policy_dir / "extra.cedar", '@id("x")\npermit (principal, action, resource) when { context.nope };\n'
    )
    assert engine.reload_if_changed() is False
    assert 'extra.cedar:1: @id("x")' in engine.status.last_error
    assert engine.status.revision == first

    (policy_dir / "extra.cedar").unlink()
    assert engine.reload_if_changed() is True
    assert engine.status.revision == first
    assert engine.status.last_error is None


def test_entities_change_is_picked_up(engine: Engine, policy_dir: Path):
    entities = policy_dir / "entities.json"
    # localhost becomes production-critical.
    write_policy_file(
        entities, entities.read_text().replace('"tags": ["dev"]', '"tags": ["production-critical"]', 1)
    )
    assert engine.reload_if_changed() is True
    stop = _evaluate(engine, "POST", "http://localhost:9000/v1/instances/i-1/stop")
    assert stop.determining == ("protect-production-instances",)


def test_removed_directory_keeps_the_set_and_reports(tmp_path: Path):
    directory = tmp_path / "p"
    shutil.copytree(POLICIES, directory, ignore=shutil.ignore_patterns("tests"))
    engine = Engine(directory)
    revision = engine.status.revision
    shutil.rmtree(directory)

    assert engine.reload_if_changed() is False
    assert engine.status.revision == revision
    assert "does not exist" in engine.status.last_error
    assert _evaluate(engine, *STOP_PROD).decision == "Deny"


def test_a_bad_set_at_start_refuses_to_start(policy_dir: Path):
    (policy_dir / "ops.cedar").write_text("permit (principal, action, resource);\n")
    with pytest.raises(Exception, match=r"ops\.cedar:1: policy has no @id"):
        Engine(policy_dir)


# ---- fail closed on evaluation errors --------------------------------------------------------------

# Passes strict validation, but overflows at run time for any port above 807 (Cedar Long is 64-bit).
OVERFLOWING_FORBID = """
@id("allow-ops")
permit (principal in Team::"ops", action, resource);

@id("forbid-overflowing")
@reason("guards something")
forbid (principal, action, resource)
when { context.port + 9223372036854775000 > 0 };
"""


@pytest.fixture
def overflow_engine(policy_dir: Path) -> Engine:
    (policy_dir / "ops.cedar").write_text(OVERFLOWING_FORBID)
    return Engine(policy_dir)


def test_forbid_that_errors_is_skipped_by_cedar_but_the_engine_does_not_allow(overflow_engine: Engine):
    evaluation = _evaluate(overflow_engine, "GET", "http://localhost:8080/v1/instances")

    # This is what Cedar says: the permit matched, the erroring forbid was skipped...
    assert evaluation.decision == "Allow"
    assert evaluation.determining == ("allow-ops",)
    assert len(evaluation.errors) == 1 and "forbid-overflowing" in evaluation.errors[0]
    assert "overflow" in evaluation.errors[0]
    # ...and this is the rule cedargate adds: an Allow with errors may hide a forbid, so it is no Allow.
    assert evaluation.allowed is False


def test_same_forbid_without_error_denies(overflow_engine: Engine):
    evaluation = _evaluate(overflow_engine, "GET", "http://localhost:80/v1/instances")
    assert (evaluation.decision, evaluation.determining, evaluation.errors) == (
        "Deny",
        ("forbid-overflowing",),
        (),
    )


def test_forbid_scoped_to_another_action_raises_no_error(policy_dir: Path):
    (policy_dir / "ops.cedar").write_text(
        OVERFLOWING_FORBID.replace(
            "forbid (principal, action, resource)", 'forbid (principal, action == Action::"delete", resource)'
        )
    )
    engine = Engine(policy_dir)
    get = _evaluate(engine, "GET", "http://localhost:8080/v1/instances")
    delete = _evaluate(engine, "DELETE", "http://localhost:8080/v1/instances/i-1")
    assert (get.decision, get.errors, get.allowed) == ("Allow", (), True)
    assert delete.decision == "Allow" and delete.errors and not delete.allowed


def test_entities_for_adds_bare_entities_for_unlisted_agent_and_host(engine: Engine):
    snapshot = engine.snapshot
    listed = snapshot.entities_for(("Agent", "ops-bot"), ("Host", "localhost"))
    assert listed is snapshot.bundle.entities

    overlay = snapshot.entities_for(("Agent", "stranger"), ("Host", "nowhere.example"))
    # Repeated calls reuse the cached overlay.
    assert snapshot.entities_for(("Agent", "stranger"), ("Host", "nowhere.example")) is overlay
    request = {
        "principal": {"type": "Agent", "id": "stranger"},
        "action": {"type": "Action", "id": "get"},
        "resource": {"type": "Host", "id": "nowhere.example"},
        "context": {},
    }
    policy = (
        '@id("t") permit (principal, action, resource) '
        'when { resource.tags == [] && !(principal in Team::"ops") };'
    )
    result = cedarpy.is_authorized(request, policy, overlay)
    assert (result.decision.value, result.diagnostics.errors) == ("Allow", [])
