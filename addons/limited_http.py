"""mitmproxy's HTTP layer with cedargate's caps on request heads and bodies (used by `ClientLimits`).

mitmproxy 11 reads a request head of any size into memory (its HTTP/1 reader has a "FIXME: protect
against header size DoS"), and its one body cap, `body_size_limit`, caps answers as well as requests.
So cedargate swaps three classes of `mitmproxy.proxy.layers.http` for subclasses:

- `LimitedHttp1Server`, the HTTP/1 reader of agents' connections: a head longer than
  `max_header_bytes` is answered 431 before more of it is buffered; mitmproxy's 413 (below) is
  answered as problem+json instead of an HTML page; and a client that sends more than a whole request
  while its call is held is cut off (mitmproxy buffers what arrives meanwhile).
- `LimitedHttpStream`: a request body over `max_request_body_bytes` is refused with 413 the way
  mitmproxy refuses one over `body_size_limit` (before reading it when Content-Length announces it,
  else as soon as the buffered part exceeds it), for HTTP/1, HTTP/2 and HTTP/3 alike; answers are not
  capped. `LimitedHttp2Server` answers that 413 as problem+json on its stream (HTTP/3 keeps
  mitmproxy's HTML page). HTTP/2 header lists are capped by the h2 library (64 KiB).

After refusing, the HTTP/1 reader sends its answer and half-closes: it reads and discards what the client
still sends (a client writing its whole body before it reads, as most do, then sees the 413 instead of a
reset), until the client closes or `ClientLimits`' deadline closes the connection.

The limits are read from the mitmproxy options `cedargate_max_header_bytes` and
`cedargate_max_request_body_bytes`, which `ClientLimits` declares and sets from cedargate's settings;
without them the classes behave as mitmproxy's.
"""

from __future__ import annotations

import re

