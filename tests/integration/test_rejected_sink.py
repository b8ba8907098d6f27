"""feedback.rejected.v1 → RejectedSink → ClickHouse ``rejected_events``, on the real services."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer

from pipeline.kafka_admin import ensure_topics, topic_message_counts
from pipeline.settings import Settings
from pipeline.stats import collect_stats
from schemas.serde import AvroSerde
from schemas.topics import Topics
from sinks.clickhouse import connect
from sinks.feedback_sink import RejectedSink
from tests.integration.pipeline_procs import wait_for

pytestmark = pytest.mark.integration

N = 50
REASONS = ("invalid", "rate_limited", "duplicate")
BAD = b"not-avro SECRET-PAYLOAD-42"
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _rejections(raw_topic: str) -> list[dict[str, Any]]:
    return [
        {
            "event_id": f"e-{i:03d}",
            "source": "dream_ui",
            "type": "thumbs",
            "ts": None if i % 10 == 0 else T0 - timedelta(seconds=i),
            "hash": f"{i:032x}",
            "reason": REASONS[i % len(REASONS)],
            "field": "value" if i % 3 == 0 else "",
            "rule": "a rule, in words",
            "topic": raw_topic,
            "partition": i % 3,
            "offset": 1000 + i,
            "rejected_at": T0 + timedelta(milliseconds=i),
        }
        for i in range(N)
    ]


def _produce(settings: Settings, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True, "acks": "all"})
    for i, value in enumerate(values):
        producer.produce(topic, value=value, key=f"k{i % 7}".encode())
    assert producer.flush(30) == 0


def _run_until(settings: Settings, messages: int) -> RejectedSink:
    """Run the sink in a thread until it has flushed ``messages`` messages, then stop it."""
    sink = RejectedSink(settings, batch_ms=200)
    thread = threading.Thread(target=sink.run, kwargs={"idle_exit_s": 120}, name="rejected-test")
    thread.start()
    try:
        wait_for(lambda: sink.rows_written >= messages or not thread.is_alive(), 90, f"{messages} messages flushed")
    finally:
        sink.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert sink.rows_written == messages
    return sink


def _final(settings: Settings) -> list[tuple[Any, ...]]:
    db = settings.clickhouse_database
    return (
        connect(settings)
        .query(
            f"SELECT event_id, reason, topic, partition, offset, ts FROM `{db}`.rejected_events FINAL ORDER BY offset"
        )
        .result_rows
    )


def _dead_letters(settings: Settings, topic: str, expected: int) -> list[dict[str, Any]]:
    serde = AvroSerde("dead_letter_v1")
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.topic_prefix}check",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    letters: list[dict[str, Any]] = []
    try:
        for _ in range(30):
            for msg in consumer.consume(num_messages=100, timeout=1.0):
                if msg.error() is None:
                    letters.append(serde.decode(msg.value()))
            if len(letters) >= expected:
                break
    finally:
        consumer.close()
    return letters


def test_rejections_land_once_even_when_replayed_and_poison_goes_to_the_dlq(
    isolated: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    ensure_topics(isolated)
    topics = Topics(isolated.topic_prefix)
    serde = AvroSerde("rejected_v1")
    records = _rejections(topics.raw)
    values = [serde.encode(r) for r in records]
    _produce(isolated, topics.rejected, [*values[: N // 2], BAD, *values[N // 2 :]])

    caplog.set_level(logging.INFO)
    first = _run_until(isolated, N + 1)
    assert first.dead_lettered == 1

    rows = _final(isolated)
    assert len(rows) == N
    by_id = {r["event_id"]: r for r in records}
    for event_id, reason, topic, partition, offset, ts in rows:
        r = by_id[event_id]
        assert (reason, topic, partition, offset) == (r["reason"], r["topic"], r["partition"], r["offset"])
        assert ts == r["ts"] or (ts is not None and ts.replace(tzinfo=UTC) == r["ts"])
    assert Counter(r[1] for r in rows) == Counter(r["reason"] for r in records)

    # The undecodable message reached the DLQ with its coordinates, and its bytes never reached the log.
    letters = _dead_letters(isolated, topics.dlq, 1)
    assert len(letters) == 1
    (letter,) = letters
    assert (letter["stage"], letter["topic"], letter["raw"]) == ("sink", topics.rejected, BAD)
    assert letter["error"] and letter["partition"] >= 0 and letter["offset"] >= 0
    assert b"SECRET-PAYLOAD" not in caplog.text.encode()
    assert any("sink_undecodable" in rec.getMessage() for rec in caplog.records)

    # A replay: the same rejections (same raw coordinates) at new offsets of the rejected topic.
    _produce(isolated, topics.rejected, values)
    second = _run_until(isolated, N)
    assert second.dead_lettered == 0
    assert len(_final(isolated)) == N
    db = isolated.clickhouse_database
    assert int(connect(isolated).command(f"SELECT count() FROM `{db}`.rejected_events")) in (N, 2 * N)

    stats = collect_stats(isolated)
    expected_reasons = dict(Counter(r["reason"] for r in records))
    assert stats["kafka"][topics.rejected] == 2 * N + 1
    assert stats["clickhouse"]["rejected_events"] == N
    assert stats["clickhouse"]["rejected_by_reason"] == expected_reasons
    assert stats["rejected"] == {
        "topic": topics.rejected,
        "kafka": 2 * N + 1,
        "clickhouse_final": N,
        "by_reason": expected_reasons,
    }
    assert topic_message_counts(isolated, [topics.dlq])[topics.dlq] == 1
