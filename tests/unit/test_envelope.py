"""Envelopes: the hand-written packer and reader agree with fastavro, and bad bytes are poison."""

from __future__ import annotations

import io

import fastavro
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import PoisonEvent
from schemas.envelope import ENVELOPE_HEADER, MAX_BYTES, MAX_EVENTS, is_envelope, pack, pack_many, position, unpack
from schemas.serde import load_schema

SCHEMA = fastavro.parse_schema(load_schema("feedback_envelope_v1"))
values = st.lists(st.binary(max_size=300), min_size=1, max_size=40)


@given(values)
def test_pack_is_the_avro_encoding_and_unpack_inverts_it(items: list[bytes]) -> None:
    envelope = pack(items)
    assert envelope.startswith(ENVELOPE_HEADER) and is_envelope(envelope)
    assert fastavro.schemaless_reader(io.BytesIO(envelope[10:]), SCHEMA, None) == {"events": items}
    out = io.BytesIO()
    fastavro.schemaless_writer(out, SCHEMA, {"events": items})
    assert envelope[10:] == out.getvalue()
    assert unpack(envelope) == items


def test_unpack_reads_blocks_with_byte_sizes() -> None:
    # Avro writers may write a negative count followed by the block's byte size.
    body = bytearray(ENVELOPE_HEADER)
    body += bytes([3, 8, 4]) + b"ab" + bytes([4]) + b"cd" + bytes([2, 2]) + b"e" + bytes([0])  # -2 items, size 4
    assert unpack(bytes(body)) == [b"ab", b"cd", b"e"]


@pytest.mark.parametrize(
    "value,reason",
    [
        (ENVELOPE_HEADER + bytes([2, 10]) + b"abc", "runs past the end"),
        (ENVELOPE_HEADER + bytes([2, 2]) + b"a", "truncated"),
        (ENVELOPE_HEADER + bytes([2, 2]) + b"a" + bytes([0]) + b"x", "trailing bytes"),
        (ENVELOPE_HEADER + bytes([0]), "empty envelope"),
        (ENVELOPE_HEADER + bytes([0xFF] * 11), "longer than 64 bits"),
        (b"\xc3\x01" + b"\x00" * 8 + bytes([0]), "not an envelope"),
    ],
)
def test_malformed_envelopes_are_poison_with_a_reason(value: bytes, reason: str) -> None:
    with pytest.raises(PoisonEvent, match=reason):
        unpack(value)


def test_limits_and_positions() -> None:
    with pytest.raises(ValueError, match="at most"):
        pack([b"x"] * (MAX_EVENTS + 1))
    chunks = list(pack_many([b"x" * 1000] * 1200))
    per = (MAX_BYTES - 1000) // 1005 + 1  # the item that would pass MAX_BYTES starts the next envelope
    assert [n for _, n in chunks] == [per, per, 1200 - 2 * per]
    assert all(len(envelope) <= MAX_BYTES + 20 for envelope, _ in chunks)
    assert list(pack_many([b"z" * (MAX_BYTES + 1), b"z"])) == [(pack([b"z" * (MAX_BYTES + 1)]), 1), (pack([b"z"]), 1)]
    assert sum(len(unpack(e)) for e, _ in chunks) == 1200
    assert [n for _, n in pack_many([b"y"] * 2500)] == [MAX_EVENTS, MAX_EVENTS, 500]
    assert position(7) < position(7, 1) < position(7, 999) < position(8)
