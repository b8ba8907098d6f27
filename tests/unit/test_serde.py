"""Serde: round trips, both framings, schema evolution, poison detection."""

from __future__ import annotations

import copy
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import PoisonEvent
from schemas import AvroSerde, FeedbackEvent, SchemaCatalog, load_schema
from schemas.serde import CONFLUENT_MAGIC, SINGLE_OBJECT_MAGIC, schema_fingerprint


def _event(**kw: object) -> FeedbackEvent:
    base = {
        "event_id": "e-1",
        "ts": "2026-11-23T06:00:00.5Z",
        "source": "dream_ui",
        "type": "thumbs",
        "payload": {"direction": "up", "comment": "ok"},
    }
    return FeedbackEvent.model_validate({**base, **kw})


def test_single_object_round_trip() -> None:
    serde = AvroSerde()
    event = _event(user_id="u1", tags=["a"], value=1.0, confidence=1.0)
    data = serde.encode(event.to_avro())
    assert data[:2] == SINGLE_OBJECT_MAGIC
    assert data[2:10] == schema_fingerprint(load_schema("feedback_event_v1"))
    assert FeedbackEvent.from_avro(serde.decode(data)) == event


def test_fingerprint_matches_the_avro_spec_vector() -> None:
    # Avro spec: CRC-64-AVRO("null") == 0x63dd24e7cc258f8a, stored little-endian.
    assert schema_fingerprint("null") == struct.pack("<Q", 0x63DD24E7CC258F8A)  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(
    comment=st.text(max_size=200),
    extra=st.dictionaries(
        st.text(min_size=1, max_size=20),
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=50),
        max_size=8,
    ),
    value=st.none() | st.floats(-1, 1),
)
def test_round_trip_property(comment: str, extra: dict, value: float | None) -> None:
    extra.pop("extra", None)
    for key in ("text", "comment", "corrected_response"):
        extra.pop(key, None)
    event = _event(payload={"comment": comment, **extra}, value=value)
    serde = AvroSerde()
    assert FeedbackEvent.from_avro(serde.decode(serde.encode(event.to_avro()))) == event


def _v2_schema() -> dict:
    v2 = copy.deepcopy(load_schema("feedback_event_v1"))
    v2["name"] = "ai.feedback.v1.FeedbackEvent"
    v2["fields"].append({"name": "locale", "type": ["null", "string"], "default": None})
    return v2


def test_v2_writer_read_by_v1_reader_drops_the_new_field() -> None:
    v2 = _v2_schema()
    writer = AvroSerde(reader_schema=v2)
    record = {**_event().to_avro(), "locale": "de-CH"}
    data = writer.encode(record)
    reader = AvroSerde(catalog=SchemaCatalog(v2))
    decoded = reader.decode(data)
    assert "locale" not in decoded
    assert FeedbackEvent.from_avro(decoded) == _event()


def test_v1_writer_read_by_v2_reader_gets_the_default() -> None:
    v1_data = AvroSerde().encode(_event().to_avro())
    v2 = _v2_schema()
    reader = AvroSerde(reader_schema=v2, catalog=SchemaCatalog(load_schema("feedback_event_v1")))
    decoded = reader.decode(v1_data)
    assert decoded["locale"] is None
    assert decoded["source"] == "dream_ui"


def test_v2_writer_unknown_to_the_reader_is_poison() -> None:
    data = AvroSerde(reader_schema=_v2_schema()).encode({**_event().to_avro(), "locale": None})
    with pytest.raises(PoisonEvent, match="unknown schema fingerprint"):
        AvroSerde().decode(data)


class _StubRegistry:
    """A schema registry held in memory: the wire format is what is under test here."""

    def __init__(self) -> None:
        self.schemas: dict[int, object] = {}

    def register_schema(self, subject: str, schema: object) -> int:
        self.schemas[17] = schema
        return 17

    def get_schema(self, schema_id: int) -> object:
        return self.schemas[schema_id]


def test_confluent_framing_round_trip_and_cross_decode() -> None:
    registry = _StubRegistry()
    framed = AvroSerde(registry=registry)
    data = framed.encode(_event().to_avro())
    assert data[:1] == CONFLUENT_MAGIC and struct.unpack(">I", data[1:5])[0] == 17
    assert framed.decode(data)["source"] == "dream_ui"
    # A registry-aware decoder also reads single-object messages.
    assert framed.decode(AvroSerde().encode(_event().to_avro()))["type"] == "thumbs"
    # Without a registry, registry framing is poison with a reason saying so.
    with pytest.raises(PoisonEvent, match="no schema registry is configured"):
        AvroSerde().decode(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (None, "empty"),
        (b'{"source": "json"}', "unknown framing"),
        (SINGLE_OBJECT_MAGIC + b"\x01\x02", "truncated"),
        (b"\x00\x00", "truncated"),
        (SINGLE_OBJECT_MAGIC + b"\xff" * 8 + b"abc", "unknown schema fingerprint"),
    ],
)
def test_poison_is_detected_with_a_reason(data: bytes | None, reason: str) -> None:
    with pytest.raises(PoisonEvent, match=reason):
        AvroSerde().decode(data)


def test_truncated_and_padded_bodies_are_poison() -> None:
    serde = AvroSerde()
    good = serde.encode(_event().to_avro())
    with pytest.raises(PoisonEvent, match="avro decode failed"):
        serde.decode(good[: len(good) // 2])
    with pytest.raises(PoisonEvent, match="trailing bytes"):
        serde.decode(good + b"\x00\x00")


def test_poison_reason_never_contains_payload_text() -> None:
    serde = AvroSerde()
    good = serde.encode(_event(payload={"comment": "secret-comment-text"}).to_avro())
    for cut in range(11, len(good) - 1, 7):
        try:
            serde.decode(good[:cut])
        except PoisonEvent as exc:
            assert "secret" not in str(exc)
