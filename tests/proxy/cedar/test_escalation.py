"""Escalation annotations: what a forbid demands of its reviewers, and when a set of approvals meets it."""

from __future__ import annotations

from pathlib import Path

import pytest
from proxy_support import write_policy_file

from proxy.cedar.engine import Engine
from proxy.cedar.escalation import (
    AnnotationError,
    Chain,
    Escalation,
    Requirement,
    Tier,
    check_annotations,
    escalation_of,
    quorum_met,
    requirement_of,
)
from proxy.cedar.policy import PolicyInfo, PolicyLoadError, load_bundle


def policy(policy_id: str = "p", effect: str = "forbid", **annotations: str) -> PolicyInfo:
    return PolicyInfo(policy_id, effect, "ops.cedar", 1, {"id": policy_id, **annotations})


def approvers(**held: str) -> dict[str, frozenset[str]]:
    """approvers(sam="security", lee="lead-engineer, security") -> {approver: roles}."""
    return {name: frozenset(r.strip() for r in roles.split(",")) for name, roles in held.items()}


# --- requirement_of -------------------------------------------------------------------------------


def test_one_role_needs_one_approver_of_it():
    assert requirement_of(policy("stop", escalate="engineering-manager")) == Requirement(
        "stop", ("engineering-manager",), 1
    )


def test_listed_roles_need_one_approver_each():
    requirement = requirement_of(policy("del", escalate="security, lead-engineer"))
    assert requirement == Requirement("del", ("security", "lead-engineer"), 2)
    assert requirement.as_dict() == {
        "policy_id": "del", "roles": ["security", "lead-engineer"], "approvals": 2
    }


def test_approvals_sets_the_number_of_distinct_approvers():
    assert requirement_of(policy("p", escalate="security", approvals="2")).count == 2


def test_approvals_below_the_number_of_roles_still_needs_one_per_role():
    assert requirement_of(policy("p", escalate="security, lead-engineer", approvals="1")).count == 2


def test_a_forbid_without_escalate_and_any_permit_are_not_escalatable():
    assert requirement_of(policy("hard")) is None
    assert requirement_of(policy("ok", effect="permit")) is None


@pytest.mark.parametrize("raw", ["two", "0", "-1", "1.5", ""])
def test_bad_approvals_is_an_annotation_error_naming_the_policy(raw: str):
    with pytest.raises(AnnotationError, match=r'policy "p": @approvals') as caught:
        requirement_of(policy("p", escalate="security", approvals=raw))
    assert f'@approvals("{raw}")' in str(caught.value)


def test_escalate_without_a_role_is_an_annotation_error():
    with pytest.raises(AnnotationError, match="needs at least one role"):
        requirement_of(policy("p", escalate=" , "))


def test_check_annotations_refuses_escalate_on_a_permit():
    with pytest.raises(AnnotationError, match=r'policy "lenient": @escalate only makes sense on a forbid'):
        check_annotations(
            [policy("fine", escalate="security"), policy("lenient", "permit", escalate="security")]
        )


def test_check_annotations_refuses_a_bad_expiry():
    with pytest.raises(AnnotationError, match=r'policy "p": @expires: .*15 minutes'):
        check_annotations([policy("p", escalate="security", expires="15 minutes")])


def test_check_annotations_accepts_the_bundled_policies(policy_dir: Path):
    check_annotations(load_bundle(policy_dir).policies.values())


def test_severity_and_reversible_are_checked_on_any_policy():
    """They tell a reviewer how bad a call is: a typo must not show a wrong severity, or none."""
    check_annotations([policy("p", escalate="security", severity="critical", reversible="false")])
    with pytest.raises(AnnotationError, match=r'policy "p": @severity\("High"\)'):
        check_annotations([policy("p", escalate="security", severity="High")])
    with pytest.raises(AnnotationError, match=r'policy "p": @reversible\("no"\)'):
        check_annotations([policy("p", escalate="security", reversible="no")])


# --- a policy directory with a bad annotation is refused, naming file and line --------------------

BAD_APPROVALS = """\
// Deleting snapshots needs two security reviewers.

@id("snapshot-guard")
@escalate("security")
@approvals("two")
forbid (principal, action == Action::"delete", resource)
when { context.path like "/v1/snapshots/*" };
"""

ESCALATED_PERMIT = """\
@id("generous")
@escalate("security")
permit (principal, action == Action::"delete", resource);
"""

