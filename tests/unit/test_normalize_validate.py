"""Normalization adapters and validation limits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pipeline.errors import InvalidEvent
from schemas import FeedbackEvent
from stream_processors.normalize import adapters, normalize, register_adapter, unregister_adapter
from stream_processors.validate import Limits, validate

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _record(type_: str, payload: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    return FeedbackEvent(source="s", type=type_, ts=NOW, payload=payload or {}, **kw).to_avro()


@pytest.mark.parametrize(
    ("type_", "payload", "value", "confidence"),
    [
        ("thumbs", {"direction": "up"}, 1.0, 1.0),
        ("thumbs", {"value": "down"}, -1.0, 1.0),
        ("thumbs", {"up": False}, -1.0, 1.0),
        ("rating", {"stars": 1}, -1.0, 1.0),
        ("rating", {"stars": 3}, 0.0, 1.0),
        ("rating", {"rating": 5}, 1.0, 1.0),
        ("rating", {"stars": 4}, 0.5, 1.0),
        ("task_success", {"success": True}, 1.0, 1.0),
        ("task_success", {"success": False}, -1.0, 1.0),
        ("regeneration", {}, -1.0, 0.8),
        ("quality_score", {"score": 0.75}, 0.5, 1.0),
        ("correction", {"corrected_response": "fixed"}, -1.0, 0.9),
        ("implicit", {"signal": "copy"}, 0.6, 0.5),
        ("implicit", {"signal": "read_time", "read_time_ms": 60_000}, 0.5, 0.3),
        ("implicit", {"signal": "read_time", "read_time_ms": 3_600_000}, 0.5, 0.3),
        ("implicit", {"signal": "read_time", "read_time_ms": 15_000}, 0.0, 0.3),
        ("bad_output", {}, -1.0, 1.0),
        ("latency", {"latency_ms": 9000}, -0.5, 1.0),
    ],
)
def test_adapters(type_: str, payload: dict[str, Any], value: float, confidence: float) -> None:
    out = normalize(_record(type_, payload))
    assert (out["value"], out["confidence"]) == pytest.approx((value, confidence))


def test_correction_keeps_the_corrected_response() -> None:
    out = normalize(_record("correction", {"corrected_response": "The answer is 42."}))
    assert out["payload"]["corrected_response"] == "The answer is 42."


@pytest.mark.parametrize(
    ("type_", "payload", "field"),
    [
        ("thumbs", {}, "payload.direction"),
        ("rating", {"stars": 9}, "payload.stars"),
        ("rating", {"stars": "five"}, "payload.stars"),
        ("quality_score", {"score": 2}, "payload.score"),
        ("task_success", {"success": "yes"}, "payload.success"),
        ("implicit", {"signal": "wink"}, "payload.signal"),
    ],
)
def test_bad_signal_payloads_name_the_field(type_: str, payload: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        normalize(_record(type_, payload))
    assert info.value.field == field


def test_producer_value_wins_and_unknown_types_pass() -> None:
    assert normalize(_record("thumbs", {"direction": "up"}, value=-0.2))["value"] == -0.2
    unknown = normalize(_record("emoji_reaction", {"emoji": "tada"}))
    assert unknown["value"] is None


def test_new_adapters_register_without_touching_the_gate() -> None:
    register_adapter("emoji_reaction", lambda p: (0.9 if p["extra"].get("emoji") == "tada" else -0.9, 0.6))
    try:
        assert "emoji_reaction" in adapters()
        out = normalize(_record("emoji_reaction", {"emoji": "tada"}))
        assert (out["value"], out["confidence"]) == (0.9, 0.6)
    finally:
        unregister_adapter("emoji_reaction")
    assert normalize(_record("emoji_reaction", {"emoji": "tada"}))["value"] is None


def test_validation_limits() -> None:
    limits = Limits()
    assert validate(_record("thumbs", {"direction": "up"}), NOW, limits).type == "thumbs"
    cases = [
        (_record("t", {"blob": "x" * (65 * 1024)}), "payload", "limit"),
        (_record("t", {"comment": "y" * 40_000}), "payload.comment", "longer than"),
        ({**_record("t"), "ts": NOW + timedelta(minutes=6)}, "ts", "future"),
        ({**_record("t"), "ts": NOW - timedelta(days=91)}, "ts", "retention"),
        ({**_record("t"), "value": 3.0}, "value", "less than or equal to 1"),
        ({**_record("t"), "source": ""}, "source", "at least 1"),
    ]
    for record, field, rule in cases:
        with pytest.raises(InvalidEvent) as info:
            validate(record, NOW, limits)
        assert info.value.field == field
        assert rule in info.value.rule


def test_session_level_feedback_carries_a_propagation_weight() -> None:
    from stream_processors.normalize import SESSION_PROPAGATION_WEIGHT, normalize

    def rec(**kw: object) -> dict[str, object]:
        base = {"source": "s", "type": "rating", "ts": "2026-11-23T00:00:00Z", "payload": {"stars": 5}}
        return FeedbackEvent.model_validate({**base, **kw}).to_avro()

    assert normalize(rec(session_id="s1", interaction_id="i1"))["propagation_weight"] == 1.0
    assert normalize(rec())["propagation_weight"] == 1.0
    assert normalize(rec(session_id="s1"))["propagation_weight"] == SESSION_PROPAGATION_WEIGHT == 0.5
    custom = rec(session_id="s1", payload={"stars": 5, "propagation_weight": 0.25})
    assert normalize(custom)["propagation_weight"] == 0.25
    with pytest.raises(InvalidEvent) as exc:
        normalize(rec(session_id="s1", payload={"stars": 5, "propagation_weight": 2}))
    assert (exc.value.field, exc.value.rule) == ("payload.propagation_weight", "must be a number in [0, 1]")
