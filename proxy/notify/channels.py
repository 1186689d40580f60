"""What every channel is to the sweep (`Channel`: a name and `send`), the one way a try fails
(`DeliveryError`, for now or for good), and the HTTP POST the webhook and Slack channels share.

A failed try's message names the host and what went wrong, never the URL: a Slack incoming-webhook URL
is itself a secret, and a webhook's may carry a token in its query. Redirects are not followed (a
signed body is for the URL configured, and a POST turned into a GET would lose it), and the proxy
settings of the environment are not used: the process's own HTTP_PROXY may be cedargate itself.
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import urlsplit

from proxy.notify.notices import Notice

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


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # the 3xx then surfaces as an HTTPError: a failed try


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


def where(url: str) -> str:
    """The part of a URL that may be shown: scheme, host and port."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def post(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> bytes:
    """POST `body` to `url`; the answer's body (cut) if its status is 2xx, else `DeliveryError`."""
    request = urllib.request.Request(url, data=body, method="POST", headers=dict(headers))
    shown = where(url)
    try:
        with _OPENER.open(request, timeout=timeout) as answer:
            return bytes(answer.read(MAX_ANSWER))
    except urllib.error.HTTPError as exc:
        retry = " (redirects are not followed: configure the final URL)" if 300 <= exc.code < 400 else ""
        raise DeliveryError(f"{shown} answered {exc.code} {exc.reason}{retry}",
                            permanent=exc.code in PERMANENT) from None
    except urllib.error.URLError as exc:
        raise DeliveryError(f"{shown} could not be reached: {_reason(exc.reason)}") from None
    except TimeoutError:
        raise DeliveryError(f"{shown} did not answer within {timeout:g} s") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise DeliveryError(f"{shown}: {_reason(exc)}") from None


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