GRAVE = BAD_APPROVALS.replace('@approvals("two")', '@severity("grave")')
MAYBE_REVERSIBLE = BAD_APPROVALS.replace('@approvals("two")', '@reversible("maybe")')


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (BAD_APPROVALS, 3, '@approvals("two") must be a whole number >= 1'),
        (ESCALATED_PERMIT, 1, "@escalate only makes sense on a forbid"),
        (GRAVE, 3, 'policy "snapshot-guard": @severity("grave") must be one of low, medium, high, critical'),
        (MAYBE_REVERSIBLE, 3, 'policy "snapshot-guard": @reversible("maybe") must be "true" or "false"'),
    ],
)
def test_load_bundle_refuses_a_bad_annotation_with_file_and_line(policy_dir: Path, text: str, line: int,
                                                                 message: str):
    write_policy_file(policy_dir / "extra.cedar", text)
    with pytest.raises(PolicyLoadError) as caught:
        load_bundle(policy_dir)
    assert str(caught.value).startswith(f"extra.cedar:{line}: ")
    assert message in str(caught.value)


def test_superscript_approvals_is_refused_naming_file_and_line(policy_dir: Path):
    superscript = BAD_APPROVALS.replace('@approvals("two")', '@approvals("²")')
    write_policy_file(policy_dir / "extra.cedar", superscript)
    with pytest.raises(PolicyLoadError, match=r'^extra\.cedar:3: policy "snapshot-guard": @approvals'):
        load_bundle(policy_dir)


def test_a_bad_annotation_on_reload_keeps_the_running_policies(engine: Engine, policy_dir: Path):
    revision = engine.status.revision
    write_policy_file(policy_dir / "extra.cedar", BAD_APPROVALS)
    assert engine.reload() is False
    assert engine.status.revision == revision
    assert engine.status.last_error.startswith("extra.cedar:3: ")


# --- Requirement.satisfied_by ---------------------------------------------------------------------

MANAGER = Requirement("stop", ("engineering-manager",), 1)
TWO_SECURITY = Requirement("snap", ("security",), 2)
TWO_PERSON = Requirement("del", ("security", "lead-engineer"), 2)


def test_one_approver_of_the_role_satisfies_a_single_role():
    assert MANAGER.satisfied_by(approvers(erin="engineering-manager"))


def test_no_approvals_or_the_wrong_role_does_not_satisfy():
    assert not MANAGER.satisfied_by({})
    assert not MANAGER.satisfied_by(approvers(sam="security"))


def test_two_approvals_need_two_distinct_approvers():
    # Approvals are keyed by approver, so one person approving twice is one entry (see test_overrides).
    assert not TWO_SECURITY.satisfied_by(approvers(sam="security"))
    assert TWO_SECURITY.satisfied_by(approvers(sam="security", sue="security"))


def test_two_approvals_ignore_approvers_without_the_role():
    assert not TWO_SECURITY.satisfied_by(approvers(sam="security", erin="engineering-manager"))


def test_one_person_holding_both_roles_is_not_two_persons():
    assert not TWO_PERSON.satisfied_by(approvers(pat="security, lead-engineer"))


def test_security_and_lead_engineer_as_two_people_satisfy_the_two_person_rule():
    assert TWO_PERSON.satisfied_by(approvers(sam="security", lee="lead-engineer"))


def test_two_security_approvers_do_not_cover_the_lead_engineer_role():
    assert not TWO_PERSON.satisfied_by(approvers(sam="security", sue="security"))


def test_a_dual_role_approver_can_fill_the_role_nobody_else_holds():
    assert TWO_PERSON.satisfied_by(approvers(pat="security, lead-engineer", sam="security"))


# --- escalation_of --------------------------------------------------------------------------------


def test_all_escalatable_forbids_give_every_requirement_and_the_shortest_expiry():
    stop = policy("stop", escalate="engineering-manager", expires="30m")
    delete = policy("del", escalate="security, lead-engineer", expires="15m")
    snap = policy("snap", escalate="security", approvals="2")  # no @expires: does not count
    allowed = policy("ops-read", effect="permit")

    escalation = escalation_of([stop, allowed, delete, snap], default_expiry=3600)

    assert escalation == Escalation(
        (
            Requirement("stop", ("engineering-manager",), 1),
            Requirement("del", ("security", "lead-engineer"), 2),
            Requirement("snap", ("security",), 2),
        ),
        15 * 60,
    )
    assert escalation.roles == {"engineering-manager", "security", "lead-engineer"}


