"""The C Avro decoder (``_speedups.decode``) returns exactly fastavro's value, and leaves to
fastavro whatever it does not read as fastavro would: AvroSerde.decode then gives the same
record, or the same PoisonEvent, as with fastavro alone.

Also run under ``PYTHONMALLOC=debug python -X dev -m pytest tests/unit/test_fast_decode.py``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import struct
import sys
import tracemalloc
from datetime import UTC, datetime
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import PoisonEvent
from schemas import AvroSerde, FeedbackEvent, load_schema
from schemas import serde as serde_module
from schemas.avro_binary import long_bytes as zigzag
from schemas.serde import compile_program
from tests.unit.test_fast_encode import events

speedups = serde_module._speedups
assert speedups is not None, "schemas._speedups is not built: `make setup` builds it (needs a C compiler)"

SHIPPED = ("feedback_event_v1", "dead_letter_v1", "feedback_envelope_v1", "interaction_v1", "rejected_v1")
#: The shipped schemas the C decoder reads (rejected_v1's union with a timestamp has no program).
WITH_PROGRAMS = tuple(name for name in SHIPPED if compile_program(load_schema(name)) is not None)
MIN_MICROS, MAX_MICROS = -62_135_596_800_000_000, 253_402_300_799_999_999  # datetime's years 1-9999 in UTC
LONG_EDGES = [0, 1, -1, 63, -64, 64, -65, 2**31 - 1, -(2**31), 2**31, 2**53 + 1, 2**63 - 1, -(2**63)]
settings_ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- helpers ------------------------------------------------------------------------


def write(schema: Any, value: Any) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, value)
    return buf.getvalue()


def fastavro_read(schema: Any, body: bytes) -> tuple[Any, int]:
    buf = io.BytesIO(body)
    value = fastavro.schemaless_reader(buf, schema, None)
    return value, buf.tell()


def c_read(schema: Any, body: bytes, start: int = 0) -> tuple[Any, int]:
    program = compile_program(schema)
    assert program is not None
    return speedups.decode(program, body, start)  # type: ignore[no-any-return]


def assert_same(got: Any, expected: Any, where: str = "value") -> None:
    """Equal values of the same types, dict keys in the same order, floats bit for bit (NaNs,
    -0.0), datetimes with the same tzinfo object."""
    assert type(got) is type(expected), f"{where}: {type(got).__name__} != {type(expected).__name__}"
    if isinstance(expected, dict):
        assert list(got) == list(expected), f"{where}: keys {list(got)} != {list(expected)}"
        for key in expected:
            assert_same(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list):
        assert len(got) == len(expected), f"{where}: length"
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert_same(g, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert struct.pack("<d", got) == struct.pack("<d", expected), f"{where}: {got!r} != {expected!r}"
    elif isinstance(expected, datetime):
        assert got == expected and got.tzinfo is expected.tzinfo and got.fold == expected.fold, where
        assert type(got.tzinfo) is type(expected.tzinfo), where
    else:
        assert got == expected, f"{where}: {got!r} != {expected!r}"


def fastavro_serde(name: str = "feedback_event_v1") -> AvroSerde:
    """A serde that decodes with fastavro only, as before the C decoder."""
    serde = AvroSerde(name)
    serde._decode_program = None
    return serde


def outcome(serde: AvroSerde, data: bytes) -> tuple[str, Any]:
    try:
        return "record", serde.decode(data)
    except PoisonEvent as exc:
        return "poison", str(exc)


def assert_same_outcome(data: bytes, name: str = "feedback_event_v1") -> tuple[str, Any]:
    got, expected = outcome(AvroSerde(name), data), outcome(fastavro_serde(name), data)
    assert got[0] == expected[0], (got, expected)
    if got[0] == "record":
        assert_same(got[1], expected[1])
    else:
        assert got[1] == expected[1]
    return got


# --- values for any schema the programs cover ------------------------------------------

longs = st.integers(-(2**63), 2**63 - 1) | st.sampled_from(LONG_EDGES)
texts = st.text(max_size=30) | st.sampled_from(["", "é", "日本語", "\U0001f600", "\x00", "a\u2028b", "\ufeff"])


def values(schema: Any) -> st.SearchStrategy[Any]:
    """Values fastavro writes under a parsed schema, reaching every branch and edge."""
    if isinstance(schema, list):
        return st.one_of([values(branch) for branch in schema])
    if isinstance(schema, str):
        schema = {"type": schema}
    kind, logical = schema["type"], schema.get("logicalType")
    if logical == "timestamp-micros":
        return (
            st.datetimes(timezones=st.just(UTC))
            | st.integers(MIN_MICROS, MAX_MICROS)
            | st.sampled_from([MIN_MICROS, MAX_MICROS, 0, -1])
        )
    if logical == "timestamp-millis":
        return st.integers(MIN_MICROS // 1000, MAX_MICROS // 1000) | st.sampled_from([MIN_MICROS // 1000, -1, 0])
    simple: dict[str, st.SearchStrategy[Any]] = {
        "null": st.none(),
        "boolean": st.booleans(),
        "int": st.integers(-(2**31), 2**31 - 1),
        "long": longs,
        "float": st.floats(width=32) | st.sampled_from([-0.0, math.inf, -math.inf, math.nan]),
        "double": st.floats() | st.sampled_from([-0.0, math.inf, -math.inf, math.nan, 5e-324, 1.7976931348623157e308]),
        "string": texts,
        "bytes": st.binary(max_size=30),
    }
    if kind in simple:
        return simple[kind]
    if kind == "enum":
        return st.sampled_from(schema["symbols"])
    if kind == "record":
        return st.fixed_dictionaries({f["name"]: values(f["type"]) for f in schema["fields"]})
    if kind == "array":
        return st.lists(values(schema["items"]), max_size=5)
    if kind == "map":
        return st.dictionaries(texts, values(schema["values"]), max_size=6)
    raise AssertionError(f"no strategy for {schema}")


#: Every kind the programs have, nested. The array of nulls comes first: the C decoder leaves
#: to fastavro a block count past the bytes left (see test_null_items_past_the_end...).
KINDS = fastavro.parse_schema({
    "type": "record", "name": "Kinds", "namespace": "test", "fields": [
        {"name": "nulls", "type": {"type": "array", "items": "null"}}, {"name": "n", "type": "null"},
        {"name": "b", "type": "boolean"}, {"name": "i", "type": "int"},
        {"name": "l", "type": "long"}, {"name": "f", "type": "float"}, {"name": "d", "type": "double"},
        {"name": "s", "type": "string"}, {"name": "y", "type": "bytes"},
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B", "C"]}},
        {"name": "micros", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "millis", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "u", "type": ["null", "boolean", "long", "double", "string", "bytes"]},
        {"name": "u_first", "type": ["string", "null"]},
        {"name": "nested", "type": {"type": "array", "items": {"type": "record", "name": "Inner", "fields": [
            {"name": "m", "type": {"type": "map", "values": {"type": "array", "items": ["null", "double"]}}},
            {"name": "t", "type": {"type": "long", "logicalType": "timestamp-micros"}}]}}},
        {"name": "maps", "type": {"type": "map", "values": {"type": "map", "values": "bytes"}}},
    ]})  # fmt: skip
ODD_UNIONS = fastavro.parse_schema({
    "type": "record", "name": "Odd", "fields": [
        {"name": "i", "type": ["null", "int"]}, {"name": "f", "type": ["float", "null"]}]})  # fmt: skip


# --- equal to fastavro ------------------------------------------------------------------


def test_the_shipped_schemas_with_programs() -> None:
    assert "feedback_event_v1" in WITH_PROGRAMS
    assert compile_program(load_schema("rejected_v1")) is None  # a union with a timestamp: fastavro reads it
    assert AvroSerde()._decode_program is not None


@pytest.mark.parametrize("name", WITH_PROGRAMS)
@settings_
@given(data=st.data())
def test_c_decode_equals_fastavro_for_the_shipped_schemas(name: str, data: st.DataObject) -> None:
    schema = load_schema(name)
    record = data.draw(values(schema))
    body = write(schema, record)
    got, expected = c_read(schema, body), fastavro_read(schema, body)
    assert_same(got[0], expected[0])
    assert got[1] == expected[1] == len(body)
    serde = AvroSerde(name)
    assert_same(serde.decode(serde.header + body), expected[0])


@settings_
@given(record=values(KINDS))
def test_c_decode_equals_fastavro_for_every_kind(record: dict[str, Any]) -> None:
    body = write(KINDS, record)
    got, expected = c_read(KINDS, body), fastavro_read(KINDS, body)
    assert_same(got[0], expected[0])
    assert got[1] == expected[1] == len(body)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=events)
def test_model_events_decode_to_fastavro_records(event: FeedbackEvent) -> None:
    serde = AvroSerde()
    data = serde.encode(event.to_avro())
    record = serde.decode(data)
    assert_same(record, fastavro_serde().decode(data))
    assert FeedbackEvent.from_avro(record) == event


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=values(ODD_UNIONS))
def test_union_branches_the_program_does_not_write_are_left_to_fastavro(record: dict[str, Any]) -> None:
    body = write(ODD_UNIONS, record)
    expected = fastavro_read(ODD_UNIONS, body)
    try:
        got = c_read(ODD_UNIONS, body)
    except speedups.Unsupported:
        assert record["i"] is not None or record["f"] is not None  # the int or float branch
    else:
        assert_same(got[0], expected[0])
        assert record == {"i": None, "f": None}
    serde = AvroSerde(reader_schema=ODD_UNIONS)
    assert_same(serde.decode(serde.header + body), expected[0])


def test_null_items_past_the_end_of_the_data_are_left_to_fastavro() -> None:
    """Items of no bytes are the only ones a block count past the data can hold: the C decoder
    refuses it (its loop is bounded by the data), fastavro reads it."""
    schema = fastavro.parse_schema({"type": "record", "name": "Nulls", "fields": [
        {"name": "a", "type": {"type": "array", "items": "null"}}]})  # fmt: skip
    body = write(schema, {"a": [None] * 5})
    with pytest.raises(speedups.Unsupported, match="block count"):
        c_read(schema, body)
    serde = AvroSerde(reader_schema=schema)
    assert serde.decode(serde.header + body) == {"a": [None] * 5}


def test_every_payload_value_branch() -> None:
    serde = AvroSerde()
    extra = {"b": True, "f": False, "n": None, "i": -(2**63), "j": 2**63 - 1, "x": 0.1, "z": -0.0, "inf": math.inf,
             "nan": math.nan, "s": "", "u": "\U0001f600 é", "": "empty key"}  # fmt: skip
    record = FeedbackEvent.model_validate({"source": "s", "type": "t", "payload": {"comment": ""}}).to_avro()
    record["payload"]["extra"] = extra
    data = serde.encode(record)
    decoded = serde.decode(data)
    assert_same(decoded, fastavro_serde().decode(data))
    assert [type(v) for v in decoded["payload"]["extra"].values()] == [type(v) for v in extra.values()]


@pytest.mark.parametrize(
    "micros", [MIN_MICROS, MIN_MICROS + 1, -1, 0, 1, 951_782_400_000_000, MAX_MICROS - 1, MAX_MICROS]
)
def test_timestamps_at_the_edges_of_datetime(micros: int) -> None:
    schema = load_schema("interaction_v1")
    record = {"interaction_id": "i", "ts": micros, "source": "s", "model_version": None, "prompt_version": None,
              "prompt": None, "response": None, "latency_ms": None, "cost": None}  # fmt: skip
    got, expected = c_read(schema, write(schema, record)), fastavro_read(schema, write(schema, record))
    assert_same(got[0], expected[0])
    assert got[0]["ts"].tzinfo is UTC and type(got[0]["ts"]) is datetime  # UTC is datetime.timezone.utc


def test_the_calendar_matches_fastavros_datetimes() -> None:
    """Every day of three 400-year cycles (the Gregorian calendar repeats over 400 years: the
    first, the one around 1970, the last) and every 101st day in between, each at a time of
    day that moves with it, decode to fastavro's datetime."""
    schema = fastavro.parse_schema({"type": "long", "logicalType": "timestamp-micros"})
    program = compile_program(schema)
    assert program is not None
    day, first, last = 86_400_000_000, MIN_MICROS // 86_400_000_000, MAX_MICROS // 86_400_000_000
    cycle = 146_097
    days = [*range(first, first + cycle), *range(-cycle // 2, cycle // 2), *range(last - cycle, last + 1)]
    days += range(first + cycle, last - cycle, 101)
    for d in days:
        micros = d * day + (d * 7_919_000_017) % day
        body = zigzag(micros)
        got, expected = speedups.decode(program, body, 0)[0], fastavro_read(schema, body)[0]
        assert got == expected and got.tzinfo is expected.tzinfo, micros


@pytest.mark.parametrize("kind", ["timestamp-micros", "timestamp-millis"])
@pytest.mark.parametrize("n", [MIN_MICROS - 1, MAX_MICROS + 1, MIN_MICROS // 1000 - 1, MAX_MICROS // 1000 + 1,
                               2**63 - 1, -(2**63)])  # fmt: skip
def test_timestamps_outside_datetime_are_left_to_fastavro(kind: str, n: int) -> None:
    schema = fastavro.parse_schema({"type": "long", "logicalType": kind})
    body = zigzag(n)
    try:
        expected: Any = fastavro_read(schema, body)
    except Exception as exc:
        expected = type(exc)
    try:
        got: Any = c_read(schema, body)
    except speedups.Unsupported:
        assert expected is OverflowError  # fastavro refuses each: the PoisonEvent stays its
    else:
        assert_same(got[0], expected[0])


def test_the_serde_reads_with_the_c_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    serde = AvroSerde()
    data = serde.encode(FeedbackEvent(source="s", type="t", payload={"comment": "c"}).to_avro())
    expected = serde.decode(data)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("fastavro was asked")

    monkeypatch.setattr(serde_module.fastavro, "schemaless_reader", refuse)
    assert_same(serde.decode(data), expected)
    assert_same(serde.decode(bytearray(data)), expected)
    assert_same(serde.decode(memoryview(data)), expected)


def test_schemas_without_a_program_are_read_by_fastavro() -> None:
    from datetime import date
    from decimal import Decimal
    from uuid import UUID

    def one(name: str, kind: Any, value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"type": "record", "name": name, "fields": [{"name": "v", "type": kind}]}, {"v": value}

    for schema, record in (
        one("Fixed", {"type": "fixed", "name": "X", "size": 2}, b"ab"),
        one("Date", {"type": "int", "logicalType": "date"}, date(2026, 1, 2)),
        one("Uuid", {"type": "string", "logicalType": "uuid"}, UUID(int=7)),
        one("Local", {"type": "long", "logicalType": "local-timestamp-micros"}, datetime(2026, 1, 2, 3, 4, 5)),
        one("Time", {"type": "int", "logicalType": "time-millis"}, 1234),
        one("Dec", {"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": 2}, Decimal("12.34")),
        one("Nullable", ["null", {"type": "record", "name": "O", "fields": [{"name": "x", "type": "long"}]}], {"x": 1}),
        ({"type": "record", "name": "Ref", "fields": [  # a named type used again by name
            {"name": "a", "type": {"type": "record", "name": "A", "fields": [{"name": "x", "type": "long"}]}},
            {"name": "b", "type": "A"}]}, {"a": {"x": 1}, "b": {"x": 2}}),
    ):  # fmt: skip
        parsed = fastavro.parse_schema(schema)
        assert compile_program(parsed) is None, schema["name"]
        serde = AvroSerde(reader_schema=parsed)
        assert serde._decode_program is None
        body = write(parsed, record)
        assert serde.decode(serde.header + body) == fastavro_read(parsed, body)[0]


# --- malformed bodies: the same PoisonEvent as with fastavro ------------------------------


def _event_body() -> tuple[AvroSerde, bytes, dict[str, Any]]:
    serde = AvroSerde()
    record = FeedbackEvent.model_validate({
        "source": "s", "type": "t", "user_id": "u", "tags": ["a", "b"],
        "payload": {"comment": "c", "k": 1, "x": "y"}}).to_avro()  # fmt: skip
    return serde, serde.encode(record), record


def test_every_truncation_and_trailing_bytes_are_the_same_poison() -> None:
    serde, data, _ = _event_body()
    for cut in range(len(serde.header), len(data)):
        kind, reason = assert_same_outcome(data[:cut])
        assert kind == "poison" and reason.startswith("avro decode failed"), reason
    for tail in (b"\x00", b"\x00\x00", b"\xff"):
        assert assert_same_outcome(data + tail) == ("poison", f"{len(tail)} trailing bytes after the record")
    with pytest.raises(PoisonEvent, match="1 trailing bytes"):
        serde.decode(data + b"\x00")


def _set_varint(data: bytes, at: int, n: int) -> bytes:
    """``data`` with the varint at ``at`` replaced by the zigzag varint of ``n``."""
    end = at
    while data[end] & 0x80:
        end += 1
    return data[:at] + zigzag(n) + data[end + 1 :]


def _positions(data: bytes, header: int) -> dict[str, int]:
    """Where some varints of the _event_body() event sit: event_id's length, the severity
    index, user_id's union index, the tags' block count, a map value's union index."""
    pos, found = header, {"event_id": header}

    def skip_long(p: int) -> int:
        while data[p] & 0x80:
            p += 1
        return p + 1

    def skip_str(p: int) -> int:
        n, shift, q = 0, 0, p
        while True:
            b = data[q]
            q += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return q + ((n >> 1) ^ -(n & 1))

    pos = skip_str(pos)  # event_id
    pos = skip_long(pos)  # ts
    pos = skip_str(skip_str(pos))  # source, type
    found["severity"] = pos
    found["map_value"] = data.index(b"\x02k\x04") + 2
    found["user_id"] = data.index(b"\x02\x02u")
    found["tags"] = data.index(b"\x04\x02a\x02b")
    return found


@pytest.mark.parametrize(
    ("where", "n"),
    [("event_id", -1), ("event_id", -(2**62)), ("event_id", 2**40), ("severity", 5), ("severity", -1),
     ("severity", -6), ("severity", 2**63 - 1), ("user_id", 2), ("user_id", -1), ("user_id", -3), ("map_value", 5),
     ("map_value", -1), ("map_value", 2**33), ("tags", -1), ("tags", -(2**63)), ("tags", 2**62), ("tags", 3)],
)  # fmt: skip
def test_bad_lengths_and_indexes_give_fastavros_outcome(where: str, n: int) -> None:
    """fastavro accepts some (a negative enum or union index counts from the end of its list):
    the C decoder leaves each to it, so the record or the PoisonEvent is fastavro's."""
    serde, data, _ = _event_body()
    at = _positions(data, len(serde.header))[where]
    assert_same_outcome(_set_varint(data, at, n))


@pytest.mark.parametrize(
    "change",
    ["overlong_varint", "long_11_bytes", "invalid_utf8", "surrogate_utf8", "boolean_2", "huge_ts", "negative_block"],
)
def test_odd_bytes_give_fastavros_outcome(change: str) -> None:
    serde, data, _ = _event_body()
    h = len(serde.header)
    pos = _positions(data, h)
    if change == "overlong_varint":  # event_id's length in 10 bytes: still a varint fastavro reads
        length = data[h]
        data = data[:h] + bytes([(length & 0x7F) | 0x80] + [0x80] * 8 + [0x00]) + data[h + 1 :]
    elif change == "long_11_bytes":  # past 64 bits: fastavro reads it, the C decoder leaves it
        data = data[:h] + bytes([data[h] | 0x80] + [0x80] * 9 + [0x00]) + data[h + 1 :]
    elif change == "invalid_utf8":
        data = data.replace(b"\x02u", b"\x02\xff")
    elif change == "surrogate_utf8":
        data = data.replace(b"\x02c", b"\x06\xed\xa0\x80")  # the comment: an encoded surrogate
    elif change == "boolean_2":
        text_dropped = len(data) - 66 - 1 - 1  # ..., text_dropped, propagation_weight (null), hash (2 + 64)
        assert data[text_dropped] == 0
        data = data[:text_dropped] + b"\x02" + data[text_dropped + 1 :]
    elif change == "huge_ts":
        ts_at = pos["event_id"] + 1 + data[pos["event_id"]] // 2
        data = _set_varint(data, ts_at, 2**62)
    elif change == "negative_block":  # the tags as one block of -2 items with its byte size: fastavro reads it
        at = pos["tags"]
        data = data[:at] + zigzag(-2) + zigzag(4) + data[at + 1 :]
    kind, value = assert_same_outcome(data)
    if change in ("overlong_varint", "negative_block"):
        assert kind == "record" and value == fastavro_serde().decode(data)
    if change == "boolean_2":
        assert kind == "record" and value["text_dropped"] is True  # fastavro: any nonzero byte is True


mutations = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 4)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.just(0)),
)


