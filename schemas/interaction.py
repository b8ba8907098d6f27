"""An interaction's context, as ``track()`` publishes it to ``feedback.interactions.v1``.

Feedback often arrives long after the answer it is about (a rating the next day, a
task that failed an hour later). The service tracks the interaction when it answers;
the stream joins later feedback with the same ``interaction_id`` to this context.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.avro_binary import micros

__all__ = ["MAX_ID_CHARS", "MAX_SNAPSHOT_CHARS", "SNAPSHOT_FIELDS", "Interaction", "tracked_interaction"]

MAX_ID_CHARS = 200
MAX_SNAPSHOT_CHARS = 32 * 1024
#: The free-text fields: redacted when text is allowed, never sent when it is not.
SNAPSHOT_FIELDS = ("prompt", "response")

_Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
_Label = Annotated[str, Field(min_length=1, max_length=200)]
_Snapshot = Annotated[str, Field(max_length=MAX_SNAPSHOT_CHARS)]
_NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Interaction(BaseModel):
    """One interaction's context. Invalid values raise ``ValidationError`` naming the field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interaction_id: _Id
    ts: datetime = Field(default_factory=lambda: datetime.now(UTC))
    source: _Label
    model_version: _Label | None = None
    prompt_version: _Label | None = None
    prompt: _Snapshot | None = None
    response: _Snapshot | None = None
    latency_ms: _NonNegative | None = None
    cost: _NonNegative | None = None

    @field_validator("ts")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("must carry a timezone (UTC recommended)")
        return value.astimezone(UTC)

    def to_avro(self) -> dict[str, Any]:
        return {**self.model_dump(), "ts": micros(self.ts)}

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> Interaction:
        return cls.model_validate(record)


def tracked_interaction(data: Mapping[str, Any], *, allow_text: bool, redact: Callable[[str], str]) -> Interaction:
    """The interaction ``track()`` publishes for ``data`` (the client's and the gateway's one
    rule): None values left out, the snapshots dropped unless ``allow_text``, else passed
    through ``redact`` (the stream's redaction; a parameter, as this layer sits below it).
    Raises ``ValidationError`` naming each field that breaks a rule."""
    fields = {k: v for k, v in data.items() if v is not None}
    for name in SNAPSHOT_FIELDS:
        if name not in fields:
            continue
        if not allow_text:
            del fields[name]
        elif isinstance(fields[name], str):  # anything else is for validation to name
            fields[name] = redact(fields[name])
    return Interaction.model_validate(fields)
