"""Which escalations no reviewer could ever grant: a policy naming a role that no approver who can sign
in holds, or asking for more distinct approvers than there are.

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

from proxy.cedar.escalation import requirement_of
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

    @property
    def message(self) -> str:
        where = f"{self.file}:{self.line}" if self.file else "policy"
        return f'policy "{self.policy_id}" ({where}) escalates to nobody who can grant it: {self.why}'

    def as_dict(self) -> dict[str, object]:
        return {"policy_id": self.policy_id, "file": self.file, "line": self.line, "roles": list(self.roles),
                "why": self.why}


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
    for policy in sorted(policies, key=lambda p: (p.file, p.line, p.policy_id)):
        requirement = requirement_of(policy)
        if requirement is None or requirement.satisfied_by(can_sign_in):
            continue
        held = {role for roles in can_sign_in.values() for role in roles}
        lacking = tuple(role for role in requirement.roles if role not in held)
        reasons = []
        for role in lacking:
            idle = sorted(a for a, roles in missing_token.items() if role in roles)
            if idle:
                reasons.append(f'role "{role}" is held only by {", ".join(idle)}, without a token (its token_env '
                               "variable is not set)")
            else:
                reasons.append(f'no configured approver holds role "{role}"')
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