def test_without_any_expires_the_default_expiry_applies():
    escalation = escalation_of([policy("stop", escalate="engineering-manager")], default_expiry=3600)
    assert escalation is not None and escalation.expires_in == 3600


def test_every_requirement_must_be_met_at_once():
    escalation = escalation_of(
        [policy("stop", escalate="engineering-manager"), policy("snap", escalate="security")], 3600
    )
    assert not escalation.satisfied_by(approvers(erin="engineering-manager"))
    assert escalation.satisfied_by(approvers(erin="engineering-manager", sam="security"))


def test_one_forbid_without_escalate_makes_a_hard_deny():
    determining = [policy("stop", escalate="engineering-manager", expires="30m"), policy("never")]
    assert escalation_of(determining, 3600) is None


def test_no_forbid_is_no_escalation():
    assert escalation_of([], 3600) is None
    assert escalation_of([policy("ops-read", effect="permit")], 3600) is None


# --- escalation chains: @escalate_after, @remind ------------------------------------------------------

SEEDS = dict(escalate="on-call", escalate_after="10m: secondary-on-call; 30m: engineering-manager",
             expires="1h", remind="5m")


def test_the_seeds_chain_parses_into_tiers_counted_from_the_opening():
    requirement = requirement_of(policy("stop", **SEEDS))
    assert requirement == Requirement("stop", ("on-call",), 1, (
        Tier(600, ("secondary-on-call",)), Tier(1800, ("engineering-manager",))))
    assert requirement.as_dict()["escalate_after"] == [
        {"after": 600, "roles": ["secondary-on-call"]}, {"after": 1800, "roles": ["engineering-manager"]}]
    assert Requirement.from_dict(requirement.as_dict()) == requirement
    escalation = escalation_of([policy("stop", **SEEDS)], default_expiry=7200)
    assert escalation is not None and (escalation.expires_in, escalation.remind_every) == (3600, 300)
    chain = escalation.chain
    assert [(t.after, t.roles) for t in chain.tiers] == [
        (0, ("on-call",)), (600, ("secondary-on-call",)), (1800, ("engineering-manager",))]


def test_a_tier_may_name_several_roles():
    requirement = requirement_of(policy("p", escalate="on-call", expires="1h",
                                        escalate_after="15m: sre-lead, engineering-manager"))
    assert requirement is not None and requirement.tiers == (Tier(900, ("sre-lead", "engineering-manager")),)


@pytest.mark.parametrize(("annotations", "message"), [
    (dict(escalate_after="10m secondary-on-call"), 'tier 2 "10m secondary-on-call" must be written DELAY: ROLE'),
    (dict(escalate_after="ten minutes: secondary-on-call"), "tier 2: 'ten minutes' is not a duration"),
    (dict(escalate_after="10m: "), "tier 2 (after 10m) names no role"),
    (dict(escalate_after="30m: secondary-on-call; 10m: engineering-manager"),
     "tier 3's delay 10m must come after tier 2's 30m"),
    (dict(escalate_after="0s: secondary-on-call"), "tier 2's delay 0s must come after the opening"),
    (dict(escalate_after="10m: on-call"), 'role "on-call" is already in tier 1'),
    (dict(escalate_after=" ; "), "names no tier"),
    (dict(escalate_after="1h: engineering-manager"), 'tier 2 at 1h is not before @expires("1h")'),
    (dict(escalate_after="10m: secondary-on-call", expires=None), "@escalate_after needs @expires"),
    (dict(remind="soon"), "@remind: 'soon' is not a duration"),
    (dict(remind="0s"), '@remind("0s") must be at least 1s'),
    (dict(remind="2h"), '@remind("2h") is not shorter than @expires("1h")'),
    (dict(escalate=None), '@escalate_after needs @escalate("role")'),
])
def test_a_malformed_chain_is_refused_naming_the_policy(annotations: dict, message: str):
    values = {**SEEDS, **annotations}
    bad = policy("stop", **{k: v for k, v in values.items() if v is not None})
    with pytest.raises(AnnotationError) as caught:
        check_annotations([bad])
    assert str(caught.value).startswith('policy "stop": ')
    assert message in str(caught.value)
    assert caught.value.policy_id == "stop"


