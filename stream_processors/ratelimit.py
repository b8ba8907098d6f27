"""Token-bucket rate limiting as a pure step.

The bucket for a subject (client ip | user_id) holds at most ``burst`` tokens and
refills at ``rate_per_s``. :func:`take_token` never reads a clock: event time
(or arrival time) is passed in, so a replay makes the same decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BucketState", "RateLimit", "take_token"]


@dataclass(frozen=True)
class RateLimit:
    """``rate_per_s`` tokens per second, at most ``burst`` at once (seed default: 60/min)."""

    rate_per_s: float = 1.0
    burst: float = 60.0

    @classmethod
    def per_minute(cls, count: float, burst: float | None = None) -> RateLimit:
        return cls(rate_per_s=count / 60.0, burst=count if burst is None else burst)


@dataclass(frozen=True)
class BucketState:
    tokens: float
    updated_s: float


def take_token(state: BucketState | None, now_s: float, limit: RateLimit) -> tuple[BucketState, bool]:
    """Refill for the time since the last update, then take one token if there is one.

    Returns the new state and whether the event is allowed. Time that goes backwards
    (out-of-order events) refills nothing.
    """
    if state is None:
        tokens = limit.burst
    else:
        elapsed = max(0.0, now_s - state.updated_s)
        tokens = min(limit.burst, state.tokens + elapsed * limit.rate_per_s)
    now_s = now_s if state is None else max(now_s, state.updated_s)
    if tokens >= 1.0:
        return BucketState(tokens - 1.0, now_s), True
    return BucketState(tokens, now_s), False
