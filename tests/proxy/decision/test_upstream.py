"""What a failed upstream exchange means: the kind read from the proxy's and the OS's words, the answer the
agent gets (what failed, whether the call may have run, what to do next), and the row the record keeps.

The messages are the ones mitmproxy 11 and CPython give, as seen through the real proxy
(tests/e2e/test_boundary_upstream.py drives each failure for real).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from proxy_support import make_call, sqlite_rows

from proxy.decision.gate import Gate
from proxy.decision.upstream import CONNECT_TIMEOUT_MESSAGE, OWN_API_MESSAGE, FailureKind, classify
from proxy.record.store import Recorder
from proxy.vocabulary.problems import Problem

DEV_STOP = ("POST", "http://localhost:9000/v1/instances/i-1/stop")  # allowed: localhost is a dev host


@pytest.mark.parametrize("message,sent,tls,kind", [
    ("[Errno 111] Connect call failed ('127.0.0.1', 9)", False, False, FailureKind.CONNECT_REFUSED),
    ("Multiple exceptions: [Errno 111] Connect call failed ('::1', 9, 0, 0), "
     "[Errno 111] Connect call failed ('127.0.0.1', 9)", False, True, FailureKind.CONNECT_REFUSED),
    ("[Errno -2] Name or service not known", False, False, FailureKind.NAME_RESOLUTION),
    ("[Errno -3] Temporary failure in name resolution", False, True, FailureKind.NAME_RESOLUTION),
    ("[Errno 101] Network is unreachable", False, False, FailureKind.UNREACHABLE),
    ("[Errno 110] Connect call failed ('10.1.1.1', 443)", False, True, FailureKind.CONNECT_TIMEOUT),
    ("Certificate verify failed: self-signed certificate", False, True, FailureKind.TLS_VERIFY),
    ("Certificate verify failed: Hostname mismatch", False, True, FailureKind.TLS_VERIFY),
    ("The remote server does not speak TLS.", False, True, FailureKind.TLS_HANDSHAKE),
    ("connection closed", False, True, FailureKind.TLS_HANDSHAKE),  # closed during the handshake
    ("connection closed", False, False, FailureKind.UNREACHABLE),
    (f"Connection killed: {CONNECT_TIMEOUT_MESSAGE}", False, False, FailureKind.CONNECT_TIMEOUT),
    (f"Connection killed: {OWN_API_MESSAGE}", False, False, FailureKind.OWN_API),
    ("server closed connection", True, False, FailureKind.RESET),
    ("peer closed connection", True, True, FailureKind.RESET),  # an HTTP/2 upstream
    ("HTTP/1 protocol error: peer closed connection without sending complete message body "
     "(received 6 bytes, expected 100)", True, False, FailureKind.RESET),
    ("Cannot parse HTTP response: Bad HTTP response line: b'SSH-2.0-OpenSSH_9.6'", True, False,
     FailureKind.BAD_ANSWER),
    ("unexpected server response: b'garbage'", True, False, FailureKind.BAD_ANSWER),
    ("Received invalid header from server, refusing to prevent request smuggling attacks.", True, False,
     FailureKind.BAD_ANSWER),
    ("something no one foresaw", True, False, FailureKind.RESET),
    ("something no one foresaw", False, True, FailureKind.UNREACHABLE),
])
def test_the_kind_comes_from_the_words_and_whether_the_call_was_sent(message, sent, tls, kind):
    failure = classify(message, sent=sent, tls=tls)
    assert failure.kind is kind
    assert failure.sent is sent


def test_a_deadline_cedargate_enforced_is_a_timeout_before_or_after_sending():
    # The words are then mitmproxy's ("connection closed", "server closed connection"): the flag decides.
    assert classify("connection closed", sent=False, tls=True, timed_out=True, timeout=10).kind \
        is FailureKind.CONNECT_TIMEOUT
    read = classify("server closed connection", sent=True, timed_out=True, timeout=60)
    assert read.kind is FailureKind.READ_TIMEOUT and read.timeout == 60


def test_the_agent_going_away_is_not_an_upstream_failure_and_gets_no_answer():
    failure = classify("Client disconnected.", sent=True, client_gone=True)
    assert failure.kind is FailureKind.CLIENT_CLOSED and not failure.answerable
    assert failure.recorded == "client-closed: Client disconnected."


def test_a_refused_connection_answers_502_saying_the_call_never_ran(gate: Gate):
    verdict = gate.decide(make_call(*DEV_STOP))
    failure = classify("[Errno 111] Connect call failed ('127.0.0.1', 9000)", sent=False)
    problem = failure.refusal(verdict).problem_body()
    assert problem["type"] == "urn:cedargate:problem:upstream-unreachable"
    assert problem["title"] == "The upstream could not be reached" and problem["status"] == 502
    assert problem["detail"] == (
        "http://localhost:9000 refused the connection ([Errno 111] Connect call failed ('127.0.0.1', 9000)). "
        "The call was NOT executed: it never reached the upstream. Retry later, or check the address."
    )
    assert (problem["upstream_failure"], problem["executed"]) == ("connect-refused", "no")
    # Still the decision that let the call go, for the agent to quote.
    assert problem["decision_id"] == verdict.decision_id
    assert problem["policies"][0]["id"] == "ops-stop-instance"


def test_a_lost_connection_after_sending_says_the_call_may_have_run(gate: Gate):
    verdict = gate.decide(make_call(*DEV_STOP))
    refusal = classify("server closed connection", sent=True).refusal(verdict)
    problem = refusal.problem_body()
    assert refusal.status == 502 and problem["type"] == "urn:cedargate:problem:upstream-reset"
    assert problem["executed"] == "maybe"
    assert "MAY have been executed" in problem["detail"] and "before repeating it" in problem["detail"]
    assert "NOT executed" not in problem["detail"]


@pytest.mark.parametrize("sent,timeout,words", [
    (False, 10, "did not accept a connection within 10 s"),
    (True, 2.5, "did not answer within 2.5 s of being sent the call"),
])
def test_a_timeout_answers_504_with_the_wait_that_ran_out(gate: Gate, sent, timeout, words):
    verdict = gate.decide(make_call(*DEV_STOP))
    refusal = classify("connection closed", sent=sent, timed_out=True, timeout=timeout).refusal(verdict)
    assert refusal.status == 504 and refusal.problem is Problem.UPSTREAM_TIMEOUT
    assert words in refusal.detail
    assert ("MAY have been executed" in refusal.detail) is sent


def test_an_unverified_certificate_says_retrying_will_not_help(gate: Gate):
    verdict = gate.decide(make_call("GET", "https://localhost:9443/v1/instances"))
    failure = classify("Certificate verify failed: self-signed certificate", sent=False, tls=True)
    refusal = failure.refusal(verdict)
    assert refusal.problem is Problem.UPSTREAM_TLS and refusal.status == 502
    assert "retrying will not help" in refusal.detail and "upstream_ca_bundle" in refusal.detail


def test_a_name_resolving_to_cedargates_api_is_refused_as_such(gate: Gate):
    verdict = gate.decide(make_call("GET", "http://api-alias.internal:8081/v1/instances"))
    refusal = classify(f"Connection killed: {OWN_API_MESSAGE}", sent=False).refusal(verdict)
    assert refusal.problem is Problem.PROXY_API and refusal.status == 403


def test_the_record_keeps_the_failure_in_errors(gate: Gate, recorder: Recorder, db_path: Path):
    verdict = gate.decide(make_call(*DEV_STOP))
    gate.finish(verdict, None, classify("server closed connection", sent=True))
    assert recorder.flush()
    [row] = sqlite_rows(db_path)
    assert row["decision"] == "allow" and row["upstream_status"] is None
    assert json.loads(row["errors"]) == ["upstream reset: server closed connection (call sent)"]
