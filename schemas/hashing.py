"""Canonical content hashing.

``compute_hash`` is SHA-256 over a canonical JSON form of an event's content:
keys sorted, no whitespace, UTF-8, timestamps as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``
in UTC, fields that are null left out (so a new optional field does not change
old hashes), the payload in its flat form. Excluded: ``event_id`` and ``hash``
(identity, not content), ``client_ip`` (transport metadata, and hashing it
would make the hash a quasi-identifier), and the gate's annotations
``sample_rate``, ``text_dropped`` and ``propagation_weight``. The fixed vectors in
``schemas/vectors/hash_vectors.json`` pin the result across processes and
Python versions.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from schemas.models import FeedbackEvent

__all__ = ["EXCLUDED_FROM_HASH", "canonical_json", "compute_hash"]

EXCLUDED_FROM_HASH = frozenset({"event_id", "hash", "client_ip", "sample_rate", "text_dropped", "propagation_weight"})


def canonical_content(event: FeedbackEvent) -> dict[str, Any]:
    """The dict that gets hashed: content fields only, nulls dropped."""
    from schemas.models import format_ts

    content: dict[str, Any] = {
        "ts": format_ts(event.ts),
        "source": event.source,
        "type": event.type,
        "severity": event.severity.value,
        "payload": event.payload.flat(),
        "user_id": event.user_id,
        "session_id": event.session_id,
        "interaction_id": event.interaction_id,
        "model_version": event.model_version,
        "prompt_version": event.prompt_version,
        "value": event.value,
        "confidence": event.confidence,
        "tags": event.tags,
        "idempotency_key": event.idempotency_key,
    }
    return {k: v for k, v in content.items() if v is not None}


def canonical_json(event: FeedbackEvent) -> bytes:
    """Canonical UTF-8 JSON bytes of the event's content (sorted keys, no whitespace)."""
    # orjson writes floats in the shortest round-trip form and non-ASCII as raw UTF-8,
    # both deterministic; OPT_SORT_KEYS sorts nested objects too.
    return orjson.dumps(canonical_content(event), option=orjson.OPT_SORT_KEYS)


def compute_hash(event: FeedbackEvent) -> str:
    """Hex SHA-256 of :func:`canonical_json` — the same record gives the same hash anywhere."""
    return hashlib.sha256(canonical_json(event)).hexdigest()
