"""Where the worker's agents write: one confluent-kafka producer, flushed once per batch.

Faust's own send path (``Topic.send`` → its buffer → aiokafka) costs tens of
microseconds per message in Python. The agents instead queue every message of a
batch (outputs and table changelog records alike) on one librdkafka producer and
wait for all of them with one :meth:`KafkaOutputs.flush` before Faust may
acknowledge the batch's offsets. The flush never yields to the event loop, so a
stopping worker can never acknowledge a batch whose outputs are not durable. A
message Kafka refuses for good (too large for its topic, say) makes the flush raise
:class:`OutputRefused`: the batch fails as a whole and the worker stops unacknowledged
(``stream_processors.app``), instead of waiting for it forever.

Keys are partitioned with Kafka's Java partitioner (murmur2), as Faust and the
project's other Java-compatible producers do, so co-partitioned topics stay
co-partitioned; :func:`partition_for` gives the same partition in Python for
messages the agents group by partition themselves (envelopes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka.partitioner import murmur2 as _murmur2_py
from confluent_kafka import KafkaError, Message, Producer

from pipeline.errors import PipelineError

__all__ = ["REFUSED_FOR_GOOD", "CapturedOutputs", "KafkaOutputs", "OutputRefused", "Outputs", "partition_for"]

log = logging.getLogger(__name__)

Delivered = Callable[[str, int, int], None]  # topic, partition, offset

#: Delivery errors that refuse the message itself, the same way each time it is sent: queued
#: again it would be refused again, and the flush would wait forever.
REFUSED_FOR_GOOD: frozenset[int] = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,  # over the topic's max.message.bytes
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    }
)


class OutputRefused(PipelineError):
    """Kafka refused a message of the batch for good: the batch must not be acknowledged."""


try:  # the same function in C (schemas/_speedups.c): ~0.07 us a key instead of ~3 us
    from schemas._speedups import murmur2
except ImportError:  # not built (no C compiler at install): aiokafka's pure-Python one
    murmur2 = _murmur2_py


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's Java partitioner picks for ``key`` among ``partitions``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class Outputs(Protocol):
    """What the agents write to; :class:`KafkaOutputs` in the worker, :class:`CapturedOutputs` in tests."""

    def produce(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None,
        on_delivered: Delivered | None = None,
    ) -> None: ...  # fmt: skip

    def flush(self) -> None: ...

    def partitions(self, topic: str) -> int: ...


class KafkaOutputs:
    """The worker's producer: idempotent, acks=all, murmur2, lz4.

    A message Kafka refuses after librdkafka's own retries is queued again (same topic,
    partition, key and value) and the flush goes on waiting: nothing a batch produced is
    dropped, and the batch is not acknowledged until all of it is delivered. A message
    refused for good (:data:`REFUSED_FOR_GOOD`) makes :meth:`flush` raise :class:`OutputRefused`.

    Every message reports to one delivery callback set in the producer's configuration
    (naming a callback per ``produce()`` costs about a microsecond); ``on_delivered`` hooks
    are kept per topic (the tables' changelogs use them).
    """

    def __init__(self, bootstrap: str, *, client_id: str = "feedback-worker", config: dict[str, Any] | None = None):
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "client.id": client_id,
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
            "linger.ms": 5,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
            "message.timeout.ms": 60_000,
            "on_delivery": self._report,
        }
        conf.update(config or {})
        self._producer = Producer(conf)
        self._failed: list[tuple[str, int, bytes | None, bytes | None]] = []
        self._refused: list[tuple[str, str]] = []  # (topic, error name): no key, no value
        self._hooks: dict[str, Delivered] = {}
        self._partitions: dict[str, int] = {}

    def _report(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            if err.code() in REFUSED_FOR_GOOD:
                self._refused.append((msg.topic(), err.name()))
            else:
                self._failed.append((msg.topic(), msg.partition(), msg.key(), msg.value()))
            return
        hook = self._hooks.get(msg.topic())
        if hook is not None:
            hook(msg.topic(), msg.partition(), msg.offset())

    def produce(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None,
        on_delivered: Delivered | None = None,
    ) -> None:  # fmt: skip
        if on_delivered is not None:
            self._hooks[topic] = on_delivered  # one hook per topic: a table's changelog
        produce = self._producer.produce
        while True:
            try:
                if partition is None:
                    produce(topic, value, key)
                else:
                    produce(topic, value, key, partition)
                return
            except BufferError:  # the local queue is full: let deliveries make room
                self._producer.poll(0.05)

    def poll(self) -> None:
        """Serve delivery reports without waiting (timers call this between batches)."""
        self._producer.poll(0)

    def flush(self) -> None:
        """Wait until everything produced so far is acknowledged, re-queueing what Kafka refused.

        Raises :class:`OutputRefused` (naming the topic and Kafka's error) if a message was
        refused for good: the caller must not acknowledge the batch.
        """
        started = time.monotonic()
        warned = False
        while True:
            remaining = self._producer.flush(1.0)
            if self._refused:
                refused, self._refused = self._refused, []
                topic, error = refused[0]
                raise OutputRefused(f"Kafka refused {len(refused)} message(s) for good, first for {topic}: {error}")
            if self._failed:
                failed, self._failed = self._failed, []
                log.warning("output_redelivery count=%d", len(failed))
                for topic, partition, key, value in failed:
                    self.produce(topic, key, value, partition if partition >= 0 else None)
                continue
            if remaining == 0:
                return
            if not warned and time.monotonic() - started > 10.0:
                log.warning("output_flush_waiting remaining=%d (is Kafka reachable?)", remaining)
                warned = True

    def partitions(self, topic: str) -> int:
        """The topic's partition count, from the cluster's metadata (cached)."""
        count = self._partitions.get(topic)
        if count is None:
            meta = self._producer.list_topics(topic, timeout=30.0).topics[topic]
            if meta.error is not None or not meta.partitions:
                raise RuntimeError(f"topic {topic}: no partitions in the metadata ({meta.error})")
            count = self._partitions[topic] = len(meta.partitions)
        return count

    def close(self) -> None:
        self.flush()


@dataclass
class CapturedOutputs:
    """Outputs kept in memory, per topic, in produce order (unit tests); offsets count per partition."""

    partition_count: int = 1
    sent: dict[str, list[tuple[bytes | None, bytes | None, int | None]]] = field(default_factory=dict)
    _next: dict[tuple[str, int], int] = field(default_factory=dict)
    _pending: list[tuple[Delivered, str, int, int]] = field(default_factory=list)

    def produce(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None,
        on_delivered: Delivered | None = None,
    ) -> None:  # fmt: skip
        self.sent.setdefault(topic, []).append((key, value, partition))
        if partition is not None:
            p = partition
        else:
            p = partition_for(key, self.partition_count) if key and self.partition_count > 1 else 0
        offset = self._next.get((topic, p), 0)
        self._next[(topic, p)] = offset + 1
        if on_delivered is not None:
            self._pending.append((on_delivered, topic, p, offset))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for on_delivered, topic, p, offset in pending:
            on_delivered(topic, p, offset)

    def poll(self) -> None:
        pass

    def partitions(self, topic: str) -> int:
        return self.partition_count
