"""The pydantic mirror of FeedbackEvent: clear errors naming the field and the rule."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import FeedbackEvent, Severity


def _error_locs(exc: ValidationError) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in exc.errors()]


def test_defaults() -> None:
    e = FeedbackEvent(source="dream_ui", type="thumbs")
    assert e.severity is Severity.info
    assert e.tags == []
    assert len(e.hash) == 64
    assert e.ts.tzinfo is not None
    assert e.event_id != FeedbackEvent(source="dream_ui", type="thumbs").event_id


def test_flat_payload_splits_free_text_from_the_map() -> None:
    e = FeedbackEvent(source="s", type="correction", payload={"corrected_response": "fixed", "text": "t", "n": 3})
    assert e.payload.corrected_response == "fixed"
    assert e.payload.text == "t"
    assert e.payload.extra == {"n": 3}
    assert e.payload.flat() == {"text": "t", "corrected_response": "fixed", "n": 3}


@pytest.mark.parametrize(
    ("update", "loc", "fragment"),
    [
        ({"severity": "fatal"}, "severity", "debug"),
        ({"source": ""}, "source", "at least 1"),
        ({"value": 1.5}, "value", "less than or equal to 1"),
        ({"value": math.nan}, "value", "finite"),
        ({"confidence": -0.1}, "confidence", "greater than or equal to 0"),
        ({"payload": {"nested": {"a": 1}}}, "payload", "nested objects and lists are not supported"),
        ({"payload": {"x": math.inf}}, "payload", "finite"),
        ({"payload": {"text": 3}}, "payload", "payload.text: must be a string"),
        ({"payload": "not an object"}, "payload", "payload must be an object"),
        ({"ts": "yesterday"}, "ts", "datetime"),
        ({"unknown_field": 1}, "unknown_field", "Extra inputs"),
    ],
)
def test_invalid_events_name_the_field_and_rule(update: dict, loc: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        FeedbackEvent.model_validate({"source": "s", "type": "t", **update})
    assert any(x.startswith(loc) for x in _error_locs(info.value)), _error_locs(info.value)
    assert fragment in str(info.value)


def test_avro_form_round_trip() -> None:
    e = FeedbackEvent(source="s", type="t", payload={"comment": "c", "k": 1.5}, tags=["x"], value=-0.5)
    assert FeedbackEvent.from_avro(e.to_avro()) == e


def test_json_form_has_flat_payload_and_utc_text_timestamp() -> None:
    e = FeedbackEvent(source="s", type="t", ts="2026-01-01T00:00:00+01:00", payload={"comment": "c", "k": 1})
    data = e.to_json_dict()
    assert data["ts"] == "2025-12-31T23:00:00.000000Z"
    assert data["payload"] == {"comment": "c", "k": 1}
    assert FeedbackEvent.model_validate(data) == e


def test_event_ids_are_canonical_uuid4_text() -> None:
    import uuid

    from schemas import new_event_id

    ids = {new_event_id() for _ in range(2000)}
    assert len(ids) == 2000
    for text in list(ids)[:200]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122


@settings(max_examples=300, deadline=None)
@given(st.datetimes(min_value=datetime(1, 1, 2), timezones=st.none() | st.just(UTC) | st.timezones()))
def test_format_ts_is_the_strftime_form_in_utc(value: datetime) -> None:
    from schemas import format_ts
    from schemas.models import to_utc

    try:
        utc = to_utc(value)
    except OverflowError:
        return  # an instant outside what datetime can hold in UTC
    assert format_ts(value) == utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