@settings_
@given(data=st.data(), changes=st.lists(mutations, min_size=1, max_size=3))
def test_mutated_bodies_give_fastavros_outcome(data: st.DataObject, changes: list[tuple[str, int, Any]]) -> None:
    schema = load_schema("feedback_event_v1")
    serde = AvroSerde()
    body = bytearray(write(schema, data.draw(values(schema))))
    for op, at, arg in changes:
        at %= len(body) + 1
        if op == "set" and at < len(body):
            body[at] = arg
        elif op == "insert":
            body[at:at] = arg
        elif op == "delete":
            del body[at : at + arg]
        elif op == "cut":
            del body[at:]
    assert_same_outcome(serde.header + bytes(body))


def test_bad_arguments_raise_not_crash() -> None:
    program = compile_program(load_schema("feedback_event_v1"))
    _, data, _ = _event_body()
    for args, error in (
        ((program, data, len(data) + 1), ValueError),
        ((program, data, -1), ValueError),
        ((program, "text", 0), TypeError),
        ((program, data, "0"), TypeError),
        ((program, data), TypeError),
        (([], data, 0), TypeError),
    ):
        with pytest.raises(error):
            speedups.decode(*args)
    with pytest.raises(speedups.Unsupported):
        speedups.decode(program, data, len(data))  # nothing left to read
    assert speedups.decode(program, data, 10)[1] == len(data)