SEEDS_POLICY = """\
// Stopping an instance on a staging host: on-call first, then the secondary, then the manager.

@id("staging-stop")
@reason("Stopping a staging instance needs an engineer.")
@escalate("on-call")
@escalate_after("10m: secondary-on-call; 5m: engineering-manager")
@expires("1h")
forbid (principal, action == Action::"post", resource)
when { context.path like "/v1/instances/*/stop" };
"""


def test_load_bundle_refuses_a_chain_whose_delays_do_not_increase_with_file_line_and_id(policy_dir: Path):
    write_policy_file(policy_dir / "extra.cedar", SEEDS_POLICY)
    with pytest.raises(PolicyLoadError) as caught:
        load_bundle(policy_dir)
    assert str(caught.value).startswith('extra.cedar:3: policy "staging-stop": @escalate_after(')
    assert "tier 3's delay 5m must come after tier 2's 10m" in str(caught.value)


def test_load_bundle_accepts_the_seeds_chain_with_roles_nobody_holds(policy_dir: Path):
    write_policy_file(policy_dir / "extra.cedar", SEEDS_POLICY.replace("5m: engineering-manager",
                                                                       "30m: engineering-manager"))
    bundle = load_bundle(policy_dir)
    requirement = requirement_of(bundle.policies["staging-stop"])
    assert requirement is not None and [t.after for t in requirement.tiers] == [600, 1800]


def test_a_reached_tier_may_fill_any_slot_and_the_number_of_approvers_is_unchanged():
    chained = Requirement("del", ("security", "lead-engineer"), 2, (Tier(60, ("engineering-manager",)),))
    # Before its tier is reached a manager counts for nothing.
    assert not chained.satisfied_by(approvers(sam="security", erin="engineering-manager"), elapsed=59)
    # After, the manager fills the lead engineer's slot...
    assert chained.satisfied_by(approvers(sam="security", erin="engineering-manager"), elapsed=60)
    # ...but one manager is still one person: two distinct approvers are needed.
    assert not chained.satisfied_by(approvers(erin="engineering-manager"), elapsed=3600)
    assert chained.satisfied_by(approvers(erin="engineering-manager", eve="engineering-manager"), elapsed=60)


def test_the_quorum_rule_reads_each_policys_own_tiers():
    stop = Requirement("stop", ("on-call",), 1, (Tier(60, ("engineering-manager",)),))
    snap = Requirement("snap", ("security",), 1)
    erin = approvers(erin="engineering-manager")
    assert quorum_met([stop], erin, elapsed=60)
    # The manager stands in for on-call, not for security, whose policy has no chain.
    assert not quorum_met([stop, snap], erin, elapsed=60)
    assert quorum_met([stop, snap], approvers(erin="engineering-manager", sam="security"), elapsed=60)


def test_the_merged_chain_of_two_policies_and_its_clock():
    stop = Requirement("stop", ("on-call",), 1, (Tier(60, ("secondary-on-call",)), Tier(180, ("engineering-manager",))))
    snap = Requirement("snap", ("security",), 1, (Tier(60, ("security-lead",)), Tier(7200, ("ciso",))))
    chain = Chain.of([stop, snap], expires_in=3600, remind_every=50)
    # Tiers at one delay merge; one past the expiry is never reached, so it is left out.
    assert [(t.after, t.roles) for t in chain.tiers] == [
        (0, ("on-call", "security")), (60, ("secondary-on-call", "security-lead")), (180, ("engineering-manager",))]
    assert [chain.reached(s) for s in (0, 59, 60, 179, 180, 3599)] == [1, 1, 2, 2, 3, 3]
    assert chain.roles_reached(61) == {"on-call", "security", "secondary-on-call", "security-lead"}
    assert [chain.deadline(n) for n in (1, 2, 3)] == [60, 180, 3600]
    # Tier 1 (0-60s) is reminded at 50s; tier 2 (60-180s) at 110s and 160s; tier 3 every 50s until expiry.
    assert [chain.reminders_due(1, s) for s in (49, 50, 60)] == [0, 1, 1]
    assert [chain.reminders_due(2, s) for s in (109, 110, 160, 179)] == [0, 1, 2, 2]
    assert (chain.next_step(1, 0), chain.next_step(1, 1), chain.next_step(2, 2), chain.next_step(3, 0)) == (
        50, 60, 180, 230)
    assert Chain.from_dict(chain.as_dict()) == chain
    # Without reminders the last tier has nothing left but the expiry.
    assert Chain.of([stop], 3600).next_step(3, 0) is None
