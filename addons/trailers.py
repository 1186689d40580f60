"""HTTP/1 trailer fields: a request that ends with them is decided (and refused), not left unanswered.

mitmproxy 11's HTTP/1 reader raises NotImplementedError when a chunked message ends with trailer
fields (`0\\r\\nX-Field: v\\r\\n\\r\\n`): the connection handler crashes and the agent waits forever for
an answer. This addon teaches the reader to hand a request's trailers on as mitmproxy's HTTP/2 layer
does (`flow.request.trailers`), so the `request` hook sees them and the mapping refuses the call with
a problem+json answer (cedargate decides on headers, and servers merge trailers into them or not). An
upstream answer ending with trailers is a protocol error (502): mitmproxy cannot pass them on to an
HTTP/1 client either. The crash happens while the body is read, after `requestheaders` and before
`request`, which is why no hook alone can answer it.
"""

from __future__ import annotations

import logging

import h11
from h11._readers import ChunkedReader
from mitmproxy import http
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import (
    RequestEndOfMessage,
    RequestTrailers,
    ResponseEndOfMessage,
    ResponseProtocolError,
)

log = logging.getLogger(__name__)


class _TrailerKeepingReader(ChunkedReader):
    """h11's chunked reader, keeping a message's trailer fields aside instead of ending the message
    with them (mitmproxy's reader raises on an end of message that carries fields)."""

    trailers: list[tuple[bytes, bytes]] | None = None

    def __call__(self, buf):
        event = super().__call__(buf)
        if isinstance(event, h11.EndOfMessage) and event.headers:
            self.trailers = list(event.headers.raw_items())
            return h11.EndOfMessage()
        return event


def _make_body_reader(expected_size: int | None):
    return _TrailerKeepingReader() if expected_size is None else _original_make_body_reader(expected_size)


def _read_body(self: _http1.Http1Connection, event):
    """mitmproxy's read_body, with the trailers kept aside passed on before the end of the message."""
    reader = self.body_reader
    if not isinstance(reader, _TrailerKeepingReader):
        # A body framed by its length (every answer this proxy sees most) has no trailers: mitmproxy's
        # reader as it is, without a step through this loop for each of its commands.
        return (yield from _original_read_body(self, event))
    inner = _original_read_body(self, event)
    reply = None
    while True:
        try:
            command = inner.send(reply)
        except StopIteration:
            return
        trailers = getattr(reader, "trailers", None)
        if trailers and isinstance(command, ReceiveHttp):
            reader.trailers = None  # type: ignore[union-attr]  # the reader that read trailers has them
            if isinstance(command.event, RequestEndOfMessage):
                reply = yield ReceiveHttp(RequestTrailers(command.event.stream_id, http.Headers(trailers)))
            elif isinstance(command.event, ResponseEndOfMessage):
                inner.close()
                yield commands.CloseConnection(self.conn)
                yield ReceiveHttp(ResponseProtocolError(
                    command.event.stream_id, "the upstream ended its answer with HTTP/1 trailer fields, "
                    "which cedargate cannot pass on"))
                self.state = self.done
                return
        reply = yield command


_original_make_body_reader = _http1.make_body_reader
_original_read_body = _http1.Http1Connection.read_body


class Http1Trailers:
    """Installs the trailer-aware HTTP/1 body reader when mitmproxy loads the addon (once per process)."""

    def load(self, loader) -> None:
        if _http1.Http1Connection.read_body is not _read_body:
            _http1.make_body_reader = _make_body_reader
            _http1.Http1Connection.read_body = _read_body  # type: ignore[method-assign]  # the patch itself


addons = [Http1Trailers()]