def test_timestamp_millis_writes_as_a_long_and_reads_as_a_datetime() -> None:
    schema = fastavro.parse_schema({"type": "record", "name": "M", "fields": [
        {"name": "t", "type": {"type": "long", "logicalType": "timestamp-millis"}}]})  # fmt: skip
    program = compile_program(schema)
    assert program is not None
    assert speedups.encode(program, b"", {"t": 1_700_000_000_123}) == write(schema, {"t": 1_700_000_000_123})
    with pytest.raises(speedups.Unsupported):  # a datetime is left to fastavro's writer, as before
        speedups.encode(program, b"", {"t": datetime(2026, 1, 1, tzinfo=UTC)})
    value, _ = speedups.decode(program, write(schema, {"t": 1_700_000_000_123}), 0)
    assert_same(value, fastavro_read(schema, write(schema, {"t": 1_700_000_000_123}))[0])


# --- references and memory ----------------------------------------------------------------


def _bodies() -> list[bytes]:
    serde, good, _ = _event_body()
    h = len(serde.header)
    pos = _positions(good, h)
    return [
        good,
        good[: len(good) // 2],  # truncated in the middle of the record
        _set_varint(good, pos["severity"], 9),  # enum index out of range
        _set_varint(good, pos["map_value"], 7),  # union branch out of range, inside the map
        good.replace(b"\x02c", b"\x02\xff"),  # invalid UTF-8 in a nested record
        _set_varint(good, pos["tags"], -(2**63)),  # a block count that cannot be negated
    ]


def test_references_balance_after_many_decodes() -> None:
    """The objects the decoder hands out from the program (field names, enum symbols) and
    None/True/False keep their reference counts over many decodes, failed ones included."""
    program = compile_program(load_schema("feedback_event_v1"))
    assert program is not None
    record = program[2]
    names = [field[0] for field in record]
    severity = next(op for name, op in record if name == "severity")
    symbols = list(severity[1])
    watched = [*names, *symbols, None, True, False, program]
    bodies = _bodies()

    def run() -> None:
        for _ in range(2_000):
            for body in bodies:
                with contextlib.suppress(speedups.Unsupported, UnicodeDecodeError):
                    speedups.decode(program, body, 10)

    run()
    gc.collect()
    before = [sys.getrefcount(o) for o in watched]
    run()
    gc.collect()
    assert [sys.getrefcount(o) for o in watched] == before


def test_memory_stays_flat_over_100k_decodes() -> None:
    serde = AvroSerde()
    program = serde._decode_program
    bodies = _bodies()
    good = bodies[0]
    for _ in range(2_000):  # warm up caches (free lists, interned strings)
        speedups.decode(program, good, 10)
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):
            body = bodies[i // 10 % len(bodies)] if i % 10 == 0 else good  # every 10th: the bad ones in turn
            with contextlib.suppress(speedups.Unsupported, UnicodeDecodeError):
                speedups.decode(program, body, 10)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes more after 100k decodes"
