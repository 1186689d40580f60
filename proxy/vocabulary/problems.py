"""The catalogue of refusals: every problem type cedargate answers with (RFC 9457 problem+json).

Each `Problem` has its type URI, its title, the status it is usually answered with, what an agent
should do next (the `next_step` member of the problem+json) and what an MCP client's model is told to do
(the last line of the text it is shown, see `proxy.calls.mcp.refusals`). Every answer cedargate builds,
the proxy's refusals, its error pages, its MCP answers and the override API's errors, is made here by
`problem_document` (or `http_problem`, for the API's errors that RFC 9457's `about:blank` covers).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from http import HTTPStatus
from typing import Any

PROBLEM_BASE = "urn:cedargate:problem:"
MEDIA_TYPE = "application/problem+json"


@dataclass(frozen=True)
class ProblemType:
    title: str
    status: int  # the usual status; a call refused by the mapping, say, gets the mapping's own
    next_step: str  # for an agent: what to do about it
    model_step: str = ""  # for a model, where an MCP client's wording differs from the agent's

    @property
    def step_for_model(self) -> str:
        return self.model_step or self.next_step


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
    OVERRIDE_NEEDS_INFO = "override-needs-info"
    RELEASE_REFUSED = "override-release-refused"
    # Decided and forwarded, and then the upstream failed it (see proxy.decision.upstream).
    UPSTREAM_UNREACHABLE = "upstream-unreachable"
    UPSTREAM_TLS = "upstream-tls"
    UPSTREAM_TIMEOUT = "upstream-timeout"
    UPSTREAM_RESET = "upstream-reset"
    UPSTREAM_ANSWER = "upstream-answer"
    # A call released under an override grant that never reached the upstream: the grant is kept.
    GRANT_KEPT = "override-grant-kept"
    # What the proxy's HTTP layer refused or failed on its own, before or without a decision.
    HTTP_ERROR = "http-error"
    # Escalated, but no override request could be opened for it (see proxy.oversight.limits).
    OVERRIDE_BODY_TOO_LARGE = "override-body-too-large"
    TOO_MANY_PENDING_OVERRIDES = "too-many-pending-overrides"
    OVERRIDE_RATE_LIMITED = "override-rate-limited"
    # Escalated where no reviewer can reach cedargate (its override API did not start): refused, not held.
    REVIEW_UNAVAILABLE = "review-unavailable"
    # Refused before any decision, by the proxy's limits (proxy.calls.connections): no agent, no record.
    REQUEST_TOO_LARGE = "request-too-large"
    HEADERS_TOO_LARGE = "request-headers-too-large"
    # Refused before any decision: the agent is not known (addons.agent_auth), or cedargate itself failed.
    PROXY_AUTH_REQUIRED = "proxy-auth-required"
    INTERNAL_ERROR = "internal-error"
    # Refused before any decision: the proxy is stopping, and takes no new call on a kept-alive connection.
    STOPPING = "proxy-stopping"
    # Refused before any decision: the proxy has as many connections open as it may (proxy.calls.capacity).
    SATURATED = "proxy-saturated"
    # A reviewer's approval with changes that cannot be taken (the override API; see proxy.oversight.changes).
    OVERRIDE_CHANGES_INVALID = "override-changes-invalid"
    OVERRIDE_CHANGES_REFUSED = "override-changes-refused"
    OVERRIDE_CHANGES_DISAGREE = "override-changes-disagree"

    @property
    def uri(self) -> str:
        return PROBLEM_BASE + self.value

    @property
    def entry(self) -> ProblemType:
        """Its title, usual status and next steps."""
        return CATALOGUE[self]

    @classmethod
    def of_type(cls, uri: str) -> Problem | None:
        """The problem a type URI names; None for another's (e.g. `about:blank`)."""
        if not uri.startswith(PROBLEM_BASE):
            return None
        try:
            return cls(uri[len(PROBLEM_BASE):])
        except ValueError:
            return None


_NO_RETRY = "Do not retry this call."
_NOT_RUN = "The call was not executed; the detail says whether retrying helps."
_MAY_HAVE_RUN = "The call may have run: check whether it took effect before repeating it."

