"""The HTTP/1.1 protocol the override API is served with: uvicorn's h11 protocol, under a connection guard.

uvicorn closes a connection that stays silent after an answer (`timeout_keep_alive`), but not one that
never sends a request, nor one that sends its head a byte at a time; and `limit_concurrency` counts
idle connections too, answering 503 to everyone once idle ones fill it. So every connection reports to
a `proxy.calls.connections.ConnectionGuard`: a complete request head within `header_read_timeout` of connecting
(or `idle_timeout` after an answer), and at most `max_unauthenticated_connections` idle at once, the
oldest closed for a new one. A head over `max_header_bytes` is refused by h11: 400, as problem+json.
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from override_api.main import PROBLEM
from proxy.calls.connections import ConnectionGuard
from proxy.vocabulary.problems import http_problem


class GuardedH11Protocol(H11Protocol):
    guard: ConnectionGuard[GuardedH11Protocol]  # set on the subclass `guarded_protocol` makes

    _request: object | None = None  # the cycle the guard counts as in progress

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.guard.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.closed(self)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        # A complete head makes a new cycle (h11 has read the whole head when uvicorn builds it).
        if self.cycle is not None and self.cycle is not self._request and not self.cycle.response_complete:
            self._request = self.cycle
            self.guard.request_started(self, id(self.cycle))

    def on_response_complete(self) -> None:
        if self._request is not None:
            # Before uvicorn reads a pipelined request, which starts the next one.
            self.guard.request_finished(self, id(self._request))
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to a request h11 cannot read (a head over max_header_bytes among them), in
        # problem+json like the API's other errors rather than text/plain.
        body = json.dumps(
            http_problem(400, f"{msg} It is malformed, or its request line and headers are too long.")
        ).encode()
        headers = [(b"content-type", PROBLEM.encode()), (b"content-length", b"%d" % len(body)),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))  # type: ignore[arg-type]  # None only for ConnectionClosed
        self.transport.close()

    def close_now(self, why: str) -> None:
        if self.transport.is_closing():
            return
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:  # mid-message: just close
            pass
        self.transport.close()


def guarded_protocol(guard: ConnectionGuard[GuardedH11Protocol]) -> type[GuardedH11Protocol]:
    """The protocol class to give uvicorn (`uvicorn.Config(http=...)`), bound to `guard`."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})


def close_connection(protocol: GuardedH11Protocol, why: str) -> None:
    protocol.close_now(why)
