"""Who is calling: agent ids and their proxy tokens, checked without ever keeping a token in clear.

Tokens are long random secrets, so a single SHA-256 is the right hash (as for API keys): it cannot be
brute-forced from the hash and costs nothing per call. A token may instead come from an environment
variable, read once at start.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Mapping

from proxy.settings.config import AgentCredential

log = logging.getLogger(__name__)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


class AgentDirectory:
    """Maps ids (agents, or approvers) to token hashes and checks presented tokens."""

    def __init__(self, credentials: Mapping[str, AgentCredential], environ: Mapping[str, str] = os.environ,
                 kind: str = "agent"):
        self._hashes: dict[str, str] = {}
        for agent_id, cred in credentials.items():
            if cred.token_sha256:
                self._hashes[agent_id] = cred.token_sha256
            elif cred.token_env and environ.get(cred.token_env):
                self._hashes[agent_id] = hash_token(environ[cred.token_env])
            else:
                log.warning("%s %s: environment variable %s is not set; it cannot log in", kind, agent_id,
                            cred.token_env)

    @property
    def agent_ids(self) -> frozenset[str]:
        return frozenset(self._hashes)

    def identify(self, token: str) -> str | None:
        """The id whose token this is (bearer tokens carry no id), or None."""
        presented = hash_token(token)
        for holder, expected in self._hashes.items():
            if hmac.compare_digest(presented, expected):
                return holder
        return None

    def holds(self, agent_id: str, token_sha256: str) -> bool:
        """Whether `agent_id` still has the token of this hash (a rotated or removed one does not)."""
        expected = self._hashes.get(agent_id)
        return expected is not None and hmac.compare_digest(token_sha256, expected)

    def verify(self, agent_id: str, token: str) -> bool:
        expected = self._hashes.get(agent_id)
        # Compare against a dummy for unknown agents too, so timing does not reveal which ids exist.
        presented = hash_token(token)
        return hmac.compare_digest(presented, expected or "0" * 64) and expected is not None
