"""The dead-letter record: what failed, where it came from, and the original bytes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

__all__ = ["dead_letter"]

_MAX_ERROR = 500


def dead_letter(
    *,
    stage: str,
    error: str,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    raw: bytes | None,
    now: datetime,
) -> dict[str, Any]:
    """A ``dead_letter_v1`` record. ``error`` must already be payload-free; it is truncated."""
    return {
        "stage": stage,
        "error": error[:_MAX_ERROR],
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "ts": now,
        "key": key,
        "raw": raw or b"",
    }
