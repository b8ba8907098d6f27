"""The gate's pure routing step: decode, then clean or dead-letter.

No I/O, no clock: the agent passes ``now`` and the message coordinates in. The
validation, dedup, rate-limit, redaction, text-guard and sampling stages slot in
between decode and the clean output.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pipeline.errors import PoisonEvent
from schemas.dead_letter import dead_letter
from schemas.serde import AvroSerde

__all__ = ["GateCodecs", "Routed", "route_raw"]


@dataclass(frozen=True)
class GateCodecs:
    """The serdes the gate needs: events in and out, dead letters out."""

    events: AvroSerde
    dead_letters: AvroSerde


@dataclass(frozen=True)
class Routed:
    destination: Literal["clean", "dlq"]
    value: bytes
    reason: str = ""


def route_raw(
    value: bytes | None,
    *,
    codecs: GateCodecs,
    key: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    now: datetime,
) -> Routed:
    """Route one raw message: re-encoded to the current schema for ``clean``, or a
    dead-letter record (stage ``decode``, the reason, the original bytes) for ``dlq``."""
    try:
        record = codecs.events.decode(value)
    except PoisonEvent as exc:
        letter = dead_letter(
            stage="decode",
            error=exc.reason,
            topic=topic,
            partition=partition,
            offset=offset,
            key=key,
            raw=value,
            now=now,
        )
        return Routed("dlq", codecs.dead_letters.encode(letter), exc.reason)
    # Re-encode so everything downstream reads one writer schema, whatever the producer wrote.
    return Routed("clean", codecs.events.encode(record))
