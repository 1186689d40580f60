"""How many override requests one agent may open: the limits, the refusal, and the per-agent token bucket.

An agent that escalates in a loop would otherwise fill the store and every reviewer's queue (300
pending requests in 11 s, 10 MB bodies stored whole). `OverrideStore.open_or_attach` applies these
limits where a request is opened; a call refused by them is not held and no request is stored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class OverrideLimits:
    """None means no limit (the store's default, for tests); `cedargate run` sets all three from settings."""

    max_pending_per_agent: int | None = None
    rate_per_minute: int | None = None  # new requests per agent, in bursts of up to this many
    max_body_bytes: int | None = None


class Refusal(str, Enum):
    BODY_TOO_LARGE = "body-too-large"
    TOO_MANY_PENDING = "too-many-pending"
    RATE_LIMITED = "rate-limited"


class OverrideRefused(Exception):
    """No override request was opened for the call; `retry_after` (seconds) when waiting helps."""

    def __init__(self, reason: Refusal, detail: str, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


class TokenBuckets:
    """One token bucket per agent: `rate` tokens a minute, holding at most `rate`.

    Not thread-safe on its own: the override store calls it under its opening lock, which also makes
    "check, insert, then take" one step. Agents are the configured ones, so the buckets are bounded.
    """

    def __init__(self, rate_per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(rate_per_minute)
        self.per_second = rate_per_minute / 60.0
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # agent -> (tokens, when counted)

    def _tokens(self, agent: str) -> float:
        now = self.clock()
        tokens, then = self._buckets.get(agent, (self.capacity, now))
        return min(self.capacity, tokens + (now - then) * self.per_second)

    def wait(self, agent: str) -> int:
        """Whole seconds until `agent` may open a request; 0 if it may now."""
        tokens = self._tokens(agent)
        return 0 if tokens >= 1 else max(1, math.ceil((1 - tokens) / self.per_second))

    def take(self, agent: str) -> None:
        self._buckets[agent] = (self._tokens(agent) - 1, self.clock())
