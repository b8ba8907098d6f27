"""Reading topics back in integration tests (plain confluent-kafka, no consumer group state)."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from pipeline.settings import Settings

__all__ = ["latest_by_key", "read_partitions", "read_topic"]


_SETTLING = (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART)


def _watermarks(consumer: Consumer, tp: TopicPartition, timeout: float) -> tuple[int, int]:
    """The partition's watermarks; a topic created a moment ago may have no leader yet: wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
            return int(low), int(high)
        except KafkaException as exc:
            if exc.args[0].code() not in _SETTLING or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def read_topic(settings: Settings, topic: str, timeout: float = 20.0) -> list[tuple[bytes | None, bytes | None]]:
    """Every message currently in ``topic`` (all partitions, up to the high watermarks), as (key, value)."""
    return [(key, value) for _, key, value in read_partitions(settings, topic, timeout)]


def read_partitions(
    settings: Settings, topic: str, timeout: float = 20.0
) -> list[tuple[int, bytes | None, bytes | None]]:
    """Like :func:`read_topic`, as (partition, key, value)."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"test-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=timeout).topics[topic]
        ends: dict[int, int] = {}
        for p in meta.partitions:
            low, high = _watermarks(consumer, TopicPartition(topic, p), timeout)
            if high > low:
                ends[p] = high
        if not ends:
            return []
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        out: list[tuple[int, bytes | None, bytes | None]] = []
        done: set[int] = set()
        while len(done) < len(ends):
            msg = consumer.poll(timeout)
            if msg is None:
                raise AssertionError(f"timed out reading {topic}")
            if msg.error():
                continue
            out.append((msg.partition(), msg.key(), msg.value()))
            if msg.offset() >= ends[msg.partition()] - 1:
                done.add(msg.partition())
        return out
    finally:
        consumer.close()


def latest_by_key(settings: Settings, topic: str) -> dict[str, bytes]:
    """The latest value per key of a compacted topic (tombstones remove the key)."""
    latest: dict[str, bytes] = {}
    for key, value in read_topic(settings, topic):
        name = (key or b"").decode()
        if value is None:
            latest.pop(name, None)
        else:
            latest[name] = value
    return latest
