"""cedargate's answers in place of mitmproxy's HTML error pages: every answer an agent gets is problem+json.

mitmproxy answers some exchanges itself, with an HTML page: an upstream it could not reach or verify,
a connection lost before the answer, a request it could not parse or would not accept. Addons cannot
change those pages (an `error` hook's `flow.response` is ignored: mitmproxy PR 7999, still open), so
`install` changes two places in mitmproxy's HTTP layer, for HTTP/1, HTTP/2 and HTTP/3 alike:

- a stream about to send its error page to a client that has had no answer yet sends a whole response
  instead: the one an `error` hook put in `flow.response` (the enforcer's, naming the decision and
  what failed), or else a problem+json answer made from mitmproxy's status and message;
- the HTTP/1 error page written before there is a stream (a request line it cannot parse) is that
  problem+json answer too.

An HTTP/1 client whose request was read whole keeps its connection, as after any answer; one still
sending its request gets `Connection: close` and the connection is closed, as mitmproxy does.
Written against mitmproxy 11.0.2 (pinned below 12); `install` checks what it replaces is there.
"""

from __future__ import annotations

import json
from collections.abc import Generator

from mitmproxy import http
from mitmproxy.net.http import http1, status_codes
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import (
    HttpErrorHook,
    HttpStream,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    SendHttp,
    _http1,
)

from proxy.vocabulary.problems import Problem, problem_document

_ANSWERED = "_cedargate_answered"  # on a stream: response headers went to the client
_BEFORE_ERROR_HOOK = "_cedargate_response_before_error_hook"  # on a stream: flow.response then
_UNSET = object()


def install() -> None:
    """Put cedargate's answers in place of mitmproxy's error pages, once per process."""
    if getattr(HttpStream.handle_event, "cedargate", False):
        return
    if HttpStream.handle_event is not layer.Layer.handle_event:
        raise RuntimeError("mitmproxy's HttpStream has its own handle_event: cedargate needs mitmproxy 11")
    if not callable(getattr(_http1, "make_error_response", None)):
        raise RuntimeError("mitmproxy's HTTP/1 layer lacks make_error_response: cedargate needs mitmproxy 11")
    HttpStream.handle_event = _stream_handle_event  # type: ignore[method-assign, assignment]
    _http1.make_error_response = error_response_bytes


def problem_answer(status: int, message: str) -> http.Response:
    """cedargate's answer where mitmproxy would send an error page and no addon gave one."""
    if status < 500:
        next_step = "The call was NOT forwarded; correct the request and send it again."
    else:
        next_step = ("The call MAY have reached the upstream; check whether it took effect before repeating "
                     "it, unless it is safe to repeat.")
    detail = f"{message.strip().rstrip('.')}. {next_step}"
    body = json.dumps(problem_document(Problem.HTTP_ERROR, status, detail)).encode()
    return http.Response.make(status, body, {"Content-Type": "application/problem+json"})


def error_response_bytes(status_code: int, message: str = "") -> bytes:
    """`make_error_response` as cedargate writes it: problem+json, and the connection closes after it."""
    response = problem_answer(status_code, message)
    response.headers["Connection"] = "close"
    return http1.assemble_response(response)


def _stream_handle_event(self: HttpStream, event: events.Event) -> layer.CommandGenerator[None]:
    for command in layer.Layer.handle_event(self, event):
        if isinstance(command, SendHttp) and command.connection == self.context.client:
            sent = command.event
            if isinstance(sent, ResponseHeaders) and sent.response.status_code >= 200:
                setattr(self, _ANSWERED, True)  # (a 100 Continue is no answer: the final one is still due)
            elif (isinstance(sent, ResponseProtocolError) and sent.code != status_codes.NO_RESPONSE
                  and not getattr(self, _ANSWERED, False)
                  and not getattr(sent, "answered_as_problem", False)):  # see limited_http.RequestTooLarge
                yield from _answer_instead(self, sent)
                continue
        elif isinstance(command, HttpErrorHook):
            # Whatever the hook leaves in flow.response that was not there before is its answer.
            setattr(self, _BEFORE_ERROR_HOOK, command.flow.response)
        yield command


_stream_handle_event.cedargate = True  # type: ignore[attr-defined]


def _answer_instead(
    stream: HttpStream, error: ResponseProtocolError
) -> Generator[commands.Command, None, None]:
    flow = stream.flow
    before = stream.__dict__.pop(_BEFORE_ERROR_HOOK, _UNSET)
    if before is not _UNSET and flow.response is not None and flow.response is not before:
        response = flow.response
    else:
        response = problem_answer(error.code, error.message)
    setattr(stream, _ANSWERED, True)
    client = stream.context.client
    http1_client = not (flow.request.is_http2 or flow.request.is_http3)
    request_read = stream.client_state == stream.state_done
    if http1_client and not request_read:
        response = response.copy()
        response.headers["Connection"] = "close"
    content = b"" if flow.request.method.upper() == "HEAD" else (response.raw_content or b"")
    yield SendHttp(ResponseHeaders(stream.stream_id, response, not content), client)
    if content:
        yield SendHttp(ResponseData(stream.stream_id, content), client)
    yield SendHttp(ResponseEndOfMessage(stream.stream_id), client)
    if http1_client and not request_read:
        # Closes the connection mid-request, as mitmproxy would; no page follows an answer already sent.
        yield SendHttp(error, client)
