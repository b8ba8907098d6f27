"""Envelopes: many events in one Kafka message, for producers that already batch.

A Kafka message costs the stream worker a fixed amount of framework work (Faust turns
each message into an event with its own bookkeeping), whatever it carries. Producers
that send many events at once (the client's ``emit_many``, the gateway's batch
endpoint) therefore publish one *envelope* per partition and batch instead of one
message per event.

An envelope is an Avro single-object message of ``feedback_envelope_v1``
(``C3 01`` + the schema's fingerprint + an Avro array of bytes). Each item is exactly
the value a single-event message would carry (its own framing, its own schema), so
the worker decodes an item the same way as a message. The envelope's framing is
always single-object, with or without a schema registry: it is a transport, not a
record anyone stores.

Rules a producer follows (``docs/stream.md``, "Envelopes"):

* every event's partition key maps (with the producer's partitioner) to the
  partition the envelope is written to, so each rate-limit subject still lives in one
  partition;
* at most :data:`MAX_EVENTS` events and about :data:`MAX_BYTES` bytes per envelope;
* the envelope's Kafka key is the first event's key (used only for dead letters).

The worker addresses an event of an envelope by its *position*: the message offset
shifted left by :data:`INDEX_BITS` plus the item's index (a single-event message is
index 0). Positions of one partition increase in the order events are read, which is
what the tables' replay checks compare.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from pipeline.errors import PoisonEvent
from schemas.avro_binary import append_long
from schemas.serde import SINGLE_OBJECT_MAGIC, load_schema, schema_fingerprint

__all__ = [
    "ENVELOPE_HEADER",
    "INDEX_BITS",
    "MAX_BYTES",
    "MAX_EVENTS",
    "is_envelope",
    "pack",
    "pack_many",
    "position",
    "unpack",
]

ENVELOPE_HEADER = SINGLE_OBJECT_MAGIC + schema_fingerprint(load_schema("feedback_envelope_v1"))
INDEX_BITS = 16
MAX_EVENTS = 1000  # < 2**INDEX_BITS; also bounds the work one message brings
MAX_BYTES = 512 * 1024  # well under the broker's and librdkafka's 1 MB message limit


def position(offset: int, index: int = 0) -> int:
    """The position of item ``index`` of the message at ``offset`` (see the module doc)."""
    return (offset << INDEX_BITS) | index


def pack(values: Sequence[bytes]) -> bytes:
    """One envelope holding ``values`` (each a complete event message value)."""
    if not values:
        raise ValueError("an envelope holds at least one event")
    if len(values) > MAX_EVENTS:
        raise ValueError(f"an envelope holds at most {MAX_EVENTS} events, not {len(values)}")
    out = bytearray(ENVELOPE_HEADER)
    append_long(len(values), out)  # one block of len(values) items
    for value in values:
        append_long(len(value), out)
        out += value
    out.append(0)  # end of the array
    return bytes(out)


def pack_many(values: Iterable[bytes]) -> Iterator[tuple[bytes, int]]:
    """Envelopes for ``values`` in order, each within :data:`MAX_EVENTS` and about
    :data:`MAX_BYTES` (an event larger than that travels alone in its envelope); yields
    (envelope, number of events in it)."""
    chunk: list[bytes] = []
    size = 0
    for value in values:
        if chunk and (len(chunk) >= MAX_EVENTS or size + len(value) > MAX_BYTES):
            yield pack(chunk), len(chunk)
            chunk, size = [], 0
        chunk.append(value)
        size += len(value) + 5
    if chunk:
        yield pack(chunk), len(chunk)


def is_envelope(value: bytes | None) -> bool:
    return value is not None and value[:10] == ENVELOPE_HEADER


def _read_long(data: bytes, at: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if at >= len(data):
            raise PoisonEvent("truncated envelope")
        byte = data[at]
        at += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), at
        shift += 7
        if shift > 63:
            raise PoisonEvent("envelope: varint longer than 64 bits")


def unpack(value: bytes) -> list[bytes]:
    """The event values an envelope carries. Raises :class:`PoisonEvent` for a malformed
    envelope (the whole message goes to the dead-letter topic: none of it is trusted)."""
    if not is_envelope(value):
        raise PoisonEvent("not an envelope")
    items: list[bytes] = []
    at = len(ENVELOPE_HEADER)
    end = len(value)
    while True:
        count, at = _read_long(value, at)
        if count == 0:
            break
        if count < 0:  # a block with its byte size: Avro allows it, the size is not needed
            count = -count
            _, at = _read_long(value, at)
        if len(items) + count > MAX_EVENTS:
            raise PoisonEvent(f"envelope holds more than {MAX_EVENTS} events")
        for _ in range(count):
            length, at = _read_long(value, at)
            if length < 0 or at + length > end:
                raise PoisonEvent("envelope item runs past the end of the message")
            items.append(value[at : at + length])
            at += length
    if at != end:
        raise PoisonEvent(f"{end - at} trailing bytes after the envelope")
    if not items:
        raise PoisonEvent("empty envelope")
    return items
