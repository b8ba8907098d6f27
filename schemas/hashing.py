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
from collections.abc import Mapping
from typing import Any

import orjson

from schemas.models import FREE_TEXT_FIELDS, FeedbackEvent, format_ts

__all__ = ["EXCLUDED_FROM_HASH", "canonical_json", "compute_hash", "content_of", "hash_content"]

EXCLUDED_FROM_HASH = frozenset({"event_id", "hash", "client_ip", "sample_rate", "text_dropped", "propagation_weight"})


# Optional content fields, left out of the canonical form when null.
_OPTIONAL_CONTENT = (
    "user_id",
    "session_id",
    "interaction_id",
    "model_version",
    "prompt_version",
    "value",
    "confidence",
    "idempotency_key",
)


def canonical_content(event: FeedbackEvent) -> dict[str, Any]:
    """The dict that gets hashed: content fields only, nulls dropped."""
    # Built straight from the instance dict: this runs once per event on the client's hot path.
    fields = event.__dict__
    payload = fields["payload"].__dict__
    flat = {k: payload[k] for k in FREE_TEXT_FIELDS if payload[k] is not None}
    flat.update(payload["extra"])
    return content_of(fields, flat)


def content_of(fields: Mapping[str, Any], flat: dict[str, Any], ts_text: str | None = None) -> dict[str, Any]:
    """:func:`canonical_content` from validated field values (``severity`` a :class:`Severity`,
    ``ts`` an aware datetime, optional fields present or missing) and the flat payload;
    ``ts_text`` is ``format_ts(fields["ts"])`` when the caller has it already."""
    content: dict[str, Any] = {
        "ts": ts_text or format_ts(fields["ts"]),
        "source": fields["source"],
        "type": fields["type"],
        "severity": fields["severity"].value,
        "payload": flat,
        "tags": fields["tags"],
    }
    get = fields.get
    for name in _OPTIONAL_CONTENT:
        value = get(name)
        if value is not None:
            content[name] = value
    return content


def hash_content(content: dict[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of :func:`content_of`'s dict."""
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()


def canonical_json(event: FeedbackEvent) -> bytes:
    """Canonical UTF-8 JSON bytes of the event's content (sorted keys, no whitespace)."""
    # orjson writes floats in the shortest round-trip form and non-ASCII as raw UTF-8,
    # both deterministic; OPT_SORT_KEYS sorts nested objects too.
    return orjson.dumps(canonical_content(event), option=orjson.OPT_SORT_KEYS)


def compute_hash(event: FeedbackEvent) -> str:
    """Hex SHA-256 of :func:`canonical_json` — the same record gives the same hash anywhere."""
    return hashlib.sha256(canonical_json(event)).hexdigest()
