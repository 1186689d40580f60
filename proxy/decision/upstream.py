"""What a failed upstream exchange means: its kind, the agent's answer, and whether the call may have run.

A decided call can still fail on its way: no connection, a TLS certificate cedargate cannot verify, a
connection lost after the call was sent, no answer in time. The agent then gets a problem+json answer
saying what failed and what it may do next, and the record keeps the failure kind in the decision's
`errors`. Whether the call may have run comes from whether it was sent (the proxy adapter knows that
from the connection, not from the error's words): a POST that reached a server may have run even when
no answer came back, and an agent that repeats it must know. The kind is read from the error text the
proxy and the OS give, with a safe default for text not known here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from proxy.decision.gate import Verdict
from proxy.vocabulary.problems import Problem

# What the proxy adapter says when it gives up on an upstream, so a failure it caused reads as such.
CONNECT_TIMEOUT_MESSAGE = "cedargate: no connection to the upstream within upstream_connect_timeout"
OWN_API_MESSAGE = "cedargate refuses connections to its own API"


class FailureKind(str, Enum):
    CONNECT_REFUSED = "connect-refused"
    NAME_RESOLUTION = "name-resolution"
    UNREACHABLE = "unreachable"  # any other reason the connection could not be made
    TLS_VERIFY = "tls-verify"
    TLS_HANDSHAKE = "tls-handshake"
    CONNECT_TIMEOUT = "connect-timeout"
    READ_TIMEOUT = "read-timeout"
    RESET = "reset"  # closed or reset after the call was sent, before the whole answer came
    BAD_ANSWER = "bad-answer"  # an answer that is not HTTP the proxy may pass on
    OWN_API = "own-api"  # the name resolved to cedargate's own API: refused before connecting
    CLIENT_CLOSED = "client-closed"  # the agent went away first: there is no one to answer


# Each answered with its problem's status (proxy.vocabulary.problems); a client gone first is recorded
# as 499, nginx's "client closed request", and answered to no one.
_PROBLEMS: dict[FailureKind, Problem] = {
    FailureKind.CONNECT_REFUSED: Problem.UPSTREAM_UNREACHABLE,
    FailureKind.NAME_RESOLUTION: Problem.UPSTREAM_UNREACHABLE,
    FailureKind.UNREACHABLE: Problem.UPSTREAM_UNREACHABLE,
    FailureKind.TLS_VERIFY: Problem.UPSTREAM_TLS,
    FailureKind.TLS_HANDSHAKE: Problem.UPSTREAM_TLS,
    FailureKind.CONNECT_TIMEOUT: Problem.UPSTREAM_TIMEOUT,
    FailureKind.READ_TIMEOUT: Problem.UPSTREAM_TIMEOUT,
    FailureKind.RESET: Problem.UPSTREAM_RESET,
    FailureKind.BAD_ANSWER: Problem.UPSTREAM_ANSWER,
    FailureKind.OWN_API: Problem.PROXY_API,
    FailureKind.CLIENT_CLOSED: Problem.HTTP_ERROR,
}

_WHAT_FAILED = {
    FailureKind.CONNECT_REFUSED: "{target} refused the connection",
    FailureKind.NAME_RESOLUTION: "the host name of {target} could not be resolved",
    FailureKind.UNREACHABLE: "no connection could be made to {target}",
    FailureKind.TLS_VERIFY: "the TLS certificate of {target} could not be verified",
    FailureKind.TLS_HANDSHAKE: "TLS with {target} could not be established",
    FailureKind.CONNECT_TIMEOUT: "{target} did not accept a connection within {timeout:g} s",
    FailureKind.READ_TIMEOUT: "{target} did not answer within {timeout:g} s of being sent the call",
    FailureKind.RESET: "{target} closed the connection before answering",
    FailureKind.BAD_ANSWER: "{target} answered with something that is not acceptable HTTP",
    FailureKind.OWN_API: "{target} is cedargate's own API, which agents cannot call through the proxy",
    FailureKind.CLIENT_CLOSED: "the agent closed the connection before the answer came",
}

_NEXT = {
    FailureKind.CONNECT_REFUSED: "Retry later, or check the address.",
    FailureKind.NAME_RESOLUTION: "Check the host name; retrying will not help until it resolves.",
    FailureKind.UNREACHABLE: "Retry later.",
    FailureKind.TLS_VERIFY: "cedargate sends calls only to upstreams whose certificate it can verify, so "
                            "retrying will not help; an operator can trust a private CA with "
                            "upstream_ca_bundle.",
    FailureKind.TLS_HANDSHAKE: "Retrying is unlikely to help; ask an operator to check the upstream's TLS.",
    FailureKind.CONNECT_TIMEOUT: "Retry later.",
    FailureKind.OWN_API: "Use the override API directly, as a human; the proxy never forwards calls to it.",
}
_MAY_HAVE_RUN = ("The call MAY have been executed: it reached the upstream before the failure. Check whether "
                 "it took effect before repeating it, unless it is safe to repeat (GET, or idempotent).")
_NOT_RUN = "The call was NOT executed: it never reached the upstream."


@dataclass(frozen=True)
class UpstreamFailure:
    kind: FailureKind
    message: str  # the proxy's or the OS's own words, for the record and the detail
    sent: bool  # whether the call left cedargate: if it did, it may have run
    timeout: float | None = None  # the timeout that ran out, for the timeout kinds

    @property
    def answerable(self) -> bool:
        return self.kind is not FailureKind.CLIENT_CLOSED

    @property
    def recorded(self) -> str:
        """The line the decision record keeps in `errors`."""
        if self.kind is FailureKind.CLIENT_CLOSED:
            return f"client-closed: {self.message}"
        return f"upstream {self.kind.value}: {self.message} (call {'sent' if self.sent else 'not sent'})"

    def detail(self, target: str) -> str:
        what = _WHAT_FAILED[self.kind].format(target=target, timeout=self.timeout or 0)
        outcome = _MAY_HAVE_RUN if self.sent else _NOT_RUN
        advice = "" if self.sent else " " + _NEXT.get(self.kind, "Retry later.")
        return f"{what} ({self.message}). {outcome}{advice}"

    def refusal(self, verdict: Verdict) -> Verdict:
        """The verdict of the forwarded call, as the refusal the agent gets; its record stays the decision."""
        problem = _PROBLEMS[self.kind]
        status = problem.entry.status if self.answerable else 499
        call = verdict.call
        target = f"{call.scheme}://{call.host}:{call.port}"
        executed = "maybe" if self.sent else "no"
        extra = {**verdict.extra, "upstream_failure": self.kind.value, "executed": executed}
        return replace(verdict, problem=problem, status=status, detail=self.detail(target), extra=extra)


def classify(
    message: str, *, sent: bool, tls: bool = False, timed_out: bool = False, timeout: float | None = None,
    client_gone: bool = False,
) -> UpstreamFailure:
    """The failure an exchange ended with.

    `sent`: the call left cedargate (its connection was established). `timed_out`: cedargate gave up
    waiting, after `timeout` seconds. `client_gone`: the agent's side ended the exchange. `tls`: the
    upstream was to be reached over TLS (a connection closed during its handshake is a TLS failure).
    """
    text = message.lower()
    if client_gone:
        kind = FailureKind.CLIENT_CLOSED
    elif timed_out or CONNECT_TIMEOUT_MESSAGE.lower() in text:
        kind = FailureKind.READ_TIMEOUT if sent else FailureKind.CONNECT_TIMEOUT
    elif OWN_API_MESSAGE.lower() in text:
        kind = FailureKind.OWN_API
    elif sent:
        bad_answer = not any(m in text for m in _LOST) and any(m in text for m in _BAD_ANSWER)
        kind = FailureKind.BAD_ANSWER if bad_answer else FailureKind.RESET
    elif "certificate verify failed" in text:
        kind = FailureKind.TLS_VERIFY
    elif "[errno 111]" in text or "connection refused" in text:
        kind = FailureKind.CONNECT_REFUSED
    elif any(m in text for m in _NAME_RESOLUTION):
        kind = FailureKind.NAME_RESOLUTION
    elif "[errno 110]" in text or "timed out" in text:
        kind = FailureKind.CONNECT_TIMEOUT
    elif tls and any(m in text for m in _TLS):
        kind = FailureKind.TLS_HANDSHAKE
    else:
        kind = FailureKind.UNREACHABLE
    return UpstreamFailure(kind, message, sent, timeout if kind.value.endswith("timeout") else None)


_NAME_RESOLUTION = ("name or service not known", "[errno -2]", "[errno -3]", "[errno -5]",
                    "temporary failure in name resolution", "no address associated", "nodename nor servname")
# mitmproxy's words for a server TLS handshake that failed (proxy/layers/tls.py), and a close during it.
_TLS = ("tls", "ssl", "certificate", "alert", "handshake", "connection closed")
# Words for a connection lost mid-answer (h11's via mitmproxy: "peer closed connection without sending ...").
_LOST = ("closed connection", "connection closed", "reset", "broken pipe", "eof")
# mitmproxy's words for an answer it could not read or would not pass on (proxy/layers/http).
_BAD_ANSWER = ("cannot parse http response", "unexpected server response", "from server, refusing",
               "response body exceeds", "invalid http/2", "protocol error")