from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import (
    HttpErrorHook,
    HttpRequestHeadersHook,
    HttpStream,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._http1 import Http1Server
from mitmproxy.proxy.layers.http._http2 import Http2Server
from mitmproxy.utils import human

from proxy.calls.connections import body_too_large, head_too_large, refusal
from proxy.vocabulary.problems import Problem

HEAD_END = re.compile(rb"\n\r?\n")  # as h11's receive buffer finds the end of a head


class RequestTooLarge(ResponseProtocolError):
    """mitmproxy's 413 for a body over the cap, which the client's HTTP layer here answers as problem+json
    itself (HTTP/1 half-closing, so a client still writing reads it): `error_pages` leaves it be."""

    answered_as_problem = True


def _limit(options, name: str) -> int | None:
    value = getattr(options, name, None)
    return value if value and value > 0 else None


class LimitedHttp1Server(Http1Server):
    def read_headers(self, event: events.ConnectionEvent):
        limit = _limit(self.context.options, "cedargate_max_header_bytes")
        if isinstance(event, events.DataReceived) and limit and len(self.buf) > limit:
            if not _head_within(bytes(self.buf), limit):
                yield commands.Log(f"{human.format_address(self.conn.peername)}: request head over "
                                   f"{limit} bytes refused")
                yield from self._refuse(431, Problem.HEADERS_TOO_LARGE, head_too_large(limit))
                return
        yield from super().read_headers(event)

    def wait(self, event: events.Event):
        # A call is in progress (perhaps held for a human): what arrives meanwhile is buffered unread.
        head, body = (_limit(self.context.options, n) for n in ("cedargate_max_header_bytes",
                                                                  "cedargate_max_request_body_bytes"))
        if isinstance(event, events.DataReceived) and head and body and len(self.buf) > head + body:
            yield commands.Log(f"{human.format_address(self.conn.peername)}: sent more than a whole request "
                               "while its call was in progress; connection closed")
            self.buf.maybe_extract_at_most(len(self.buf))
            yield commands.CloseConnection(self.conn)
            return
        yield from super().wait(event)

    def send(self, event):
        if (isinstance(event, ResponseProtocolError) and event.code == 413 and not self.response
                and self.conn.state & ConnectionState.CAN_WRITE):
            yield from self._refuse(413, Problem.REQUEST_TOO_LARGE, event.message)
            return
        yield from super().send(event)

    def _refuse(self, status: int, problem: Problem, detail: str):
        response = http.Response.make(status, refusal(problem, status, detail), {
            "Content-Type": "application/problem+json", "Connection": "close",
        })
        yield commands.SendData(self.conn, http1.assemble_response(response))
        yield commands.CloseTcpConnection(self.conn, half_close=True)
        self.buf.maybe_extract_at_most(len(self.buf))
        # Read on, so a client still writing sees the answer rather than a reset, until it closes or
        # ClientLimits' deadline does (header_read_timeout, or idle_timeout once authenticated).
        self.state = self._discard

    def _discard(self, event: events.Event):
        if isinstance(event, events.DataReceived):
            self.buf.maybe_extract_at_most(len(self.buf))
        elif isinstance(event, events.ConnectionClosed):
            yield commands.CloseConnection(self.conn)


class LimitedHttp2Server(Http2Server):
    def _handle_event(self, event: events.Event):
        # mitmproxy answers its 413 with an HTML page; an agent reads cedargate's problem+json instead.
        if (isinstance(event, ResponseProtocolError) and event.code == 413
                and self.is_open_for_us(event.stream_id)
                and not self.h2_conn.streams[event.stream_id].state_machine.headers_sent):
            body = refusal(Problem.REQUEST_TOO_LARGE, 413, event.message)
            self.h2_conn.send_headers(event.stream_id, [
                (b":status", b"413"), (b"content-type", b"application/problem+json"),
                (b"content-length", b"%d" % len(body)),
            ])
            self.h2_conn.send_data(event.stream_id, body, end_stream=True)
            yield commands.SendData(self.conn, self.h2_conn.data_to_send())
            return
        yield from super()._handle_event(event)


def _head_within(data: bytes, limit: int) -> bool:
    """Whether the head at the start of `data` (after the blank lines a client may send first) ends
    within `limit` bytes."""
    start = len(data) - len(data.lstrip(b"\r\n"))
    return start < limit and HEAD_END.search(data, start, limit) is not None


class LimitedHttpStream(HttpStream):
    def check_body_size(self, request: bool):
        limit = _limit(self.context.options, "cedargate_max_request_body_bytes") if request else None
        if limit is not None:
            size = len(self.request_body_buf) if self.request_body_buf else _announced(self.flow.request)
            if size is not None and size > limit:
                return (yield from self._refuse_body(limit))
        return (yield from super().check_body_size(request))

    def _refuse_body(self, limit: int):
        # mitmproxy's own sequence for a body over body_size_limit: addons see the flow, then its error.
        if not self.request_body_buf:
            yield HttpRequestHeadersHook(self.flow)
        self.request_body_buf.clear()
        message = body_too_large(limit)
        self.flow.error = mflow.Error(message)
        yield HttpErrorHook(self.flow)
        yield http_layers.SendHttp(RequestTooLarge(self.stream_id, message, 413), self.context.client)
        self.client_state = self.state_errored
        self.flow.live = False
        return True


def _announced(request: http.Request) -> int | None:
    try:
        size = http1.expected_http_body_size(request)
    except ValueError:
        return None  # refused by mitmproxy's own validation
    return size if size and size > 0 else None


def install() -> None:
    """Make mitmproxy's HTTP layer build cedargate's readers and stream from now on (idempotent)."""
    ours = (LimitedHttp1Server, LimitedHttp2Server, LimitedHttpStream)
    current = http_layers.Http1Server, http_layers.Http2Server, http_layers.HttpStream
    if current == ours:
        return
    if current != (Http1Server, Http2Server, HttpStream):
        raise RuntimeError(f"mitmproxy's HTTP layer builds {current}, not its own classes: cedargate cannot "
                           "cap request sizes in this mitmproxy")
    http_layers.Http1Server, http_layers.Http2Server, http_layers.HttpStream = ours  # type: ignore[misc]  # the patch
