"""The compiled Avro encoders (C, and the generated Python beside it) write exactly fastavro's
bytes, and leave to fastavro what they do not handle."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import AvroSerde, FeedbackEvent, load_schema
from schemas import serde as serde_module
from schemas.serde import compile_encoder, compile_program

SCHEMA = load_schema("feedback_event_v1")
WRITE = compile_encoder(SCHEMA)
Encode = Callable[[Any], bytes]


def python_encoder(schema: dict[str, Any]) -> Encode | None:
    write = compile_encoder(schema)
    if write is None:
        return None

    def encode(record: Any) -> bytes:
        out = bytearray()
        write(record, out)
        return bytes(out)

    return encode


def c_encoder(schema: dict[str, Any]) -> Encode | None:
    speedups = serde_module._speedups
    assert speedups is not None, "schemas._speedups is not built: `make setup` builds it (needs a C compiler)"
    program = compile_program(schema)
    return None if program is None else functools.partial(speedups.encode, program, b"")


ENCODERS = {"python": python_encoder, "c": c_encoder}
COMPILED = {name: make(SCHEMA) for name, make in ENCODERS.items()}
both = pytest.mark.parametrize("encoder", sorted(ENCODERS))


def fastavro_bytes(record: dict[str, Any], schema: dict[str, Any] = SCHEMA) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


def compiled_bytes(record: dict[str, Any], encoder: str = "python") -> bytes:
    encode = COMPILED[encoder]
    assert encode is not None
    return encode(record)


text = st.text(max_size=40)
ids = st.none() | st.text(min_size=1, max_size=30)
unit = st.none() | st.floats(0, 1)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
_TYPED_PAYLOAD = frozenset({"text", "comment", "corrected_response", "extra"})
events = st.builds(
    lambda ts, payload, **kw: FeedbackEvent.model_validate({"ts": ts, "payload": payload, **kw}),
    ts=st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2261, 12, 31), timezones=st.just(UTC)),
    payload=st.fixed_dictionaries(
        {}, optional={"text": st.none() | text, "comment": st.none() | text, "corrected_response": text}
    ).flatmap(
        lambda free: st.dictionaries(st.text(min_size=1, max_size=12), scalars, max_size=6).map(
            # The typed text fields and "extra" are never free-form keys (a generated {"comment": False} is refused).
            lambda extra: {**{k: v for k, v in extra.items() if k not in _TYPED_PAYLOAD}, **free}
        )
    ),
    source=st.text(min_size=1, max_size=20),
    type=st.text(min_size=1, max_size=20),
    severity=st.sampled_from(["debug", "info", "warn", "error", "critical"]),
    user_id=ids,
    session_id=ids,
    interaction_id=ids,
    model_version=ids,
    prompt_version=ids,
    value=st.none() | st.floats(-1, 1),
    confidence=unit,
    tags=st.lists(st.text(max_size=20), max_size=5),
    idempotency_key=ids,
    client_ip=st.none() | st.text(max_size=20),
    sample_rate=st.none() | st.floats(0.01, 1),
    text_dropped=st.booleans(),
    propagation_weight=unit,
)


@both
def test_the_shipped_schema_compiles(encoder: str) -> None:
    assert ENCODERS[encoder](SCHEMA) is not None


def test_the_serde_uses_the_c_encoder_when_it_is_built() -> None:
    assert serde_module._speedups is not None, "schemas._speedups is not built: `make setup` builds it"
    assert isinstance(AvroSerde()._fast, functools.partial)


@both
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=events)
def test_compiled_bytes_equal_fastavro_for_any_event(encoder: str, event: FeedbackEvent) -> None:
    record = event.to_avro()
    assert compiled_bytes(record, encoder) == fastavro_bytes(record)
    serde = AvroSerde()
    data = serde.encode(record)
    assert data == serde.header + fastavro_bytes(record)
    assert FeedbackEvent.from_avro(serde.decode(data)) == event


# Values the models never produce, but a caller of AvroSerde.encode may pass: the compiled
# encoder must not write them differently; AvroSerde.encode then gives fastavro's bytes or error.
odd_values = st.sampled_from(
    [
        ("ts", datetime(2026, 1, 1, tzinfo=UTC)),  # fastavro converts a datetime
        ("value", 1),  # an int where a double is expected
        ("value", True),
        ("value", math.nan),
        ("severity", "fatal"),  # not a symbol: fastavro refuses
        ("tags", ("a", "b")),  # a tuple for an array
        ("user_id", ("string", "u")),  # fastavro's tuple notation for a union branch
        ("text_dropped", 1),
        ("ts", 2**63),  # out of the long range
        ("payload.extra", {"k": 2**70}),
        ("payload.extra", {"k": [1]}),
        ("payload.extra", {"k": b"bytes"}),
        ("payload.text", "\ud800"),  # a lone surrogate cannot be UTF-8 encoded
        ("hash", None),
        ("event_id", None),
        ("missing", "user_id"),
        ("missing", "payload.extra"),
    ]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=events, change=odd_values)
def test_odd_values_give_fastavro_bytes_or_fastavro_error(event: FeedbackEvent, change: tuple[str, Any]) -> None:
    record = event.to_avro()
    record["payload"] = dict(record["payload"])
    where, value = change
    if where == "missing":
        target = record["payload"] if value.startswith("payload.") else record
        del target[value.removeprefix("payload.")]
    elif where.startswith("payload."):
        record["payload"][where.removeprefix("payload.")] = value
    else:
        record[where] = value
    serde = AvroSerde()
    try:
        expected: bytes | type[BaseException] = serde.header + fastavro_bytes(record)
    except Exception as exc:
        expected = type(exc)
    for encode in COMPILED.values():  # each writes fastavro's bytes or gives up; never other bytes
        assert encode is not None
        try:
            written = encode(record)
        except Exception:
            continue
        assert serde.header + written == expected
    if isinstance(expected, bytes):
        assert serde.encode(record) == expected
    else:
        with pytest.raises(expected):
            serde.encode(record)


@both
def test_schemas_it_does_not_handle_use_fastavro(encoder: str) -> None:
    fixed = fastavro.parse_schema({"type": "record", "name": "R", "fields": [
        {"name": "f", "type": {"type": "fixed", "name": "F", "size": 2}}]})  # fmt: skip
    assert ENCODERS[encoder](fixed) is None
    serde = AvroSerde(reader_schema=fixed)
    assert serde.encode({"f": b"ab"}) == serde.header + b"ab"


@both
@pytest.mark.parametrize("n", [0, 1, -1, 63, -64, 64, 4095, 4096, 2**31, -(2**63), 2**63 - 1])
def test_longs_and_lengths_at_the_varint_edges(encoder: str, n: int) -> None:
    fields = [{"name": "n", "type": "long"}, {"name": "s", "type": "string"}, {"name": "u", "type": ["null", "long"]}]
    schema = fastavro.parse_schema({"type": "record", "name": "L", "fields": fields})
    encode = ENCODERS[encoder](schema)
    assert encode is not None
    record = {"n": n, "s": "x" * max(0, min(abs(n), 5000)), "u": n}
    assert encode(record) == fastavro_bytes(record, schema)


@both
@pytest.mark.parametrize(
    ("kind", "value", "handled"),
    [("int", 2**31 - 1, True), ("int", -(2**31), True), ("int", 2**31, False), ("float", 1.5, True),
     ("float", 1e39, False), ("double", -0.0, True), ("boolean", True, True), ("bytes", b"\x00\xff", True),
     ("null", None, True), ("string", b"bytes", False)],
)  # fmt: skip
def test_other_primitives_write_fastavro_bytes_or_give_up(encoder: str, kind: str, value: Any, handled: bool) -> None:
    """Values a compiled encoder does not handle (an int past 32 bits, a float past float32's
    range, bytes for a string) are left to fastavro, whatever fastavro then does with them."""
    schema = fastavro.parse_schema({"type": "record", "name": "P", "fields": [
        {"name": "v", "type": kind}, {"name": "a", "type": {"type": "array", "items": kind}}]})  # fmt: skip
    encode = ENCODERS[encoder](schema)
    assert encode is not None
    record = {"v": value, "a": [value, value]}
    if handled:
        assert encode(record) == fastavro_bytes(record, schema)
    else:
        with pytest.raises(Exception):  # noqa: B017 - any error: AvroSerde.encode then asks fastavro
            encode(record)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=events, redacted=st.booleans())
def test_encode_model_equals_encoding_the_record(event: FeedbackEvent, redacted: bool) -> None:
    serde = AvroSerde()
    payload = {**event.payload.to_avro(), "comment": "[EMAIL]"}
    record = event.to_avro()
    if redacted:
        record["payload"] = payload
        assert serde.encode_model(event, payload=payload) == serde.encode(record)
    else:
        assert serde.encode_model(event) == serde.encode(record) == serde.header + fastavro_bytes(record)


def test_encode_model_leaves_what_it_does_not_handle_to_fastavro() -> None:
    event = FeedbackEvent(source="s", type="t", payload={"k": 1})
    serde = AvroSerde()
    as_int = event.model_copy(update={"value": 1})  # an int for a double: fastavro converts it
    expected = serde.encode(event.to_avro() | {"value": 1.0})
    assert serde.encode_model(as_int) == serde.encode(as_int.to_avro()) == expected
    with pytest.raises(ValueError):  # a severity outside the enum: fastavro's refusal
        serde.encode_model(event, severity="fatal")


def test_a_repeated_instant_reuses_its_bytes_exactly() -> None:
    """The timestamp memo: the same instant (the same object, an equal one in another zone)
    writes fastavro's bytes, and a different instant after it is not confused with it."""
    from datetime import timedelta, timezone

    serde = AvroSerde()
    base = FeedbackEvent.model_validate({"source": "s", "type": "t", "event_id": "e"}).to_avro()
    t0 = datetime(2026, 11, 23, 12, 0, 0, 1, tzinfo=UTC)
    shifted = t0.astimezone(timezone(timedelta(hours=-5)))
    for ts in (t0, t0, shifted, t0 + timedelta(microseconds=1), 1_700_000_000_000_000, t0):
        record = {**base, "ts": ts}
        assert compiled_bytes(record, "python") == compiled_bytes(record, "c") == fastavro_bytes(record)
        if isinstance(ts, datetime):
            assert serde.decode(serde.encode(record))["ts"] == ts
