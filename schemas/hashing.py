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

try:  # built from schemas/_speedups.c by `pip install -e .` when a C compiler is present
    from schemas import _speedups
except ImportError:  # pragma: no cover - depends on the install; orjson and hashlib stand in
    _speedups = None  # type: ignore[assignment]

__all__ = ["EXCLUDED_FROM_HASH", "canonical_json", "compute_hash", "content_hash", "content_of", "hash_content"]

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
    return content_of(*_fields_and_flat(event))


def _fields_and_flat(event: FeedbackEvent) -> tuple[dict[str, Any], dict[str, Any]]:
    # Straight from the instance dict: this runs once per event on the client's hot path.
    fields = event.__dict__
    payload = fields["payload"].__dict__
    flat = {k: payload[k] for k in FREE_TEXT_FIELDS if payload[k] is not None}
    flat.update(payload["extra"])
    return fields, flat


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


def _layout() -> tuple[tuple[str, int], ...]:
    """:func:`content_of`'s keys in sorted order, each with how the C hash reads it."""
    kinds = _speedups.KEY_KINDS
    keys = {"ts": kinds["ts"], "source": kinds["required"], "type": kinds["required"],
            "severity": kinds["enum_value"], "payload": kinds["flat"], "tags": kinds["required"]}  # fmt: skip
    keys.update(dict.fromkeys(_OPTIONAL_CONTENT, kinds["optional"]))
    return tuple(sorted(keys.items()))


_LAYOUT = _layout() if _speedups is not None else ()


def content_hash(fields: Mapping[str, Any], flat: dict[str, Any], ts_text: str | None = None) -> str:
    """``hash_content(content_of(fields, flat, ts_text))``: in C, without building the content
    dict, when the extension is built; any value it does not handle goes the Python way."""
    if _speedups is not None:
        try:
            return _speedups.content_hash(fields, flat, ts_text or format_ts(fields["ts"]), _LAYOUT)
        except ValueError:  # a value the C writer leaves to orjson (or an error orjson should name)
            pass
    return hash_content(content_of(fields, flat, ts_text))


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
    return content_hash(*_fields_and_flat(event))
