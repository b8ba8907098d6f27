"""Duplicate detection keys and the windowed seen-set step."""

from __future__ import annotations

from typing import Any

__all__ = ["EXPLICIT_SIGNALS", "dedup_key", "seen_step"]

#: Signals a person gives once per interaction; a second one for the same interaction is a duplicate.
EXPLICIT_SIGNALS = frozenset({"thumbs", "rating", "correction", "task_success", "quality_score"})


def dedup_key(event: dict[str, Any]) -> str:
    """idempotency_key, else (interaction_id, type) for explicit signals, else the content hash."""
    if event.get("idempotency_key"):
        return f"k:{event['source']}:{event['idempotency_key']}"
    if event.get("interaction_id") and event["type"] in EXPLICIT_SIGNALS:
        return f"i:{event['interaction_id']}:{event['type']}"
    return f"h:{event['hash']}"


def seen_step(expires_at: float | None, now_s: float, window_s: float) -> tuple[float | None, bool]:
    """One key's step: returns (new expiry, is_duplicate).

    A key seen within the window is a duplicate and keeps its original expiry (the window
    runs from the first sighting); otherwise the event is new and opens a window.
    """
    if expires_at is not None and now_s < expires_at:
        return expires_at, True
    return now_s + window_s, False
