"""Which escalations no reviewer could ever grant: a policy naming a role that no approver who can sign
in holds, or asking for more distinct approvers than there are; and the tiers of an escalation chain
(`@escalate_after`) that reach nobody, whose time would pass with nobody told.

Such a policy still escalates: the call is held (up to `hold_max_wait`) and its request waits until it
expires, for a decision nobody can make, which the agent sees as a hang and the operator as nothing at
all. So start-up, `cedargate check` and `/status` name each one, with the role and why. Plain data in,
plain data out: the policies, and the approvers with their roles (those who can sign in, and those
configured without a token), so any front can ask.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from proxy.cedar.escalation import requirement_of, span_text
from proxy.cedar.policy import PolicyInfo
from proxy.settings.config import ApproverCredential


@dataclass(frozen=True)
class UnreachableEscalation:
    """One policy whose escalation no set of approvers able to sign in can satisfy."""

    policy_id: str
    file: str
    line: int
    roles: tuple[str, ...]  # the roles nobody able to sign in holds; empty when the count is the trouble
    why: str
    # The tiers of its escalation chain that reach nobody (2 and up, `@escalate_after`); empty when the
    # trouble is its first tier (`@escalate`), which no set of approvers could then grant at all.
    tiers: tuple[int, ...] = ()

    @property
    def message(self) -> str:
        where = f"{self.file}:{self.line}" if self.file else "policy"
        if self.tiers:
            numbers = ", ".join(str(n) for n in self.tiers)
            return (f'policy "{self.policy_id}" ({where}) escalates to nobody at its chain\'s tier {numbers}: '
                    f"{self.why}")
        return f'policy "{self.policy_id}" ({where}) escalates to nobody who can grant it: {self.why}'

    def as_dict(self) -> dict[str, object]:
        shown: dict[str, object] = {"policy_id": self.policy_id, "file": self.file, "line": self.line,
                                    "roles": list(self.roles), "why": self.why}
        if self.tiers:
            shown["tiers"] = list(self.tiers)
        return shown


def unreachable_escalations(
    policies: Iterable[PolicyInfo],
    can_sign_in: Mapping[str, frozenset[str]],
    without_token: Mapping[str, frozenset[str]] | None = None,
) -> list[UnreachableEscalation]:
    """The escalating policies that the approvers in `can_sign_in` (id -> roles) could never grant.

    `without_token` (id -> roles) are approvers configured whose token is missing (an unset variable):
    they are named in the reason, since setting the token is then the fix.
    """
    missing_token = without_token or {}
    found: list[UnreachableEscalation] = []
    held = {role for roles in can_sign_in.values() for role in roles}
    for policy in sorted(policies, key=lambda p: (p.file, p.line, p.policy_id)):
        requirement = requirement_of(policy)
        if requirement is None:
            continue
        if requirement.satisfied_by(can_sign_in):
            # Grantable by its first tier; a later tier nobody holds would still be told to nobody.
            silent = [(number, tier) for number, tier in enumerate(requirement.tiers, start=2)
                      if not set(tier.roles) & held]
            if silent:
                lacking = tuple(role for _, tier in silent for role in tier.roles)
                why = "; ".join(f"tier {number} (after {span_text(tier.after)}): "
                                + "; ".join(_why_not(role, missing_token) for role in tier.roles)
                                for number, tier in silent)
                found.append(UnreachableEscalation(policy.policy_id, policy.file, policy.line, lacking, why,
                                                   tuple(number for number, _ in silent)))
            continue
        lacking = tuple(role for role in requirement.roles if role not in held)
        reasons = [_why_not(role, missing_token) for role in lacking]
        if not lacking:
            eligible = sorted(a for a, roles in can_sign_in.items() if roles & set(requirement.roles))
            roles = ", ".join(f'"{r}"' for r in requirement.roles)
            if len(eligible) < requirement.count:
                reasons.append(f"it needs {requirement.count} distinct approvers holding {roles}, and only "
                               f"{len(eligible)} can sign in ({', '.join(eligible) or 'none'})")
            else:
                reasons.append(f"no {requirement.count} distinct approvers among {', '.join(eligible)} cover "
                               f"every one of {roles}")
        found.append(UnreachableEscalation(policy.policy_id, policy.file, policy.line, lacking, "; ".join(reasons)))
    return found


def _why_not(role: str, missing_token: Mapping[str, frozenset[str]]) -> str:
    idle = sorted(a for a, roles in missing_token.items() if role in roles)
    if idle:
        return f'role "{role}" is held only by {", ".join(idle)}, without a token (its token_env variable is not set)'
    return f'no configured approver holds role "{role}"'


def approver_roles(approvers: Mapping[str, ApproverCredential], can_sign_in: AbstractSet[str]
                   ) -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]]]:
    """The configured approvers' roles, split into those who can sign in and those without a token."""
    roles = {name: frozenset(credential.roles) for name, credential in approvers.items()}
    return ({n: r for n, r in roles.items() if n in can_sign_in},
            {n: r for n, r in roles.items() if n not in can_sign_in})


def with_tokens(approvers: Mapping[str, ApproverCredential], environ: Mapping[str, str]) -> frozenset[str]:
    """The approvers who have a token here: a hash in the file, or a variable set in `environ`
    (as `AgentDirectory` reads them at start)."""
    return frozenset(name for name, credential in approvers.items()
                     if credential.token_sha256 or (credential.token_env and environ.get(credential.token_env)))
