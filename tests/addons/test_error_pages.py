"""mitmproxy's own error answers, as cedargate writes them: problem+json, never an HTML page.

The stream-level replacement (an `error` hook's answer, or this one) is exercised through the real proxy
over HTTP/1.1 and HTTP/2 in tests/e2e/test_boundary_upstream.py.
"""

from __future__ import annotations

import json

from mitmproxy.net.http import http1

from addons import error_pages


def test_a_request_mitmproxy_refuses_gets_a_problem_saying_it_was_not_forwarded():
    answer = error_pages.problem_answer(400, "Bad HTTP request line: b'GET / HTTP/1.1 EXTRA'")
    assert answer.status_code == 400 and answer.headers["Content-Type"] == "application/problem+json"
    assert json.loads(answer.content) == {
        "type": "urn:cedargate:problem:http-error",
        "title": "The proxy could not handle this HTTP message",
        "status": 400,
        "detail": "Bad HTTP request line: b'GET / HTTP/1.1 EXTRA'. The call was NOT forwarded; correct the "
                  "request and send it again.",
        "next_step": "The detail says whether the call was forwarded; if it may have been, check whether it "
                     "took effect before repeating it.",
    }


def test_a_failure_past_the_upstream_says_the_call_may_have_run():
    detail = json.loads(error_pages.problem_answer(502, "server closed connection").content)["detail"]
    assert "MAY have reached the upstream" in detail


def test_the_http1_page_written_before_any_stream_is_problem_json_and_closes():
    raw = error_pages.error_response_bytes(400, "Bad HTTP request line")
    response = http1.read_response_head(raw.split(b"\r\n\r\n")[0].split(b"\r\n"))
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.headers["Connection"] == "close" and "Server" not in response.headers
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert int(response.headers["Content-Length"]) == len(body)
    assert json.loads(body)["type"] == "urn:cedargate:problem:http-error"


def test_installing_twice_changes_nothing():
    error_pages.install()
    first = error_pages.HttpStream.handle_event
    error_pages.install()
    assert error_pages.HttpStream.handle_event is first
