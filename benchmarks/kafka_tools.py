"""Kafka plumbing for ``feedback bench``: output topics stamped by the broker, high watermarks
polled cheaply during a run, and whole topics read back after it.

Throughput is measured on the broker's clock: every topic whose timing counts is set to
``message.timestamp.type=LogAppendTime``, so a message's timestamp is when the broker
appended it, whoever produced it and however fast the benchmark reads it back. During a
run only high watermarks are polled (one request per partition); the messages are read
after the measured process has stopped, so reading costs the measured run nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic, ResourceType

from pipeline.settings import Settings

__all__ = ["Watermarks", "create_topics", "events_in", "group_members", "log_append_time", "read_topic"]

try:
    from schemas.envelope import is_envelope, unpack
except ImportError:  # pragma: no cover - a tree without envelopes
    is_envelope, unpack = None, None  # type: ignore[assignment]

LOG_APPEND = {"message.timestamp.type": "LogAppendTime"}


def events_in(value: bytes | None) -> int:
    """How many events a message carries: an envelope's items, a JSON array's elements
    (state records, outcomes if ever batched), else one; a null value (a tombstone) none."""
    if value is None:
        return 0
    if is_envelope is not None and is_envelope(value):
        return len(unpack(value))
    if value[:1] == b"[":
        try:
            return len(orjson.loads(value))
        except orjson.JSONDecodeError:
            return 1
    return 1


def create_topics(settings: Settings, names: Iterable[str], partitions: int | None = None) -> None:
    """Create plain topics stamped with the broker's append time (the baselines' outputs)."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    wanted = [NewTopic(n, num_partitions=partitions or settings.topic_partitions, replication_factor=1,
                       config=dict(LOG_APPEND)) for n in names]  # fmt: skip
    for name, future in admin.create_topics(wanted, operation_timeout=30).items():
        try:
            future.result(30)
        except KafkaException as exc:
            if "already exists" not in str(exc).lower() and "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise SystemExit(f"cannot create {name}: {exc}") from None


def log_append_time(settings: Settings, names: Iterable[str]) -> None:
    """Switch existing topics to broker append time (the pipeline's topics, made by ensure_topics)."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    resources = [
        ConfigResource(ResourceType.TOPIC, n, incremental_configs=[
            ConfigEntry("message.timestamp.type", "LogAppendTime", incremental_operation=AlterConfigOpType.SET)])
        for n in names
    ]  # fmt: skip
    for resource, future in admin.incremental_alter_configs(resources).items():
        try:
            future.result(30)
        except KafkaException as exc:
            raise SystemExit(f"cannot set LogAppendTime on {resource.name}: {exc}") from None


class Watermarks:
    """Sum of the high watermarks of topics, polled during a run (no messages are fetched)."""

    def __init__(self, settings: Settings) -> None:
        self.consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "bench-watermarks",
                                  "enable.auto.commit": False})  # fmt: skip
        self._partitions: dict[str, list[int]] = {}

    def _parts(self, topic: str) -> list[int]:
        if not self._partitions.get(topic):
            meta = self.consumer.list_topics(topic, timeout=10).topics.get(topic)
            self._partitions[topic] = sorted(meta.partitions) if meta is not None and meta.error is None else []
        return self._partitions[topic]

    def high(self, topic: str) -> int:
        total = 0
        for p in self._parts(topic):
            _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
            total += max(0, high)
        return total

    def close(self) -> None:
        self.consumer.close()


def read_topic(
    settings: Settings,
    topic: str,
    *,
    keep: Callable[[Any], Any] | None = None,
    timeout: float = 300.0,
) -> list[tuple[int, int, Any]]:
    """Every message of ``topic`` up to its current high watermarks, as (broker timestamp
    in ms, events carried, ``keep(message)`` or None), in no particular order across
    partitions. Bounded by ``timeout``; raises SystemExit if the end was not reached."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "bench-reader",
                         "enable.auto.commit": False, "fetch.queue.backoff.ms": 20})  # fmt: skip
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return []
        ends: dict[int, int] = {}
        for p in meta.partitions:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
            if high > 0:
                ends[p] = high
        if not ends:
            return []
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        out: list[tuple[int, int, Any]] = []
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(10_000, 0.5):
                if msg.error() is not None:
                    continue
                p = msg.partition()
                value = msg.value()
                out.append((msg.timestamp()[1], events_in(value), keep(msg) if keep else None))
                if p in ends and msg.offset() >= ends[p] - 1:
                    del ends[p]
        if ends:
            raise SystemExit(f"reading {topic}: partitions {sorted(ends)} not read to the end in {timeout:.0f} s")
        return out
    finally:
        consumer.close()


def group_members(settings: Settings, group: str) -> tuple[str, int]:
    """(state, number of members) of a consumer group; ("unknown", 0) when not described."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    try:
        desc = admin.describe_consumer_groups([group], request_timeout=5)[group].result(10)
    except Exception:
        return "unknown", 0
    return str(desc.state.name if hasattr(desc.state, "name") else desc.state), len(desc.members)
