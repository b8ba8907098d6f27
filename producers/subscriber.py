"""Following the compacted state topics: directive bias and source reputation.

``BiasSubscriber`` is the client for stream consumers (model servers, routers)
that steer by directive bias::

    from producers.subscriber import BiasSubscriber

    with BiasSubscriber() as bias:
        bias.snapshot()                      # every directive's latest record
        while serving:
            bias.poll(1.0)                   # take updates as they are published
            grounding = bias.current("increase_grounding")  # decayed to now

It reads the topic from the beginning with no consumer-group state (every
subscriber sees every key), keeps the latest record per key, and forgets a key
on a tombstone.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Generic, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from pipeline.errors import StackError
from pipeline.settings import Settings, get_settings
from schemas.state_records import (
    BiasRecord,
    ReputationRecord,
    bias_key,
    decode_bias,
    decode_reputation,
)
from schemas.topics import Topics
from schemas.triage_records import TriageItem, decode_item

__all__ = ["BiasSubscriber", "CompactedTopicReader", "read_bias", "read_reputation", "read_triage"]

log = logging.getLogger(__name__)

R = TypeVar("R")


class CompactedTopicReader(Generic[R]):
    """The latest decoded value per key of a compacted topic, kept up to date by :meth:`poll`."""

    def __init__(
        self,
        settings: Settings,
        topic: str,
        decode: Callable[[bytes], R],
        on_update: Callable[[str, R | None], None] | None = None,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.decode = decode
        self.on_update = on_update
        self.values: dict[str, R] = {}
        self._consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": f"feedback-reader-{uuid.uuid4().hex[:12]}",  # never committed: no shared state
                "enable.auto.commit": False,
                "enable.partition.eof": False,
            }
        )
        self._partitions: list[TopicPartition] | None = None

    def _unreachable(self, exc: KafkaException) -> StackError:
        return StackError(f"cannot reach Kafka at {self.settings.kafka_bootstrap}: {exc.args[0].str()}")

    def _assign(self, timeout_s: float) -> list[TopicPartition]:
        """Assign every partition from the beginning (once); the topic's partitions."""
        if self._partitions is not None:
            return self._partitions
        try:
            meta = self._consumer.list_topics(self.topic, timeout=timeout_s)
        except KafkaException as exc:
            raise self._unreachable(exc) from None
        topic = meta.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise StackError(
                f"topic {self.topic} not found at {self.settings.kafka_bootstrap}; start the worker (or `feedback up`)"
            )
        partitions = [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in sorted(topic.partitions)]
        self._consumer.assign(partitions)
        self._partitions = partitions
        return partitions

    def apply(self, key: bytes | None, value: bytes | None, where: str = "") -> R | None:
        """Fold one message into :attr:`values`; returns the decoded record (None: removed or skipped)."""
        name = (key or b"").decode("utf-8", "replace")
        if value is None:
            self.values.pop(name, None)
            if self.on_update:
                self.on_update(name, None)
            return None
        try:
            record = self.decode(value)
        except ValueError as exc:
            # Coordinates and the error's kind only: never the payload.
            log.warning("state_record_skipped topic=%s %s reason=%s", self.topic, where, exc)
            return None
        self.values[name] = record
        if self.on_update:
            self.on_update(name, record)
        return record

    def poll(self, timeout_s: float = 1.0, max_messages: int = 1000) -> list[R]:
        """Apply what arrives within ``timeout_s``; returns the new records (tombstones remove keys)."""
        self._assign(max(timeout_s, 5.0))
        out: list[R] = []
        for msg in self._consumer.consume(max_messages, timeout=timeout_s):
            if msg.error():
                continue
            record = self.apply(msg.key(), msg.value(), f"partition={msg.partition()} offset={msg.offset()}")
            if record is not None:
                out.append(record)
        return out

    def snapshot(self, timeout_s: float = 10.0) -> dict[str, R]:
        """Read up to the end of every partition as of now (the high watermarks captured first);
        returns the latest value per key. Raises :class:`StackError` if Kafka or the topic is missing."""
        partitions = self._assign(timeout_s)
        try:
            ends = {
                tp.partition: self._consumer.get_watermark_offsets(
                    TopicPartition(tp.topic, tp.partition), timeout=timeout_s
                )[1]
                for tp in partitions
            }
        except KafkaException as exc:
            raise self._unreachable(exc) from None
        deadline = time.monotonic() + timeout_s

        def behind() -> bool:
            # Positions, not message offsets: a compacted log has gaps.
            try:
                positions = self._consumer.position([TopicPartition(self.topic, p) for p in ends])
            except KafkaException as exc:
                raise self._unreachable(exc) from None
            return any(ends[tp.partition] > 0 and tp.offset < ends[tp.partition] for tp in positions)

        while behind():
            if time.monotonic() > deadline:
                raise StackError(
                    f"timed out reading {self.topic} at {self.settings.kafka_bootstrap} after {timeout_s:g}s"
                )
            for msg in self._consumer.consume(1000, timeout=0.2):
                if not msg.error():
                    self.apply(msg.key(), msg.value(), f"partition={msg.partition()} offset={msg.offset()}")
        return dict(self.values)

    def close(self) -> None:
        self._consumer.close()


class BiasSubscriber:
    """Follows ``feedback.directive-bias.v1``; :meth:`current` gives a directive's bias decayed to now."""

    def __init__(self, settings: Settings | None = None, on_update: Callable[[BiasRecord], None] | None = None) -> None:
        settings = settings or get_settings()

        def notify(_key: str, record: BiasRecord | None) -> None:
            if record is not None and on_update is not None:
                on_update(record)

        self.reader = CompactedTopicReader(settings, Topics(settings.topic_prefix).directive_bias, decode_bias, notify)

    @property
    def records(self) -> dict[str, BiasRecord]:
        return dict(self.reader.values)

    def snapshot(self, timeout_s: float = 10.0) -> dict[str, BiasRecord]:
        return self.reader.snapshot(timeout_s)

    def poll(self, timeout_s: float = 1.0) -> list[BiasRecord]:
        return self.reader.poll(timeout_s)

    def current(self, directive: str, model_version: str | None = None, at: datetime | float | None = None) -> float:
        """The directive's bias at ``at`` (default now), decayed from its last update; 0.0 if unknown."""
        record = self.reader.values.get(bias_key(directive, model_version))
        if record is None:
            return 0.0
        return record.at(datetime.now().astimezone() if at is None else at)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> BiasSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_all(settings: Settings, topic: str, decode: Callable[[bytes], R], timeout_s: float) -> dict[str, R]:
    reader = CompactedTopicReader(settings, topic, decode)
    try:
        return reader.snapshot(timeout_s)
    finally:
        reader.close()


def read_bias(settings: Settings, timeout_s: float = 10.0) -> dict[str, BiasRecord]:
    """Every directive's latest bias record."""
    return _read_all(settings, Topics(settings.topic_prefix).directive_bias, decode_bias, timeout_s)


def read_reputation(settings: Settings, timeout_s: float = 10.0) -> dict[str, ReputationRecord]:
    """Every source's latest reputation record."""
    return _read_all(settings, Topics(settings.topic_prefix).reputation, decode_reputation, timeout_s)


def read_triage(settings: Settings, timeout_s: float = 10.0) -> dict[str, TriageItem]:
    """Every triage item's latest state, by triage id."""
    return _read_all(settings, Topics(settings.topic_prefix).triage, decode_item, timeout_s)
