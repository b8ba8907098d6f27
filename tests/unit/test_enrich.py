"""The pure delayed-feedback steps: the stored context and the join."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pipeline.errors import InvalidEvent
from schemas.interaction import Interaction
from stream_processors.enrich import context_of, enrich, newer
from stream_processors.validate import validate

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def _event(at: datetime, **kw: Any) -> dict[str, Any]:
    payload = {"text": None, "comment": None, "corrected_response": None, "extra": {"stars": 4}}
    return {"ts": at, "interaction_id": "i-1", "model_version": None, "prompt_version": None, "payload": payload, **kw}


def _context(**kw: Any) -> dict[str, Any]:
    record = Interaction(interaction_id="i-1", ts=T0, source="svc", **kw).to_avro()
    record["ts"] = T0  # as the Avro reader returns it
    return context_of(record, allow_text=True)


def test_the_ttl_boundary_decides_joined_or_expired() -> None:
    ctx = _context(model_version="m-1")
    at_limit, _ = enrich(_event(T0 + timedelta(seconds=60)), ctx, ttl_s=60)
    past, status = enrich(_event(T0 + timedelta(seconds=60, microseconds=1)), ctx, ttl_s=60)
    assert at_limit["payload"]["extra"]["interaction_status"] == "joined" and at_limit["model_version"] == "m-1"
    assert status == "expired" and past["model_version"] is None
    assert past["payload"]["extra"] == {"stars": 4, "interaction_status": "expired"}
    # Feedback stamped before its interaction (clock skew) still joins.
    assert enrich(_event(T0 - timedelta(seconds=5)), ctx, ttl_s=60)[1] == "joined"


def test_the_event_is_not_changed_in_place() -> None:
    event = _event(T0)
    enrich(event, _context(latency_ms=5.0), ttl_s=60)
    assert event == _event(T0)


def test_context_redacts_and_drops_text_by_setting() -> None:
    record = Interaction(interaction_id="i", source="s", response="call +1 415 555 0100", prompt="hi").to_avro()
    record["ts"] = T0
    counts: Counter[str] = Counter()
    assert context_of(record, allow_text=True, counts=counts)["response"] == "call [PHONE]"
    assert counts["PHONE"] == 1
    private = context_of(record, allow_text=False)
    assert private["response"] is None and private["prompt"] is None


def test_invalid_context_names_the_field_and_rule() -> None:
    record = Interaction(interaction_id="i", source="s").to_avro()
    record["ts"], record["cost"] = T0, float("nan")
    with pytest.raises(InvalidEvent) as exc:
        context_of(record, allow_text=False)
    assert exc.value.field == "cost" and "finite" in exc.value.rule


def test_the_latest_interaction_wins() -> None:
    assert newer(None, {"ts_s": 1.0})
    assert newer({"ts_s": 1.0}, {"ts_s": 2.0}) and newer({"ts_s": 1.0}, {"ts_s": 1.0})
    assert not newer({"ts_s": 2.0}, {"ts_s": 1.0})


def test_clients_cannot_forge_the_enrichment() -> None:
    from schemas.models import FeedbackEvent

    forged = FeedbackEvent.model_validate(
        {"source": "s", "type": "thumbs", "payload": {"direction": "up", "interaction_status": "joined"}}
    )
    with pytest.raises(InvalidEvent) as exc:
        validate(forged.to_avro() | {"ts": forged.ts}, datetime.now(UTC))
    assert exc.value.field == "payload.interaction_status" and "set by the stream" in exc.value.rule


def test_interaction_model_rules() -> None:
    with pytest.raises(ValueError, match="latency_ms"):
        Interaction(interaction_id="i", source="s", latency_ms=-1)
    with pytest.raises(ValueError, match="interaction_id"):
        Interaction(interaction_id="", source="s")
    with pytest.raises(ValueError, match="timezone"):
        Interaction(interaction_id="i", source="s", ts=datetime(2026, 1, 1))
