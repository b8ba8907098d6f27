"""Pydantic models mirroring the Avro schemas in this package.

``FeedbackEvent`` accepts the friendly JSON form producers send (a flat
``payload`` object) and converts to and from the Avro record form.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.avro_binary import EPOCH, from_micros, micros

__all__ = [
    "FREE_TEXT_FIELDS",
    "FeedbackEvent",
    "Payload",
    "Scalar",
    "Severity",
    "format_ts",
    "new_event_id",
    "to_utc",
]

#: Payload keys that carry free text; they get typed fields so stages can redact and guard them.
FREE_TEXT_FIELDS = ("text", "comment", "corrected_response")

#: The values the payload map may hold (Avro union null|boolean|long|double|string).
Scalar = None | bool | int | float | str

_INT64 = 2**63
# Avro timestamp-micros holds microseconds since the epoch; keep within what it and ClickHouse store.
_TS_MIN = EPOCH
_TS_MAX = datetime(2262, 1, 1, tzinfo=UTC)
Name = Annotated[str, Field(min_length=1, max_length=128)]
OptionalId = Annotated[str | None, Field(default=None, min_length=1, max_length=256)]


class Severity(StrEnum):
    debug = "debug"
    info = "info"
    warn = "warn"
    error = "error"
    critical = "critical"


def new_event_id() -> str:
    """A fresh random event id (UUID4, canonical text form, as ``str(uuid.uuid4())``)."""
    # uuid.UUID's constructor costs ~4 µs per event on the client's hot path; set the
    # version (4) and RFC 4122 variant bits on 16 random bytes directly instead.
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def to_utc(value: datetime) -> datetime:
    """The same instant in UTC; a naive datetime is taken to be UTC already."""
    if value.tzinfo is UTC:
        return value
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _check_scalar(key: str, value: Any) -> Scalar:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise ValueError(f"payload.{key}: integer out of the 64-bit range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"payload.{key}: must be a finite number (NaN and Infinity are not allowed)")
        return value
    raise ValueError(
        f"payload.{key}: must be a string, number, boolean or null "
        f"(nested objects and lists are not supported; flatten them or JSON-encode them)"
    )


class Payload(BaseModel):
    """Free-text fields plus a flat map of everything else."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str | None = None
    comment: str | None = None
    corrected_response: str | None = None
    extra: dict[str, Scalar] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _split_flat_form(cls, data: Any) -> Any:
        """Accept the flat JSON form ``{"text": ..., "rating": 4}`` as well as the Avro form."""
        if not isinstance(data, dict):
            raise ValueError("payload must be an object")
        if "extra" in data and isinstance(data["extra"], dict) and set(data) <= {*FREE_TEXT_FIELDS, "extra"}:
            return data
        out: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            if not isinstance(key, str):
                raise ValueError("payload keys must be strings")
            if key in FREE_TEXT_FIELDS:
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"payload.{key}: must be a string")
                out[key] = value
            else:
                extra[key] = value
        out["extra"] = extra
        return out

    @field_validator("extra", mode="before")
    @classmethod
    def _scalars_only(cls, extra: Any) -> dict[str, Scalar]:
        if not isinstance(extra, dict):
            raise ValueError("payload.extra must be an object")
        return {key: _check_scalar(key, value) for key, value in extra.items()}

    def to_avro(self) -> dict[str, Any]:
        """The Avro record form: the three free-text fields and the map."""
        return {
            "text": self.text,
            "comment": self.comment,
            "corrected_response": self.corrected_response,
            "extra": self.extra,
        }

    def flat(self) -> dict[str, Scalar]:
        """The flat JSON form: free-text fields that are set, then the extra keys."""
        out: dict[str, Scalar] = {k: getattr(self, k) for k in FREE_TEXT_FIELDS if getattr(self, k) is not None}
        out.update(self.extra)
        return out


