"""Reviewers' browser sessions: a sign-in with an approver's token exchanged for a session token, and the
throttle on sign-in attempts.

The review page keeps no bearer token in the browser: the token is exchanged once for a random session
token, held in an HttpOnly cookie by the API. Only the session token's SHA-256 is stored (a leaked
database or backup opens no session), with the approver it belongs to and the hash of the approver
token used to sign in, so rotating that token in the configuration ends the sessions it opened. A
session ends when it is idle past `idle` seconds, `absolute` seconds after sign-in whatever its use, at
sign-out, or when its approver leaves the configuration. The CSRF token the page sends with every
change is derived from the session token (`csrf_token`): bound to the session, never stored.

Sessions live in the database, so any process serving the API on the same store honours them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import DateTime, delete, update
from sqlalchemy.engine import Engine as SAEngine
from sqlmodel import Field, Session, SQLModel

from proxy.record.store import WRITES, utcnow


class ReviewerSession(SQLModel, table=True):
    __tablename__ = "reviewer_sessions"

    token_sha256: str = Field(primary_key=True)  # of the session token; the token itself is never stored
    approver: str = Field(index=True)
    credential_sha256: str  # the approver token used to sign in: a rotated token ends the session
    created_at: datetime = Field(sa_type=DateTime(timezone=True))
    last_seen_at: datetime = Field(sa_type=DateTime(timezone=True))
    expires_at: datetime = Field(index=True, sa_type=DateTime(timezone=True))  # the absolute end


@dataclass(frozen=True)
class SignedIn:
    """A session as its holder may know it: the token goes into the cookie, the rest to the page."""

    token: str
    approver: str
    expires_at: datetime

    @property
    def csrf_token(self) -> str:
        return csrf_token(self.token)


def csrf_token(session_token: str) -> str:
    """The CSRF token of a session: a page of another origin can neither read the cookie nor this."""
    return hmac.new(session_token.encode(), b"cedargate csrf", hashlib.sha256).hexdigest()


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class ReviewerSessions:
    """Sessions in the store: `start` at sign-in, `find` on each request, `end` at sign-out."""

    def __init__(self, engine: SAEngine, *, idle: int, absolute: int) -> None:
        self.engine = engine
        self._writes = engine.execution_options(**{WRITES: True})
        self.idle = timedelta(seconds=idle)
        self.absolute = timedelta(seconds=absolute)
        # Marking a session used is a write: done at most this often per session, not on every poll.
        self.touch_every = min(timedelta(seconds=60), self.idle / 10)

    def start(self, approver: str, credential_sha256: str) -> SignedIn:
        token = secrets.token_urlsafe(32)
        now = utcnow()
        with Session(self._writes) as session:
            # Ended sessions are cleared here, where their number can only grow.
            session.execute(delete(ReviewerSession).where(
                (ReviewerSession.expires_at <= now) | (ReviewerSession.last_seen_at <= now - self.idle)))  # type: ignore[arg-type]
            session.add(ReviewerSession(token_sha256=_hash(token), approver=approver,
                                        credential_sha256=credential_sha256, created_at=now, last_seen_at=now,
                                        expires_at=now + self.absolute))
            session.commit()
        return SignedIn(token, approver, now + self.absolute)

    def find(self, token: str, still_valid: Callable[[str, str], bool]) -> SignedIn | None:
        """The live session of `token`, marked used; None if there is none, or it has ended.
        `still_valid(approver, credential_sha256)`: whether the approver may still sign in that way."""
        key = _hash(token)
        with Session(self.engine) as session:
            found = session.get(ReviewerSession, key)
        now = utcnow()
        if found is None:
            return None
        if (_aware(found.expires_at) <= now or _aware(found.last_seen_at) + self.idle <= now
                or not still_valid(found.approver, found.credential_sha256)):
            self._delete(key)
            return None
        if now - _aware(found.last_seen_at) >= self.touch_every:
            with Session(self._writes) as session:
                session.execute(update(ReviewerSession).where(ReviewerSession.token_sha256 == key)  # type: ignore[arg-type]
                                .values(last_seen_at=now))
                session.commit()
        return SignedIn(token, found.approver, _aware(found.expires_at))

    def end(self, token: str) -> None:
        self._delete(_hash(token))

    def _delete(self, key: str) -> None:
        with Session(self._writes) as session:
            session.execute(delete(ReviewerSession).where(ReviewerSession.token_sha256 == key))  # type: ignore[arg-type]
            session.commit()


def _aware(moment: datetime) -> datetime:
    # SQLite gives back naive datetimes for what was stored as UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=utcnow().tzinfo)


class SignInThrottle:
    """Failed sign-ins allowed per client address: a bucket of `attempts`, refilled over `per` seconds.

    Approver tokens are long random secrets, so this is not what keeps them from being guessed; it keeps
    a script from filling the log and the CPU with guesses. Only failures take from the bucket.
    """

    MAX_CLIENTS = 10_000  # past it, the addresses whose buckets are full again are forgotten

    def __init__(self, attempts: int = 5, per: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(attempts)
        self.per_second = attempts / per
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}

    def _tokens(self, client: str, now: float) -> float:
        tokens, then = self._buckets.get(client, (self.capacity, now))
        return min(self.capacity, tokens + (now - then) * self.per_second)

    def wait(self, client: str) -> int:
        """Whole seconds until `client` may try again; 0 if it may now."""
        with self._lock:
            tokens = self._tokens(client, self.clock())
        return 0 if tokens >= 1 else max(1, int((1 - tokens) / self.per_second + 0.999))

    def failed(self, client: str) -> None:
        with self._lock:
            now = self.clock()
            self._buckets[client] = (self._tokens(client, now) - 1, now)
            if len(self._buckets) > self.MAX_CLIENTS:
                self._buckets = {c: b for c, b in self._buckets.items() if self._tokens(c, now) < self.capacity}
