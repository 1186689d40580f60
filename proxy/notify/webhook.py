"""The generic webhook channel: the notice as JSON, POSTed with a signature a receiver can check.

Each try sends `Cedargate-Signature: t=<unix seconds>,v1=<hex>`, where the hex is HMAC-SHA256 under the
channel's secret of `<t>.<body>` (the body's exact bytes), as Stripe and GitHub sign theirs; a receiver
recomputes it, compares in constant time, and refuses a `t` too far from its clock (a replay). The
`Idempotency-Key` header (also the body's `id`) is the same on every try of one event: a receiver that
has seen it acknowledges and does nothing more. `verify` is the receiver's side, for tests and for
anyone writing one in Python.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Mapping

from proxy.notify.channels import DeliveryError, post
from proxy.notify.notices import Notice
from proxy.settings.notifications import WebhookChannel
from proxy.vocabulary.canonical import canonical

SIGNATURE = "Cedargate-Signature"
TOLERANCE = 300  # seconds a receiver should accept between `t` and its clock (`verify`'s default)


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: bytes, header: str, body: bytes, *, now: float | None = None, tolerance: int = TOLERANCE) -> bool:
    """Whether `header` (a Cedargate-Signature value) signs `body` under `secret`, made within `tolerance`."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        fields.setdefault(name, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return any(hmac.compare_digest(expected, given) for given in fields.get("v1", []))


def body_of(notice: Notice, key: str) -> bytes:
    return canonical({"id": key, "event": notice.kind, "notice": notice.as_dict()})


class Webhook:
    def __init__(self, name: str, config: WebhookChannel, environ: Mapping[str, str] = os.environ) -> None:
        self.name = name
        self.config = config
        self._environ = environ

    def send(self, notice: Notice, key: str) -> None:
        secret = self._environ.get(self.config.secret_env)
        if not secret:
            # Never unsigned: a receiver could not tell it from a forgery. The messages wait for the secret.
            raise DeliveryError(f"environment variable {self.config.secret_env} (the signing secret) is not set")
        body = body_of(notice, key)
        post(self.config.url, body, {
            "Content-Type": "application/json",
            "User-Agent": "cedargate-notifications",
            "Idempotency-Key": key,
            "Cedargate-Event": notice.kind,
            SIGNATURE: sign(secret.encode(), int(time.time()), body),
        }, self.config.timeout)
