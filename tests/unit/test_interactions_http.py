"""Tracking over HTTP, the pure parts: the one track() rule, the gateway's answer for an
interaction, and which rows a tombstone erases."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from schemas.interaction import tracked_interaction
from sinks.interaction_lookup import interaction_answer
from sinks.state_sinks import erasure_bounds
from stream_processors.redact import redact_text

DATA = {"interaction_id": "i-1", "source": "assistant", "prompt": "I am jane@example.com", "response": "ok"}


def test_snapshots_are_redacted_when_text_is_allowed() -> None:
    interaction = tracked_interaction(DATA, allow_text=True, redact=redact_text)
    assert interaction.prompt == "I am [EMAIL]" and interaction.response == "ok"


def test_snapshots_are_never_kept_when_text_is_not_allowed() -> None:
    interaction = tracked_interaction(DATA, allow_text=False, redact=redact_text)
    assert interaction.prompt is None and interaction.response is None and interaction.source == "assistant"


def test_none_values_are_left_out_and_bad_values_are_named() -> None:
    assert tracked_interaction({**DATA, "cost": None}, allow_text=False, redact=redact_text).cost is None
    with pytest.raises(ValidationError) as caught:
        tracked_interaction(
            {"interaction_id": "", "source": "a", "latency_ms": -1, "prompt": 5, "user_id": "u"},
            allow_text=True,
            redact=redact_text,
        )
    fields = {".".join(map(str, e["loc"])) for e in caught.value.errors()}
    assert fields == {"interaction_id", "latency_ms", "prompt", "user_id"}


TS = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
CONTEXT = (TS.replace(tzinfo=None), "assistant", "m-1", "p-1", "I am [EMAIL]", "ok", 840.0, 0.002)


def test_answer_has_the_context_and_the_stats() -> None:
    last = (datetime(2026, 11, 30, 13, 0), "rating", 0.5)
    answer = interaction_answer("i-1", CONTEXT, (3, 1.5, 2, last), allow_text=True)
    assert answer == {
        "interaction_id": "i-1",
        "context": {
            "ts": "2026-11-30T12:00:00+00:00",
            "source": "assistant",
            "model_version": "m-1",
            "prompt_version": "p-1",
            "prompt": "I am [EMAIL]",
            "response": "ok",
            "latency_ms": 840.0,
            "cost": 0.002,
        },
        "feedback": {
            "count": 3,
            "mean": 0.75,
            "last": {"ts": "2026-11-30T13:00:00+00:00", "type": "rating", "value": 0.5},
        },
    }


def test_answer_without_text_or_feedback() -> None:
    empty = (0, 0.0, 0, (datetime(1970, 1, 1), "", None))
    answer = interaction_answer("i-1", CONTEXT, empty, allow_text=False)
    assert answer is not None
    assert "prompt" not in answer["context"] and "response" not in answer["context"]
    assert answer["feedback"] == {"count": 0, "mean": None, "last": None}
    # Feedback without a value (an implicit signal, say) counts, but gives no mean.
    answer = interaction_answer("i-1", CONTEXT, (1, 0.0, 0, (datetime(2026, 12, 1), "implicit", None)), allow_text=True)
    assert answer is not None and answer["feedback"]["count"] == 1 and answer["feedback"]["mean"] is None


def test_no_context_is_no_answer() -> None:
    assert interaction_answer("i-9", None, (2, 1.0, 2, (TS, "thumbs", 1.0)), allow_text=True) is None


def test_a_tombstone_erases_what_came_before_it_only() -> None:
    messages = [
        (b"a", b"v", 10),
        (b"b", None, 11),
        (b"a", None, 12),
        (b"b", b"v", 13),
        (b"a", None, 14),
        (b"c", b"v", 15),
    ]
    # a: its last tombstone is at 14; b: tracked again at 13, after its tombstone at 11 (kept); c: untouched.
    assert erasure_bounds(messages) == {"a": 14, "b": 11}
    assert erasure_bounds([(b"a", b"v", 1)]) == {}
