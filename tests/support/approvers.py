"""Approvers for tests of the override API: credentials whose token is `<name>-token`, and its bearer header."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from proxy.settings.config import ApproverCredential


def credentials(roles: Mapping[str, tuple[str, ...]]) -> dict[str, ApproverCredential]:
    """Each named approver with their roles, signing in with the token `<name>-token`."""
    return {name: ApproverCredential(token_sha256=hashlib.sha256(f"{name}-token".encode()).hexdigest(), roles=held)
            for name, held in roles.items()}


def bearer(name: str) -> dict[str, str]:
    """The Authorization header of the approver `name` made by `credentials`."""
    return {"Authorization": f"Bearer {name}-token"}
