"""The catalogue of refusals: every problem type cedargate answers with (RFC 9457 problem+json)."""

from __future__ import annotations

from enum import Enum
from typing import Any

PROBLEM_BASE = "urn:cedargate:problem:"


class Problem(str, Enum):
    """Why a call was refused; the value is the tail of the problem type URI."""

    POLICY_DENIED = "policy-denied"
    NO_PERMIT = "no-permit"
    EVALUATION_ERROR = "evaluation-error"
    MAPPING_ERROR = "mapping-error"
    UNKNOWN_ACTION = "unknown-action"
    STORE_UNAVAILABLE = "store-unavailable"
    PROXY_API = "proxy-api"
    OVERRIDE_PENDING = "override-pending"
    OVERRIDE_DENIED = "override-denied"
    OVERRIDE_EXPIRED = "override-expired"
    RELEASE_REFUSED = "override-release-refused"
    # Decided and forwarded, and then the upstream failed it (see proxy.decision.upstream).
    UPSTREAM_UNREACHABLE = "upstream-unreachable"
    UPSTREAM_TLS = "upstream-tls"
    UPSTREAM_TIMEOUT = "upstream-timeout"
    UPSTREAM_RESET = "upstream-reset"
    UPSTREAM_ANSWER = "upstream-answer"
    # What the proxy's HTTP layer refused or failed on its own, before or without a decision.
    HTTP_ERROR = "http-error"
    # Escalated, but no override request could be opened for it (see proxy.oversight.limits).
    OVERRIDE_BODY_TOO_LARGE = "override-body-too-large"
    TOO_MANY_PENDING_OVERRIDES = "too-many-pending-overrides"
    OVERRIDE_RATE_LIMITED = "override-rate-limited"
    # Refused before any decision, by the proxy's limits (proxy.calls.connections): no agent, no record.
    REQUEST_TOO_LARGE = "request-too-large"
    HEADERS_TOO_LARGE = "request-headers-too-large"

    @property
    def uri(self) -> str:
        return PROBLEM_BASE + self.value


_TITLES = {
    Problem.POLICY_DENIED: "Denied by policy",
    Problem.NO_PERMIT: "No policy permits this call",
    Problem.EVALUATION_ERROR: "Policy evaluation failed; call refused",
    Problem.MAPPING_ERROR: "Call cannot be checked; refused",
    Problem.UNKNOWN_ACTION: "Unknown action: no manifest route classifies this call",
    Problem.STORE_UNAVAILABLE: "Decision record unavailable; call refused",
    Problem.PROXY_API: "Agents cannot call cedargate's own API",
    Problem.OVERRIDE_PENDING: "Denied by policy; a human is reviewing an override request",
    Problem.OVERRIDE_DENIED: "Denied by policy; the override request was denied",
    Problem.OVERRIDE_EXPIRED: "Denied by policy; the override request expired",
    Problem.RELEASE_REFUSED: "Override granted, but current policy now refuses the call",
    Problem.UPSTREAM_UNREACHABLE: "The upstream could not be reached",
    Problem.UPSTREAM_TLS: "TLS with the upstream failed",
    Problem.UPSTREAM_TIMEOUT: "The upstream did not answer in time",
    Problem.UPSTREAM_RESET: "The upstream closed the connection without answering",
    Problem.UPSTREAM_ANSWER: "The upstream's answer cannot be passed on",
    Problem.HTTP_ERROR: "The proxy could not handle this HTTP message",
    Problem.OVERRIDE_BODY_TOO_LARGE: "Denied by policy; the body is too large to put before a reviewer",
    Problem.TOO_MANY_PENDING_OVERRIDES: "Denied by policy; too many of the agent's override requests await review",
    Problem.OVERRIDE_RATE_LIMITED: "Denied by policy; this agent opens override requests too fast",
    Problem.REQUEST_TOO_LARGE: "Request body too large; call refused",
    Problem.HEADERS_TOO_LARGE: "Request headers too large; call refused",
}


def problem_document(problem: Problem, status: int, detail: str) -> dict[str, Any]:
    """The RFC 9457 members every cedargate answer has, also where no call was decided."""
    return {"type": problem.uri, "title": _TITLES[problem], "status": status, "detail": detail}
