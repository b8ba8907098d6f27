"""One batching base for every sink: collect, flush on size or time, commit after the flush.

Offsets are committed only after :meth:`BatchingSink.flush` returns, i.e. after the
batch is durable. A :class:`TransientError` from ``flush`` pauses consumption and
retries the same batch with backoff, so nothing is lost while a store is down.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from pipeline.errors import TransientError
from pipeline.settings import Settings

__all__ = ["BatchingSink"]

log = logging.getLogger(__name__)


class BatchingSink(ABC):
    """Consumes ``topic`` in batches of at most ``batch_rows`` or ``batch_ms``."""

    name = "sink"

    def __init__(
        self,
        settings: Settings,
        topic: str,
        group_id: str,
        *,
        batch_rows: int | None = None,
        batch_ms: int | None = None,
        consumer_config: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.batch_rows = batch_rows or settings.sink_batch_rows
        self.batch_ms = batch_ms or settings.sink_batch_ms
        conf: dict[str, Any] = {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
            "client.id": f"feedback-{self.name}",
            "session.timeout.ms": int(settings.kafka_session_timeout_s * 1000),
        }
        conf.update(consumer_config or {})
        self._consumer = Consumer(conf)
        self._stop = threading.Event()
        self.rows_written = 0
        self.batches = 0

    @abstractmethod
    def flush(self, messages: Sequence[Message]) -> None:
        """Make ``messages`` durable. Raise :class:`TransientError` to have the batch retried."""

    def stop(self) -> None:
        self._stop.set()

    def run(self, idle_exit_s: float | None = None) -> None:
        """Consume until :meth:`stop` (or ``idle_exit_s`` without messages, for one-shot runs)."""
        self._consumer.subscribe([self.topic])
        last_message = time.monotonic()
        try:
            while not self._stop.is_set():
                batch = self._collect()
                if not batch:
                    if idle_exit_s is not None and time.monotonic() - last_message > idle_exit_s:
                        return
                    continue
                last_message = time.monotonic()
                self._flush_with_retry(batch)
                self._commit(batch)
        finally:
            self._consumer.close()

    def _collect(self) -> list[Message]:
        batch: list[Message] = []
        deadline = time.monotonic() + self.batch_ms / 1000
        while len(batch) < self.batch_rows and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for msg in self._consumer.consume(
                num_messages=min(10_000, self.batch_rows - len(batch)), timeout=remaining
            ):
                err = msg.error()
                if err is None:
                    batch.append(msg)
                elif err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume_error sink=%s code=%s", self.name, err.name())
        return batch

    def _flush_with_retry(self, batch: list[Message]) -> None:
        delay = 0.5
        while True:
            try:
                self.flush(batch)
                self.rows_written += len(batch)
                self.batches += 1
                return
            except TransientError as exc:
                if self._stop.is_set():
                    raise
                log.warning("flush_retry sink=%s rows=%d retry_in_s=%.1f error=%s", self.name, len(batch), delay, exc)
                # Keep the group membership alive while the store is down.
                assigned = self._consumer.assignment()
                self._consumer.pause(assigned)
                self._stop.wait(delay)
                self._consumer.poll(0)
                self._consumer.resume(assigned)
                delay = min(delay * 2, 30.0)

    def _commit(self, batch: list[Message]) -> None:
        last: dict[tuple[str, int], int] = {}
        for msg in batch:
            key = (msg.topic(), msg.partition())
            last[key] = max(last.get(key, -1), msg.offset())
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
        self._consumer.commit(offsets=offsets, asynchronous=False)
