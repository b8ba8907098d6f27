"""The binary encodings the contract's formats share, written once.

* **varuint**: an unsigned little-endian base-128 varint (Native's lengths and counts, and the
  body of an Avro long);
* **Avro long**: zigzag, then a varuint (Avro's ints, longs, lengths and block counts);
* **micros**: a time as whole microseconds since the epoch, by integer arithmetic (Avro's
  ``timestamp-micros``, ClickHouse's ``DateTime64(6)``), never through a float.

``schemas.serde``, ``schemas.envelope``, ``schemas.models``, the ClickHouse Native writer, the
Avro container writer, the embedded server's Native reader and the query helpers all use these.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["EPOCH", "append_long", "from_micros", "long_bytes", "micros", "read_varuint", "varuint", "zigzag"]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)


def varuint(n: int) -> bytes:
    """``n`` (≥ 0) as an unsigned base-128 varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def zigzag(n: int) -> int:
    """A signed 64-bit ``n`` mapped onto the unsigned integers (0, -1, 1, -2 → 0, 1, 2, 3)."""
    return (n << 1) ^ (n >> 63)


def long_bytes(n: int) -> bytes:
    """``n`` as an Avro long: zigzag, then a varuint."""
    return varuint((n << 1) ^ (n >> 63))


def append_long(n: int, out: bytearray) -> None:
    """Append ``n`` as an Avro long to ``out``."""
    n = (n << 1) ^ (n >> 63)
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def read_varuint(data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    """The varuint at ``data[pos:]`` and the position after it. Raises ValueError when ``data``
    ends inside it or it runs past 10 bytes (more than 64 bits)."""
    value = shift = 0
    for _ in range(10):
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("varint too long")


def micros(value: datetime) -> int:
    """Whole microseconds from the epoch to ``value``; a naive ``value`` is read as UTC."""
    delta = value - (EPOCH if value.tzinfo is not None else _NAIVE_EPOCH)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(n: int) -> datetime:
    """The UTC time ``n`` microseconds after the epoch."""
    return EPOCH + timedelta(microseconds=n)
