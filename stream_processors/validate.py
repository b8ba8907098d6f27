"""Validation beyond the schema: sizes and time bounds, with the field and the rule named."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from pydantic import ValidationError

from pipeline.errors import InvalidEvent
from schemas.models import FeedbackEvent
from stream_processors.enrich import RESERVED_PREFIX

__all__ = ["Limits", "validate"]


@dataclass(frozen=True)
class Limits:
    max_payload_bytes: int = 64 * 1024
    max_text_chars: int = 32 * 1024
    max_future: timedelta = timedelta(minutes=5)
    max_age: timedelta = timedelta(days=90)


def validate(record: dict[str, Any], now: datetime, limits: Limits = Limits()) -> FeedbackEvent:
    """The validated event for a decoded record. Raises :class:`InvalidEvent` (field, rule)."""
    try:
        event = FeedbackEvent.from_avro(record)
    except ValidationError as exc:
        raise InvalidEvent.first(exc) from None
    size = len(orjson.dumps(record["payload"]))
    if size > limits.max_payload_bytes:
        raise InvalidEvent("payload", f"{size} bytes is over the {limits.max_payload_bytes}-byte limit")
    for key in event.payload.extra:
        if key.startswith(RESERVED_PREFIX):
            raise InvalidEvent(f"payload.{key}", f"keys starting with {RESERVED_PREFIX!r} are set by the stream")
    for name in ("text", "comment", "corrected_response"):
        value = getattr(event.payload, name)
        if value is not None and len(value) > limits.max_text_chars:
            raise InvalidEvent(f"payload.{name}", f"longer than {limits.max_text_chars} characters")
    if event.ts > now + limits.max_future:
        raise InvalidEvent("ts", f"more than {int(limits.max_future.total_seconds())}s in the future")
    if event.ts < now - limits.max_age:
        raise InvalidEvent("ts", f"older than the {limits.max_age.days}-day retention")
    return event
