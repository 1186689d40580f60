"""Reachability of escalations: a policy whose escalation no approver able to sign in could grant is named,
with the role and why; one that someone can grant is not."""

from __future__ import annotations

from proxy.cedar.policy import PolicyInfo
from proxy.oversight.reachability import unreachable_escalations


def forbid(policy_id: str, escalate: str | None = None, approvals: str | None = None) -> PolicyInfo:
    annotations = {"id": policy_id}
    if escalate is not None:
        annotations["escalate"] = escalate
    if approvals is not None:
        annotations["approvals"] = approvals
    return PolicyInfo(policy_id=policy_id, effect="forbid", file="ops.cedar", line=7, annotations=annotations)


def test_a_role_nobody_holds_is_named_with_its_policy():
    found = unreachable_escalations([forbid("protect-prod", "engineering-manager")],
                                    {"sam": frozenset({"security"})})
    assert [(u.policy_id, u.roles) for u in found] == [("protect-prod", ("engineering-manager",))]
    assert found[0].message == ('policy "protect-prod" (ops.cedar:7) escalates to nobody who can grant it: '
                                'no configured approver holds role "engineering-manager"')
    assert found[0].as_dict() == {"policy_id": "protect-prod", "file": "ops.cedar", "line": 7,
                                  "roles": ["engineering-manager"],
                                  "why": 'no configured approver holds role "engineering-manager"'}


def test_a_role_held_only_by_an_approver_without_a_token_says_who():
    found = unreachable_escalations([forbid("protect-prod", "engineering-manager")], {},
                                    {"erin": frozenset({"engineering-manager"})})
    assert found[0].roles == ("engineering-manager",)
    assert 'role "engineering-manager" is held only by erin, without a token' in found[0].why


def test_reachable_escalations_and_plain_forbids_are_not_named():
    policies = [forbid("protect-prod", "engineering-manager"), forbid("no-put"),
                forbid("two-person", "security, lead-engineer")]
    approvers = {"erin": frozenset({"engineering-manager"}), "sam": frozenset({"security"}),
                 "lee": frozenset({"lead-engineer"})}
    assert unreachable_escalations(policies, approvers) == []


def test_the_two_person_rule_needs_two_people_even_when_one_holds_both_roles():
    found = unreachable_escalations([forbid("two-person", "security, lead-engineer")],
                                    {"sec-lead": frozenset({"security", "lead-engineer"})})
    assert found[0].roles == ()
    assert found[0].why == ('it needs 2 distinct approvers holding "security", "lead-engineer", and only 1 can '
                            "sign in (sec-lead)")


def test_more_approvals_than_holders_of_the_role():
    found = unreachable_escalations([forbid("big", "finance", approvals="3")],
                                    {"fran": frozenset({"finance"}), "fred": frozenset({"finance"})})
    assert "needs 3 distinct approvers" in found[0].why and "only 2 can sign in (fran, fred)" in found[0].why


def test_only_the_missing_role_of_several_is_named():
    found = unreachable_escalations([forbid("two-person", "security, lead-engineer")],
                                    {"sam": frozenset({"security"})})
    assert found[0].roles == ("lead-engineer",)
    assert found[0].why == 'no configured approver holds role "lead-engineer"'


def test_a_chain_tier_whose_roles_nobody_holds_is_named_with_its_tier():
    chained = PolicyInfo(policy_id="staging-stop", effect="forbid", file="ops.cedar", line=30, annotations={
        "id": "staging-stop", "escalate": "on-call", "expires": "1h",
        "escalate_after": "10m: secondary-on-call; 30m: engineering-manager"})
    approvers = {"olga": frozenset({"on-call"}), "erin": frozenset({"engineering-manager"})}
    [found] = unreachable_escalations([chained], approvers, {"sid": frozenset({"secondary-on-call"})})
    assert (found.policy_id, found.roles, found.tiers) == ("staging-stop", ("secondary-on-call",), (2,))
    assert found.message == ('policy "staging-stop" (ops.cedar:30) escalates to nobody at its chain\'s tier 2: '
                             'tier 2 (after 10m): role "secondary-on-call" is held only by sid, without a token '
                             "(its token_env variable is not set)")
    assert found.as_dict()["tiers"] == [2]
    # Every tier reached by someone: nothing to say.
    assert unreachable_escalations([chained], {**approvers, "sid": frozenset({"secondary-on-call"})}) == []
