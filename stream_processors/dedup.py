"""Duplicate detection keys and the windowed seen-set step."""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["EXPLICIT_SIGNALS", "dedup_key", "keyed_hash", "rater", "seen_step"]

#: Signals a person gives once per interaction; a second one by the same rater is a duplicate.
EXPLICIT_SIGNALS = frozenset({"thumbs", "rating", "correction", "task_success", "quality_score"})


def rater(event: dict[str, Any]) -> str:
    """Who gave an explicit signal: the user, else the session, else the client (ip, then source).
    Two people rating one answer are two raters, so neither rating is a duplicate of the other."""
    if event.get("user_id"):
        return f"u={event['user_id']}"
    if event.get("session_id"):
        return f"s={event['session_id']}"
    return f"c={event.get('client_ip') or event['source']}"


def dedup_key(event: dict[str, Any], key: bytes) -> str:
    """idempotency_key, else (interaction_id, rater, type) for explicit signals, else the content hash;
    keyed with ``key`` (keyed BLAKE2b, a MAC: 128 bits), so the dedup table and its changelog never
    hold an idempotency key, an interaction id or a hash of unredacted content in clear. The
    first character says which rule applied (``k``, ``i`` or ``h``)."""
    if event.get("idempotency_key"):
        text = f"k:{event['source']}:{event['idempotency_key']}"
    elif event.get("interaction_id") and event["type"] in EXPLICIT_SIGNALS:
        text = f"i:{event['interaction_id']}:{rater(event)}:{event['type']}"
    else:
        text = f"h:{event['hash']}"
    return text[:2] + hashlib.blake2b(text.encode(), key=key[:64], digest_size=16, person=b"dedup").hexdigest()


def keyed_hash(content_hash: str, key: bytes) -> str:
    """The ``hash`` stored after the gate: a keyed BLAKE2b (a MAC; 256 bits, hex) of the
    producer's content hash. Half the cost of HMAC-SHA256, on every event.

    The producer's hash is SHA-256 over the raw event, PII and dropped text included, so anyone
    could test a guessed email or phone number against it. Keyed, equal contents still get
    equal stored hashes, but no guess can be checked without the worker's key."""
    return hashlib.blake2b(content_hash.encode(), key=key[:64], digest_size=32, person=b"content").hexdigest()


def seen_step(expires_at: float | None, now_s: float, window_s: float) -> tuple[float | None, bool]:
    """One key's step: returns (new expiry, is_duplicate).

    A key seen within the window is a duplicate and keeps its original expiry (the window
    runs from the first sighting); otherwise the event is new and opens a window.
    """
    if expires_at is not None and now_s < expires_at:
        return expires_at, True
    return now_s + window_s, False