CATALOGUE: dict[Problem, ProblemType] = {
    Problem.POLICY_DENIED: ProblemType("Denied by policy", 403,
                                       "This is a hard denial: do not retry this call."),
    Problem.NO_PERMIT: ProblemType("No policy permits this call", 403,
                                   "No policy allows it: do not retry this call."),
    Problem.EVALUATION_ERROR: ProblemType(
        "Policy evaluation failed; call refused", 403,
        "Do not retry this call; an operator must mend the policies first."),
    Problem.MAPPING_ERROR: ProblemType("Call cannot be checked; refused", 400,
                                       "Mend the call as the detail says and send it again."),
    Problem.UNKNOWN_ACTION: ProblemType(
        "Unknown action: no manifest route classifies this call", 403,
        "Do not retry this call; an operator must classify it in actions.yaml first.",
        "Do not retry this call; an operator must classify the tool first."),
    Problem.STORE_UNAVAILABLE: ProblemType("Decision record unavailable; call refused", 503,
                                           "This is temporary: retry the call in a little while."),
    Problem.PROXY_API: ProblemType("Agents cannot call cedargate's own API", 403,
                                   "Do not retry this call: the override API is for humans."),
    Problem.OVERRIDE_PENDING: ProblemType(
        "Denied by policy; a human is reviewing an override request", 403,
        "Retry the identical call after Retry-After; it goes through once the request is granted.",
        "A human is reviewing an override request for it. Retry the identical call (same tool, same "
        "arguments) later; it goes through once it is granted."),
    Problem.OVERRIDE_DENIED: ProblemType("Denied by policy; the override request was denied", 403,
                                         "A reviewer denied the exception: do not retry this call."),
    Problem.OVERRIDE_EXPIRED: ProblemType(
        "Denied by policy; the override request expired", 403,
        "The override request expired without a decision; retrying asks again."),
    Problem.OVERRIDE_NEEDS_INFO: ProblemType(
        "Denied by policy; a reviewer asks for more information before deciding", 403,
        "Answer the question (in `question`): retry the identical call with your answer in "
        "X-Agent-Justification; it is held for review again.",
        "A reviewer asks a question before deciding (above). Tell the user the question; the identical call "
        "sent again with the answer as its X-Agent-Justification is held for review again."),
    Problem.RELEASE_REFUSED: ProblemType("Override granted, but current policy now refuses the call", 403,
                                         _NO_RETRY),
    Problem.UPSTREAM_UNREACHABLE: ProblemType("The upstream could not be reached", 502, _NOT_RUN),
    Problem.UPSTREAM_TLS: ProblemType("TLS with the upstream failed", 502, _NOT_RUN),
    Problem.UPSTREAM_TIMEOUT: ProblemType("The upstream did not answer in time", 504,
                                          "The detail says whether the call may have run; if it may, check "
                                          "whether it took effect before repeating it."),
    Problem.UPSTREAM_RESET: ProblemType("The upstream closed the connection without answering", 502,
                                        _MAY_HAVE_RUN),
    Problem.GRANT_KEPT: ProblemType(
        "The upstream could not be reached; the override grant is kept", 502,
        "The call was not executed and its grant is kept: retry the identical call later; it goes through "
        "without a new approval while the grant lasts."),
    Problem.UPSTREAM_ANSWER: ProblemType("The upstream's answer cannot be passed on", 502, _MAY_HAVE_RUN),
    Problem.HTTP_ERROR: ProblemType("The proxy could not handle this HTTP message", 502,
                                    "The detail says whether the call was forwarded; if it may have been, "
                                    "check whether it took effect before repeating it."),
    Problem.OVERRIDE_BODY_TOO_LARGE: ProblemType(
        "Denied by policy; the body is too large to put before a reviewer", 413,
        "Waiting will not help: send a smaller call, or do without it."),
    Problem.TOO_MANY_PENDING_OVERRIDES: ProblemType(
        "Denied by policy; too many of the agent's override requests await review", 429,
        "Retry once reviewers have decided some of your pending override requests."),
    Problem.OVERRIDE_RATE_LIMITED: ProblemType(
        "Denied by policy; this agent opens override requests too fast", 429,
        "Retry after the seconds in Retry-After."),
    Problem.REVIEW_UNAVAILABLE: ProblemType(
        "Denied by policy; no reviewer can be reached to grant an exception", 403,
        "Do not retry until an operator starts the override API; the call was not forwarded."),
    Problem.REQUEST_TOO_LARGE: ProblemType("Request body too large; call refused", 413,
                                           "The call was not forwarded; send a smaller body."),
    Problem.HEADERS_TOO_LARGE: ProblemType("Request headers too large; call refused", 431,
                                           "The call was not forwarded; send shorter headers."),
    Problem.PROXY_AUTH_REQUIRED: ProblemType("Proxy authentication required", 407,
                                             "Send the agent's proxy credentials and retry."),
    Problem.INTERNAL_ERROR: ProblemType("cedargate failed to decide this call; it was not forwarded", 500,
                                        "Retry later; if it persists, tell an operator."),
    Problem.STOPPING: ProblemType("cedargate is stopping; the call was not forwarded", 503,
                                  "Retry the call on a new connection: another cedargate process takes it."),
    Problem.SATURATED: ProblemType("cedargate has as many connections open as it may; the call was not read", 503,
                                   "Retry after the seconds in Retry-After, when held calls have ended and "
                                   "connections have closed."),
    # For a reviewer, not an agent: their approval with changes was not taken.
    Problem.OVERRIDE_CHANGES_INVALID: ProblemType(
        "The changes do not fit the call", 422,
        "Change only the request's editable_fields, each with a value of its type, and approve again."),
    Problem.OVERRIDE_CHANGES_REFUSED: ProblemType(
        "The policies refuse the changed call", 409,
        "Change the values so the policies named allow the call, approve it as sent, or deny it."),
    Problem.OVERRIDE_CHANGES_DISAGREE: ProblemType(
        "The approvers disagree on the changes", 409,
        "Approve with the changes the earlier approvals made (see the request's changes), or deny it."),
}


def problem_document(problem: Problem, status: int | None = None, detail: str = "", **more: Any) -> dict[str, Any]:
    """The RFC 9457 members every cedargate answer has, also where no call was decided; `status` defaults
    to the problem's usual one, and `more` adds members (the decision id, the override...)."""
    entry = problem.entry
    document: dict[str, Any] = {"type": problem.uri, "title": entry.title, "status": status or entry.status}
    if detail:
        document["detail"] = detail
    document["next_step"] = entry.next_step
    document.update(more)
    return document


def http_problem(status: int, detail: Any, **more: Any) -> dict[str, Any]:
    """An error of the override API's HTTP: `about:blank`, titled by its status (RFC 9457 4.2.1) unless
    `more` gives a title; `more` adds members."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    return {"type": "about:blank", "title": title, "status": status, "detail": detail, **more}
