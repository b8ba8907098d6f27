"""The typed Python clients against the real broker: every helper, veto, regret tap, async acks,
and the bulk path's envelopes (one message per partition, in the partition the events' keys map to)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from producers.client import AsyncFeedbackClient, FeedbackClient
from producers.producer import AsyncProducer, DeliveryError, FeedbackProducer, partition_for
from schemas.bulk import Accepted, BulkEncoder
from schemas.envelope import MAX_EVENTS, is_envelope, unpack
from schemas.serde import AvroSerde
from schemas.topics import Topics
from stream_processors.normalize import normalize
from tests.integration.kafka_read import read_partitions, read_topic

pytestmark = pytest.mark.integration


def _values(value: bytes | None) -> list[bytes]:
    """The event values of one raw message: an envelope's, or the message's own."""
    assert value is not None
    return unpack(value) if is_envelope(value) else [value]


def _raw(settings: Settings) -> list[dict[str, object]]:
    serde = AvroSerde()
    return [serde.decode(e) for _, v in read_topic(settings, Topics(settings.topic_prefix).raw) for e in _values(v)]


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


def _subject(record: dict[str, Any]) -> bytes:
    return str(record["user_id"] or record["client_ip"] or record["source"]).encode()


def _wait_for_partition_count(producer: AsyncProducer | FeedbackProducer) -> int:
    deadline = time.monotonic() + 20
    while (count := producer._partitions.get()) is None:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the producer never learnt the partition count"
        time.sleep(0.05)
    return count


def test_emit_many_publishes_envelopes_in_the_partitions_single_messages_use(isolated: Settings) -> None:
    # The topic has 7 partitions while the settings say 3: the count comes from Kafka's metadata.
    ensure_topics(isolated.model_copy(update={"topic_partitions": 7}))
    topic = Topics(isolated.topic_prefix).raw
    serde = AvroSerde()
    items = [
        {"type": "implicit", "payload": {"signal": "copy", "n": i}, **({"user_id": f"u-{i % 250}"} if i % 7 else {})}
        for i in range(3000)
    ]  # 250 users, and one event in seven keyed by the source
    with FeedbackClient("dream_ui", isolated) as fb:
        sent = fb.emit_many(items[:1500])
        sent += fb.emit_many(items[1500:])
    assert fb.producer.delivered == 3000  # events, not messages
    messages = read_partitions(isolated, topic)
    assert messages and all(is_envelope(v) for _, _, v in messages)  # every message is an envelope
    assert len(messages) <= 2 * 7 * (1 + 1500 // MAX_EVENTS)
    envelope_partition: dict[bytes, int] = {}
    ids = []
    for partition, key, value in messages:
        records = [serde.decode(e) for e in _values(value)]  # every event inside decodes
        assert key == _subject(records[0])  # the envelope's key is its first event's
        for record in records:
            subject = _subject(record)
            assert partition_for(subject, 7) == partition
            assert envelope_partition.setdefault(subject, partition) == partition  # one subject, one partition
            ids.append(record["event_id"])
    assert sorted(ids) == sorted(s.event_id for s in sent) and len(ids) == 3000
    ns = sorted(serde.decode(e)["payload"]["extra"]["n"] for _, _, v in messages for e in _values(v))
    assert ns == list(range(3000))

    # One single-event message per subject, placed by librdkafka's own partitioner: the same partitions.
    singles = BulkEncoder(serde).encode(
        [{"source": "dream_ui", "type": "thumbs", "user_id": f"u-{i}"} for i in range(250)]
        + [{"source": "dream_ui", "type": "thumbs"}]
    )
    with FeedbackProducer(isolated) as producer:
        for a in singles:
            assert isinstance(a, Accepted)
            producer.send_encoded(a.key, a.value)
    landed = {k: p for p, k, v in read_partitions(isolated, topic) if not is_envelope(v)}
    assert len(landed) == 251 and set(landed) == set(envelope_partition)
    assert {k: landed[k] for k in envelope_partition} == envelope_partition
    assert len(set(landed.values())) == 7  # the check spans every partition


def test_emit_many_without_envelopes_sends_one_message_per_event(isolated: Settings) -> None:
    ensure_topics(isolated)
    off = isolated.model_copy(update={"envelopes": False})
    with FeedbackClient("dream_ui", off) as fb:
        sent = fb.emit_many([{"type": "implicit", "user_id": f"u-{i % 5}", "payload": {"n": i}} for i in range(200)])
    messages = read_partitions(off, Topics(off.topic_prefix).raw)
    assert len(messages) == 200 and not any(is_envelope(v) for _, _, v in messages)
    serde = AvroSerde()
    assert sorted(serde.decode(v)["event_id"] for _, _, v in messages) == sorted(s.event_id for s in sent)
    assert all(partition_for(k, 3) == p for p, k, _ in messages)  # the partitioner envelopes follow


def _small_messages_topic(settings: Settings) -> str:
    """The raw topic, created refusing record batches over 4 KiB: envelopes of many events are
    refused by the broker, a lone event is not."""
    topic = Topics(settings.topic_prefix).raw
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    new = NewTopic(topic, num_partitions=3, replication_factor=-1, config={"max.message.bytes": "4096"})
    for future in admin.create_topics([new], operation_timeout=30).values():
        future.result(30)
    return topic


def _lone_and_crowded(encoded: list[Accepted | Any], partitions: int) -> tuple[list[Accepted], int]:
    """The events with one first (alone in its partition), then the others in other partitions."""
    first = encoded[0]
    alone = partition_for(first.key, partitions)
    others = [a for a in encoded[1:] if partition_for(a.key, partitions) != alone]
    return [first, *others], alone


def test_a_refused_envelope_names_every_event_it_carried(isolated: Settings) -> None:
    _small_messages_topic(isolated)
    items = [{"source": "s", "type": "thumbs", "user_id": f"u-{i % 40}", "payload": {"n": i}} for i in range(600)]
    accepted, _ = _lone_and_crowded(BulkEncoder(AvroSerde()).encode(items), 3)
    producer = FeedbackProducer(isolated)
    assert producer.send_encoded_many(accepted) == len(accepted)
    with pytest.raises(DeliveryError) as info:
        producer.flush(30)
    failures = info.value.failures
    assert sorted(label for label, _ in failures) == sorted(a.event_id for a in accepted[1:])
    assert all("too large" in reason.lower() for _, reason in failures), failures[:3]
    assert producer.delivered == 1  # the lone event, sent as itself
    landed = read_topic(isolated, Topics(isolated.topic_prefix).raw)
    assert [AvroSerde().decode(v)["event_id"] for _, v in landed] == [accepted[0].event_id]


def test_publish_many_answers_each_event_with_its_envelopes_result(isolated: Settings) -> None:
    _small_messages_topic(isolated)
    items = [{"source": "s", "type": "thumbs", "user_id": f"u-{i % 40}", "payload": {"n": i}} for i in range(600)]
    accepted, _ = _lone_and_crowded(BulkEncoder(AvroSerde()).encode(items), 3)
    publisher = AsyncProducer(isolated, timeout_s=30.0)
    try:
        assert _wait_for_partition_count(publisher) == 3

        async def run() -> list[Any]:
            return await publisher.publish_many([(a.key, a.value) for a in accepted])

        answers = asyncio.run(run())
    finally:
        publisher.close()
    assert len(answers) == len(accepted)
    assert answers[0] is None  # the lone event
    assert all(a is not None and "too large" in a.str().lower() for a in answers[1:])


def test_publish_many_publishes_envelopes_and_answers_in_input_order(isolated: Settings) -> None:
    ensure_topics(isolated)
    serde = AvroSerde()
    items = [{"source": "mesh", "type": "implicit", "user_id": f"u-{i % 97}", "payload": {"n": i}} for i in range(2500)]
    accepted = [a for a in BulkEncoder(serde).encode(items) if isinstance(a, Accepted)]
    publisher = AsyncProducer(isolated, timeout_s=30.0)
    try:
        assert _wait_for_partition_count(publisher) == 3

        async def run() -> list[Any]:
            return await publisher.publish_many([(a.key, a.value) for a in accepted])

        answers = asyncio.run(run())
    finally:
        publisher.close()
    assert answers == [None] * 2500
    messages = read_partitions(isolated, Topics(isolated.topic_prefix).raw)
    assert all(is_envelope(v) for _, _, v in messages) and len(messages) <= 3 * 3
    records = [(p, serde.decode(e)) for p, _, v in messages for e in _values(v)]
    assert sorted(r["event_id"] for _, r in records) == sorted(a.event_id for a in accepted)
    assert all(partition_for(_subject(r), 3) == p for p, r in records)
    for p in range(3):  # in each partition, the input order
        ns = [r["payload"]["extra"]["n"] for q, r in records if q == p]
        assert ns == sorted(ns)
