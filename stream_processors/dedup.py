"""Duplicate detection keys and the windowed seen-set step."""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["EXPLICIT_SIGNALS", "client_pseudonym", "dedup_key", "keyed_hash", "opinion_key", "rater", "seen_step"]

#: Signals a person gives once per interaction: a later one of the same type by the same rater on
#: the same interaction is a revision of that opinion (docs/stream.md), not a second opinion.
EXPLICIT_SIGNALS = frozenset({"thumbs", "rating", "correction", "task_success", "quality_score"})


def rater(event: dict[str, Any]) -> str:
    """Who gave an explicit signal: the user, else the session, else the client (ip, then source).
    Two people rating one answer are two raters, so neither rating is a revision of the other."""
    if event.get("user_id"):
        return f"u={event['user_id']}"
    if event.get("session_id"):
        return f"s={event['session_id']}"
    return f"c={event.get('client_ip') or event['source']}"


def _mac(text: str, key: bytes) -> str:
    return text[:2] + hashlib.blake2b(text.encode(), key=key[:64], digest_size=16, person=b"dedup").hexdigest()


def dedup_key(event: dict[str, Any], key: bytes) -> str:
    """The key an exact resend repeats: the idempotency_key, else the content hash; keyed with
    ``key`` (keyed BLAKE2b, a MAC: 128 bits), so the dedup table and its changelog never hold an
    idempotency key or a hash of unredacted content in clear. The first character says which rule
    applied (``k`` or ``h``)."""
    if event.get("idempotency_key"):
        return _mac(f"k:{event['source']}:{event['idempotency_key']}", key)
    return _mac(f"h:{event['hash']}", key)


def opinion_key(event: dict[str, Any], key: bytes) -> str | None:
    """The opinion an explicit signal on an interaction revises: (interaction_id, rater, type),
    keyed like :func:`dedup_key` (prefix ``o``); None for any other event."""
    if not event.get("interaction_id") or event["type"] not in EXPLICIT_SIGNALS:
        return None
    return _mac(f"o:{event['interaction_id']}:{rater(event)}:{event['type']}", key)


def client_pseudonym(event: dict[str, Any], key: bytes) -> str:
    """The stored rater of a signal with neither user nor session: a keyed BLAKE2b of the client ip
    (else the source), so ClickHouse can tell two clients apart without ever holding an ip."""
    subject = str(event.get("client_ip") or event["source"])
    return "c_" + hashlib.blake2b(subject.encode(), key=key[:64], digest_size=16, person=b"rater").hexdigest()


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
