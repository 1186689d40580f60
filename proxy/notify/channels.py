"""What every channel is to the sweep (`Channel`: a name and `send`), the one way a try fails
(`DeliveryError`, for now or for good), and the HTTP POST the webhook and Slack channels share.

A failed try's message names the host and what went wrong, never the URL: a Slack incoming-webhook URL
is itself a secret, and a webhook's may carry a token in its query. Redirects are not followed (a
signed body is for the URL configured, and a POST turned into a GET would lose it), and the proxy
settings of the environment are not used: the process's own HTTP_PROXY may be cedargate itself. A send
has one deadline, its `timeout`, for connecting, sending and reading the whole answer: a socket's own
timeout is per operation, so a receiver trickling its answer would otherwise hold the sweep (and, through
its lease, every channel) for as long as it likes.
"""

from __future__ import annotations

import functools
import http.client
import io
import socket
import ssl
import time
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

from proxy.notify.notices import Notice
from proxy.vocabulary.printable import printable

# Answers that say this message will never be taken as it is; anything else may pass on a later try
# (401/403/404 are most often a channel misconfigured, mended by its operator: the messages wait).
PERMANENT = frozenset({400, 413, 422})
MAX_ANSWER = 64 * 1024  # bytes of an answer read (and ignored): a receiver's body is not ours to keep


class DeliveryError(Exception):
    """A try failed: `permanent` when this message can never be delivered, so it is not tried again."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Channel(Protocol):
    name: str

    def send(self, notice: Notice, key: str) -> None:
        """Deliver `notice` once, with idempotency key `key`; raise `DeliveryError` if it was not taken."""


def where(url: str) -> str:
    """The part of a URL that may be shown: scheme, host and port."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def post(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> bytes:
    """POST `body` to `url` within `timeout` seconds in all (connecting, sending, and the whole answer);
    the answer's body (cut) if its status is 2xx, else `DeliveryError`."""
    shown = where(url)
    deadline = time.monotonic() + timeout
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection: http.client.HTTPConnection
    try:
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout,
                                                     context=ssl.create_default_context())
        else:
            connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
        try:
            connection.connect()
            _within(connection, deadline)
            connection.request("POST", target, body=body, headers={**headers, "Content-Length": str(len(body))})
            _within(connection, deadline)
            connection.response_class = functools.partial(_Answer, deadline=deadline)  # type: ignore[assignment]
            answer = connection.getresponse()
            said = answer.read(MAX_ANSWER)
        finally:
            connection.close()
    except TimeoutError:
        raise DeliveryError(f"{shown} did not answer within {timeout:g} s") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise DeliveryError(f"{shown} could not be reached: {_reason(exc)}") from None
    if 200 <= answer.status < 300:
        return bytes(said)
    retry = " (redirects are not followed: configure the final URL)" if 300 <= answer.status < 400 else ""
    raise DeliveryError(f"{shown} answered {answer.status} {printable(answer.reason)}{retry}",
                        permanent=answer.status in PERMANENT)


def _within(connection: http.client.HTTPConnection, deadline: float) -> None:
    """Let the socket's next operation take no longer than what is left of the send."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    if connection.sock is not None:
        connection.sock.settimeout(left)


class _DeadlineReader(io.RawIOBase):
    """A socket's reader (`raw`, what `makefile` gave) under one deadline for all its reads: a socket's own
    timeout is per operation, so a receiver trickling its answer would otherwise hold the send for ever."""

    def __init__(self, raw: io.RawIOBase, sock: socket.socket, deadline: float) -> None:
        self.raw, self.sock, self.deadline = raw, sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        return self.raw.readinto(buffer)

    def close(self) -> None:
        self.raw.close()  # the reader keeps the socket open (http.client closes it once the answer is read)
        super().close()


class _Answer(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, *args: Any, deadline: float, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        raw = self.fp.detach()  # nothing read yet: every read now goes through the deadline
        self.fp = io.BufferedReader(_DeadlineReader(raw, sock, deadline))


def _reason(reason: object) -> str:
    """Why a try failed, in words that never quote the URL: an OSError's strerror (the system's message),
    else only the exception's type (http.client's InvalidURL, for one, quotes the request path, which for
    Slack is the secret)."""
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    if isinstance(reason, str) and "/" not in reason:  # urllib's own reasons ("no host given")
        return reason
    return type(reason).__name__


def url_problem(url: str) -> str | None:
    """What makes `url` unusable as a channel's address (None if nothing), worded without its text, so a
    secret URL (Slack's) can be reported by the name of the variable holding it."""
    if any(c.isspace() or not c.isprintable() for c in url):
        return "it holds a space or a control character (an env file's trailing comment or quote?)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises on a port that is not a number
    except ValueError:
        return "it is not a well-formed URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "it is not an http(s) URL with a host"
    return None
