"""Deterministic per-type Bernoulli sampling.

The decision hashes the event id, so a replay keeps or drops the same events.
Vetoes and safety events are never sampled away.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

__all__ = ["NEVER_SAMPLED", "keep", "sample_rate_for"]

NEVER_SAMPLED = frozenset({"veto", "safety"})
_SCALE = float(2**64)


def sample_rate_for(event_type: str, rates: Mapping[str, float], default: float = 1.0) -> float:
    """The rate that applies to ``event_type`` (1.0 for the never-sampled types)."""
    if event_type in NEVER_SAMPLED:
        return 1.0
    return min(1.0, max(0.0, rates.get(event_type, default)))


def keep(event_id: str, rate: float) -> bool:
    """Whether to keep an event: a uniform draw from SHA-256(event_id), compared to ``rate``."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    draw = int.from_bytes(hashlib.sha256(event_id.encode("utf-8")).digest()[:8], "big") / _SCALE
    return draw < rate
