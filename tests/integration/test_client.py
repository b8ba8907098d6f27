"""The typed Python clients against the real broker: every helper, veto, regret tap, async acks."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from producers.client import AsyncFeedbackClient, FeedbackClient
from producers.producer import AsyncProducer, DeliveryError
from schemas.serde import AvroSerde
from schemas.topics import Topics
from stream_processors.normalize import normalize
from tests.integration.kafka_read import read_topic

pytestmark = pytest.mark.integration


def _raw(settings: Settings) -> list[dict[str, object]]:
    serde = AvroSerde()
    return [serde.decode(v) for _, v in read_topic(settings, Topics(settings.topic_prefix).raw)]


def test_every_helper_publishes_a_signal_the_stream_normalizes(isolated: Settings) -> None:
    ensure_topics(isolated)
    with FeedbackClient("dream_ui", isolated, model_version="m-1") as fb:
        sent = [
            fb.thumbs(up=False, interaction_id="i-1", user_id="u-1", comment="wrong"),
            fb.rating(5, interaction_id="i-1"),
            fb.correction("Canberra", interaction_id="i-2"),
            fb.task_success(True),
            fb.regeneration(),
            fb.quality_score(0.75),
            fb.implicit("read_time", read_time_ms=60_000),
            fb.bad_output(severity="error"),
            fb.latency(4200),
            fb.safety(),
            fb.veto("unsafe_advice", interaction_id="i-3"),
            fb.regret_tap(-0.6, {"turn": 3}),
            fb.emit("custom_signal", {"k": "v"}, idempotency_key="idem-1"),
        ]
        assert fb.regret_tap(-0.1) is None  # above the threshold: nothing sent
    records = {r["event_id"]: r for r in _raw(isolated)}
    assert set(records) == {e.event_id for e in sent}
    values = [normalize(records[e.event_id])["value"] for e in sent[:12]]
    assert values == [-1.0, 1.0, -1.0, 1.0, -1.0, 0.5, 0.5, -1.0, -0.5, -1.0, -1.0, -0.6]
    veto, regret = records[sent[10].event_id], records[sent[11].event_id]
    assert veto["type"] == "veto" and veto["payload"]["extra"]["reason_code"] == "unsafe_advice"
    assert (regret["source"], regret["type"]) == ("oneiric", "regret_signal")
    assert regret["payload"]["extra"] == {"turn": 3, "valence": -0.6}
    assert all(r["model_version"] == "m-1" for r in records.values() if r["source"] == "dream_ui")


def test_async_client_returns_after_kafka_acknowledges(isolated: Settings) -> None:
    ensure_topics(isolated)

    async def run() -> list[str]:
        async with AsyncFeedbackClient("mesh", isolated) as fb:
            events = await asyncio.gather(*(fb.thumbs(up=True, user_id=f"u-{i}") for i in range(20)))
            assert await fb.regret_tap(0.2) is None
            return [e.event_id for e in events]

    ids = asyncio.run(run())
    assert {r["event_id"] for r in _raw(isolated)} == set(ids)


def test_async_client_raises_when_kafka_does_not_acknowledge(isolated: Settings) -> None:
    broken = isolated.model_copy(update={"bootstrap_servers": "127.0.0.1:1"})

    async def run() -> None:
        fb = AsyncFeedbackClient("mesh", broken)
        fb._producer = AsyncProducer(broken, timeout_s=1.0)  # give up after 1 s instead of 120
        try:
            with pytest.raises(DeliveryError, match="not acknowledged"):
                await fb.thumbs(up=True)
        finally:
            await fb.aclose()

    asyncio.run(run())


def test_emit_many_publishes_every_event_once_with_its_hash(isolated: Settings) -> None:
    ensure_topics(isolated)
    items = [{"type": "implicit", "user_id": f"u-{i % 7}", "payload": {"signal": "copy", "n": i}} for i in range(300)]
    with FeedbackClient("dream_ui", isolated) as fb:
        sent = fb.emit_many(items)
    records = {r["event_id"]: r for r in _raw(isolated)}
    assert len(records) == 300 and set(records) == {s.event_id for s in sent}
    for s in sent:
        assert records[s.event_id]["hash"] == s.hash
    assert sorted(r["payload"]["extra"]["n"] for r in records.values()) == list(range(300))

    async def run() -> list[str]:
        async with AsyncFeedbackClient("mesh", isolated) as fb:
            return [s.event_id for s in await fb.emit_many(items[:50])]

    more = asyncio.run(run())
    assert set(more) <= {r["event_id"] for r in _raw(isolated)} and len(set(more)) == 50
