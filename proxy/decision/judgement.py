"""What the policies say of one Cedar request, by the gate's rules: allow, a hard deny, an escalation, or
an error, with the policies that determined it.

The one place the rules live (see `proxy.decision.gate`): a denial escalates only if every determining
forbid carries `@escalate` and the call would be allowed with those forbids lifted; otherwise it is a hard
deny, `no-permit` when no permit allows the call even then, `policy-denied` when a forbid without
`@escalate` matches. The gate words a verdict for the agent from it; `cedargate replay` and the shadow
policies judge recorded or live requests against another policy set with it, so all three agree by
construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from proxy.cedar.engine import CedarRequest, Engine, Snapshot
from proxy.cedar.escalation import is_escalatable
from proxy.cedar.policy import PolicyInfo
from proxy.vocabulary.problems import Problem


class Outcome(str, Enum):
    ALLOW = "allow"
    DENY = "deny"  # a hard deny: no human can override it
    ESCALATE = "escalate"  # denied only by @escalate forbids, beneath which a permit allows the call
    ERROR = "error"


@dataclass(frozen=True)
class Judgement:
    outcome: Outcome
    determining: tuple[PolicyInfo, ...]
    errors: tuple[str, ...]
    revision: str
    problem: Problem | None = None
    cedar_decision: str = ""  # Cedar's own answer ("Allow", "Deny", "NoDecision")
    forbids: tuple[PolicyInfo, ...] = ()  # a denial's determining forbids
    # The permits that allow the call once its escalatable forbids are lifted: what a grant releases under.
    beneath: tuple[PolicyInfo, ...] = ()


def judge(engine: Engine, request: CedarRequest, snapshot: Snapshot) -> Judgement:
    """The gate's decision on `request` under `snapshot` (which need not be `engine`'s live one)."""
    evaluation = engine.evaluate(request, snapshot)
    determining, revision = evaluation.policies, evaluation.revision
    if evaluation.allowed:
        return Judgement(Outcome.ALLOW, determining, evaluation.errors, revision, cedar_decision="Allow")
    if evaluation.errors or evaluation.decision != "Deny":
        return Judgement(Outcome.ERROR, determining, evaluation.errors, revision, Problem.EVALUATION_ERROR,
                         evaluation.decision)
    forbids = tuple(p for p in determining if p.effect == "forbid")
    if not forbids:
        return Judgement(Outcome.DENY, determining, (), revision, Problem.NO_PERMIT, "Deny")
    if not all(is_escalatable(p) for p in forbids):
        return Judgement(Outcome.DENY, determining, (), revision, Problem.POLICY_DENIED, "Deny", forbids)
    # Every forbid is escalatable; a grant would lift them, so what lies beneath decides.
    lifted = engine.evaluate(request, snapshot, lifted=True)
    if lifted.allowed:
        return Judgement(Outcome.ESCALATE, determining, (), revision, Problem.POLICY_DENIED, "Deny", forbids,
                         beneath=lifted.policies)
    if lifted.errors:  # cannot happen after an error-free first evaluation of a superset; refuse anyway
        return Judgement(Outcome.ERROR, determining, lifted.errors, revision, Problem.EVALUATION_ERROR, "Deny")
    others = tuple(p for p in lifted.policies if p.effect == "forbid")
    if others:  # likewise impossible (Cedar reports every matching forbid), and a hard deny all the same
        return Judgement(Outcome.DENY, forbids + others, (), revision, Problem.POLICY_DENIED, "Deny",
                         forbids + others)
    # The escalatable forbids cover for a missing permit: a grant could not make the call allowed.
    return Judgement(Outcome.DENY, determining, (), revision, Problem.NO_PERMIT, "Deny", forbids)