class FeedbackEvent(BaseModel):
    """FeedbackEvent v1 (see ``feedback_event_v1.avsc``).

    ``hash`` is filled by :func:`schemas.hashing.compute_hash` when left empty.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)

    event_id: Annotated[str, Field(min_length=1, max_length=128)] = Field(default_factory=new_event_id)
    ts: datetime = Field(default_factory=lambda: datetime.now(UTC))
    source: Name
    type: Name
    severity: Severity = Severity.info
    payload: Payload = Field(default_factory=Payload)
    user_id: OptionalId = None
    session_id: OptionalId = None
    interaction_id: OptionalId = None
    model_version: OptionalId = None
    prompt_version: OptionalId = None
    value: Annotated[float | None, Field(default=None, ge=-1.0, le=1.0, allow_inf_nan=False)] = None
    confidence: Annotated[float | None, Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)] = None
    tags: list[Annotated[str, Field(max_length=128)]] = Field(default_factory=list, max_length=64)
    idempotency_key: OptionalId = None
    client_ip: Annotated[str | None, Field(default=None, max_length=64)] = None
    sample_rate: Annotated[float | None, Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)] = None
    text_dropped: bool = False
    propagation_weight: Annotated[float | None, Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)] = None
    hash: str = ""

    @field_validator("ts")
    @classmethod
    def _ts_utc(cls, value: datetime) -> datetime:
        value = to_utc(value)
        if not _TS_MIN <= value <= _TS_MAX:
            raise ValueError("must be between 1970-01-01 and 2262-01-01 UTC")
        return value

    @model_validator(mode="after")
    def _fill_hash(self) -> FeedbackEvent:
        if not self.hash:
            object.__setattr__(self, "hash", (_compute_hash or _load_compute_hash())(self))
        return self

    # --- Avro record form ------------------------------------------------
    def to_avro(self) -> dict[str, Any]:
        """The record as fastavro writes it (``ts`` as microseconds since the epoch)."""
        return {
            "event_id": self.event_id,
            "ts": micros(self.ts),
            "source": self.source,
            "type": self.type,
            "severity": self.severity.value,
            "payload": self.payload.to_avro(),
            "user_id": self.user_id,
            "session_id": self.session_id,
            "interaction_id": self.interaction_id,
            "model_version": self.model_version,
            "prompt_version": self.prompt_version,
            "value": self.value,
            "confidence": self.confidence,
            "tags": self.tags,
            "idempotency_key": self.idempotency_key,
            "client_ip": self.client_ip,
            "sample_rate": self.sample_rate,
            "text_dropped": self.text_dropped,
            "propagation_weight": self.propagation_weight,
            "hash": self.hash,
        }

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> FeedbackEvent:
        """Build (and validate) an event from a decoded Avro record."""
        data = dict(record)
        ts = data["ts"]
        data["ts"] = ts if isinstance(ts, datetime) else from_micros(ts)
        return cls.model_validate(data)

    def to_json_dict(self) -> dict[str, Any]:
        """The friendly JSON form: flat payload, ISO-8601 UTC timestamp, nulls kept."""
        data = self.model_dump(mode="json")
        data["payload"] = self.payload.flat()
        data["ts"] = format_ts(self.ts)
        return data


_compute_hash: Callable[[FeedbackEvent], str] | None = None


def _load_compute_hash() -> Callable[[FeedbackEvent], str]:
    # schemas.hashing imports this module, so it is imported on first use; keeping the
    # function in a global spares every event an import statement (~1 µs).
    global _compute_hash
    from schemas.hashing import compute_hash

    _compute_hash = compute_hash
    return compute_hash




def format_ts(value: datetime) -> str:
    """Canonical UTC text form with microseconds: ``2026-11-23T06:00:00.000000Z``."""
    value = to_utc(value)
    if value.year < 1000:  # strftime does not zero-pad such years; %04d would
        return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # Same text as the strftime above for these years, at a third of its cost (hot path of the hash).
    fields = (value.year, value.month, value.day, value.hour, value.minute, value.second, value.microsecond)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % fields  # noqa: UP031 - the fastest form measured
