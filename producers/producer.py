"""The thin producer: validate, hash, Avro-encode, publish.

Producers never redact or sample; the stream does that once for everyone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from pipeline.errors import TransientError
from pipeline.settings import Settings, get_settings
from schemas.models import FeedbackEvent
from schemas.serde import AvroSerde
from schemas.topics import Topics

__all__ = ["AsyncProducer", "DeliveryError", "FeedbackProducer", "subject_key"]

log = logging.getLogger(__name__)


class DeliveryError(TransientError):
    """Kafka did not acknowledge some events. ``failures`` holds (event_id, reason) pairs."""

    def __init__(self, failures: list[tuple[str, str]]) -> None:
        self.failures = failures
        first_id, first_reason = failures[0]
        super().__init__(
            f"{len(failures)} event(s) not acknowledged by Kafka (first: {first_id}: {first_reason}); "
            "they were not published and can be sent again"
        )


def subject_key(event: FeedbackEvent) -> bytes:
    """The partition key: user_id, else client ip, else source — so a subject's
    rate-limit bucket and dedup state live in one partition."""
    return (event.user_id or event.client_ip or event.source).encode("utf-8")


class FeedbackProducer:
    """Publishes :class:`FeedbackEvent` to ``feedback.raw.v1`` with idempotence and acks=all.

    ``send`` is asynchronous; ``flush`` waits for every acknowledgement and raises
    :class:`DeliveryError` if any event was not delivered. Use as a context manager
    so ``close`` flushes.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        topic: str | None = None,
        serde: AvroSerde | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.topic = topic or Topics(self.settings.topic_prefix).raw
        self.serde = serde or AvroSerde.from_url(self.settings.schema_registry_url)
        conf: dict[str, Any] = {
            "bootstrap.servers": self.settings.kafka_bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
            "message.timeout.ms": 120_000,
            "client.id": "feedback-producer",
        }
        conf.update(config or {})
        self._producer = Producer(conf)
        self._lock = threading.Lock()
        self._failures: list[tuple[str, str]] = []
        self.delivered = 0

    # --- publishing ------------------------------------------------------
    def send(self, event: FeedbackEvent, *, timestamp_ms: int | None = None) -> None:
        """Queue one event; raises :class:`DeliveryError` only via :meth:`flush`.

        ``timestamp_ms`` sets the message time (default: now). The gate's rate limiter and
        time bounds use it as the arrival time, so replaying an archive with its original
        arrival times reproduces the original decisions.
        """
        value = self.serde.encode(event.to_avro())
        self.send_raw(value, key=subject_key(event), label=event.event_id, timestamp_ms=timestamp_ms)

    def send_many(self, events: Iterable[FeedbackEvent]) -> int:
        """Queue many events; returns how many were queued."""
        n = 0
        for event in events:
            self.send(event)
            n += 1
        return n

    def send_raw(
        self, value: bytes, key: bytes | None = None, label: str = "raw", *, timestamp_ms: int | None = None
    ) -> None:
        """Queue already-encoded bytes (used to replay or to test poison handling)."""

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                self.delivered += 1
                return
            with self._lock:
                self._failures.append((label, err.str()))

        while True:
            try:
                extra = {} if timestamp_ms is None else {"timestamp": timestamp_ms}
                self._producer.produce(self.topic, value=value, key=key, on_delivery=on_delivery, **extra)
                break
            except BufferError:
                # Local queue full: serve delivery reports to make room, then retry.
                self._producer.poll(0.05)
        self._producer.poll(0)

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for every queued event to be acknowledged.

        Raises :class:`DeliveryError` naming the events Kafka did not acknowledge,
        or :class:`TransientError` if some are still in flight after ``timeout``.
        """
        remaining = self._producer.flush(timeout)
        with self._lock:
            failures, self._failures = self._failures, []
        if failures:
            log.warning("delivery_failed count=%d", len(failures))
            raise DeliveryError(failures)
        if remaining:
            raise TransientError(
                f"{remaining} event(s) still unacknowledged after {timeout:.0f}s; is Kafka at "
                f"{self.settings.kafka_bootstrap} up?"
            )

    def close(self, timeout: float = 60.0) -> None:
        """Flush and release the producer."""
        self.flush(timeout)

    def __enter__(self) -> FeedbackProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncProducer:
    """A confluent-kafka producer for asyncio: :meth:`publish` returns a future resolved when
    Kafka acknowledges (or refuses) the message. Used by the gateway and the async client."""

    def __init__(self, settings: Settings, timeout_s: float, client_id: str = "feedback-async") -> None:
        self.settings = settings
        self.topic = Topics(settings.topic_prefix).raw
        self._producer = Producer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 2,
                "compression.type": "lz4",
                "message.timeout.ms": int(timeout_s * 1000),
                "client.id": client_id,
            }
        )
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="gateway-kafka-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    def publish(self, key: bytes, value: bytes) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            def settle() -> None:
                if future.done():
                    return
                if err is None:
                    future.set_result(None)
                else:
                    future.set_exception(KafkaException(err))

            loop.call_soon_threadsafe(settle)

        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key, on_delivery=delivered)
                return future
            except BufferError:
                time.sleep(0.01)  # local queue full: the poll thread is draining it

    def ready(self, timeout_s: float = 2.0) -> bool:
        try:
            self._producer.list_topics(self.topic, timeout=timeout_s)
            return True
        except KafkaException:
            return False

    def close(self) -> None:
        """Stop polling, deliver what is in flight (up to 10 s) and release the Kafka client."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._poller.join(5)
        self._producer.flush(10)
        del self._producer  # the librdkafka handle goes now, not at some later garbage collection
