"""Client helpers refuse bad arguments before anything is sent, naming the field."""

from __future__ import annotations

import pytest

from pipeline.settings import Settings
from producers.client import FeedbackClient


@pytest.fixture
def client() -> FeedbackClient:
    # Nothing listens here: a helper that tried to send would only queue; these must raise first.
    return FeedbackClient("dream_ui", Settings(bootstrap_servers="127.0.0.1:1"))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.rating(6), "payload.stars"),
        (lambda c: c.rating(True), "payload.stars"),
        (lambda c: c.quality_score(1.5), "payload.score"),
        (lambda c: c.implicit("stare"), "payload.signal"),
        (lambda c: c.veto(""), "payload.reason_code"),
        (lambda c: c.regret_tap(-3.0), "payload.valence"),
        (lambda c: c.thumbs(up=True, severity="apocalyptic"), "severity"),
        (lambda c: c.emit("", {}), "type"),
    ],
)
def test_bad_arguments_raise_naming_the_field(client: FeedbackClient, call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(client)  # type: ignore[operator]
    assert client.producer.delivered == 0


def test_regret_threshold_is_configurable() -> None:
    client = FeedbackClient("x", Settings(bootstrap_servers="127.0.0.1:1"), regret_threshold=-0.8)
    assert client.regret_tap(-0.5) is None
    event = client.regret_tap(-0.9)
    assert event is not None and event.type == "regret_signal" and event.source == "oneiric"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"latency_ms": -1}, "latency_ms"),
        ({"cost": float("inf")}, "cost"),
        ({"colour": "red"}, "colour"),
        ({"model_version": ""}, "model_version"),
    ],
)
def test_track_refuses_bad_context_naming_the_field(client: FeedbackClient, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        client.track("i-1", **kwargs)
    assert client._tracker is None  # nothing was queued


def test_track_keeps_snapshots_only_when_text_is_allowed_and_always_redacts() -> None:
    private = FeedbackClient("svc", Settings(bootstrap_servers="127.0.0.1:1"), model_version="m-1")
    tracked = private.track("i-1", response="mail me: a@b.example", latency_ms=12)
    assert tracked.response is None and tracked.model_version == "m-1" and tracked.latency_ms == 12
    allowed = FeedbackClient("svc", Settings(bootstrap_servers="127.0.0.1:1", allow_text=True))
    assert allowed.track("i-2", response="mail me: a@b.example").response == "mail me: [EMAIL]"


def test_emit_many_refuses_the_whole_call_naming_index_and_field(
    client: FeedbackClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = {"type": "implicit", "payload": {"signal": "copy"}}
    queued: list[bytes] = []
    monkeypatch.setattr(client.producer, "send_encoded_many", lambda events: queued.extend(e.value for e in events))
    with pytest.raises(ValueError, match=r"^events\.2\.payload.*payload\.signal: .*nested"):
        client.emit_many([good, good, {"type": "implicit", "payload": {"signal": {"nested": 1}}}])
    with pytest.raises(ValueError, match=r"^events\.1\.type: "):
        client.emit_many([good, {"type": ""}])
    with pytest.raises(ValueError, match=r"^events\.0: must be a mapping"):
        client.emit_many(["thumbs"])  # type: ignore[list-item]
    assert queued == []  # nothing sent for any of them
    client.emit_many([good, good])
    assert len(queued) == 2


def test_emit_many_fills_the_clients_source_and_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    fb = FeedbackClient("dream_ui", Settings(bootstrap_servers="127.0.0.1:1"), model_version="m-1")
    queued: list[bytes] = []
    monkeypatch.setattr(fb.producer, "send_encoded_many", lambda events: queued.extend(e.value for e in events))
    sent = fb.emit_many([{"type": "thumbs", "payload": {"direction": "up"}}, {"type": "t", "source": "own"}])
    assert queued == [s.value for s in sent]
    first, second = (fb.producer.serde.decode(s.value) for s in sent)
    assert (first["source"], first["model_version"], first["hash"]) == ("dream_ui", "m-1", sent[0].hash)
    assert (second["source"], second["model_version"]) == ("own", "m-1")
    assert first["event_id"] == sent[0].event_id != sent[1].event_id
