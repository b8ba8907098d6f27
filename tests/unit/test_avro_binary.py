"""The shared binary encodings (varuint, Avro long, micros) against fastavro and exact arithmetic."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta, timezone

import fastavro
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.avro_binary import append_long, from_micros, long_bytes, micros, read_varuint, varuint, zigzag

LONGS = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def test_known_encodings() -> None:
    assert [long_bytes(n) for n in (0, -1, 1, 64)] == [b"\x00", b"\x01", b"\x02", b"\x80\x01"]
    assert [varuint(n) for n in (0, 127, 128, 300)] == [b"\x00", b"\x7f", b"\x80\x01", b"\xac\x02"]
    assert [zigzag(n) for n in (0, -1, 1, -2, 2)] == [0, 1, 2, 3, 4]


@given(LONGS)
def test_an_avro_long_is_fastavros(n: int) -> None:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, "long", n)
    assert long_bytes(n) == out.getvalue()
    buffer = bytearray(b"x")
    append_long(n, buffer)
    assert bytes(buffer) == b"x" + out.getvalue()


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_a_varuint_reads_back(n: int) -> None:
    data = b"\xff" + varuint(n) + b"tail"
    assert read_varuint(data, 1) == (n, len(data) - 4)


def test_a_truncated_or_overlong_varuint_is_an_error() -> None:
    with pytest.raises(ValueError, match="truncated"):
        read_varuint(b"\x80\x80", 0)
    with pytest.raises(ValueError, match="too long"):
        read_varuint(b"\x80" * 11, 0)


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)))
def test_micros_is_exact_and_round_trips(value: datetime) -> None:
    n = micros(value)
    assert n == (value - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert from_micros(n) == value


def test_micros_of_an_offset_zone_and_of_a_naive_time() -> None:
    berlin = datetime(2024, 1, 2, 4, 0, tzinfo=timezone(timedelta(hours=1)))
    assert micros(berlin) == micros(datetime(2024, 1, 2, 3, 0, tzinfo=UTC))
    assert micros(datetime(2024, 1, 2, 3, 0)) == micros(datetime(2024, 1, 2, 3, 0, tzinfo=UTC))  # naive: UTC
