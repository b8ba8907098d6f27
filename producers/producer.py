"""The thin producer: validate, hash, Avro-encode, publish.

Producers never redact or sample; the stream does that once for everyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from pipeline.errors import PoisonEvent, TransientError
from pipeline.settings import Settings, get_settings
from schemas.models import FeedbackEvent
from schemas.serde import AvroSerde
from schemas.topics import Topics

if TYPE_CHECKING:
    from schemas.bulk import Accepted

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
        # Events are reported to one callback, set as the producer's default: naming a callback
        # per produce() call costs ~0.8 us per message here (send_raw still names its own).
        conf["on_delivery"] = self._event_delivered
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
        value = self.serde.encode_model(event)  # the bytes of serde.encode(event.to_avro())
        self._produce(value, subject_key(event), None, timestamp_ms)

    def send_encoded(self, key: bytes, value: bytes) -> None:
        """Queue an event already validated and encoded (``schemas.bulk.Accepted``'s key and
        value); a delivery failure names it by the event id its bytes carry, as for :meth:`send`."""
        self._produce(value, key, None, None)

    def send_encoded_many(self, events: Iterable[Accepted]) -> int:
        """:meth:`send_encoded` for many ``schemas.bulk.Accepted`` events; delivery reports
        are served once at the end, or whenever librdkafka's queue is full. Returns how many
        were queued."""
        produce, topic = self._producer.produce, self.topic
        n = 0
        for _, _, key, value in events:
            while True:
                try:
                    produce(topic, value, key)  # reported to the default callback, _event_delivered
                    break
                except BufferError:  # local queue full: serve delivery reports to make room
                    self._producer.poll(0.05)
            n += 1
        self._producer.poll(0)
        return n

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

        self._produce(value, key, on_delivery, timestamp_ms)

    def _event_delivered(self, err: KafkaError | None, msg: Message) -> None:
        # One callback shared by every event (no closure per message for the garbage collector
        # to track while it is in flight); a failure names the event by the id its bytes carry.
        if err is None:
            self.delivered += 1
            return
        try:
            label = str(self.serde.decode(msg.value())["event_id"])
        except PoisonEvent:
            label = "unknown"
        with self._lock:
            self._failures.append((label, err.str()))

    def _produce(
        self,
        value: bytes,
        key: bytes | None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None,
        timestamp_ms: int | None,
    ) -> None:
        """Queue one message; ``on_delivery`` None reports it to the default callback."""
        extra: dict[str, Any] = {} if timestamp_ms is None else {"timestamp": timestamp_ms}
        if on_delivery is not None:
            extra["on_delivery"] = on_delivery
        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key, **extra)
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


def _settle(future: asyncio.Future[None], err: KafkaError | None) -> None:
    if future.done():
        return
    if err is None:
        future.set_result(None)
    else:
        future.set_exception(KafkaException(err))


class _LoopInbox:
    """Work handed from the Kafka poll thread to one event loop.

    Waking a loop from another thread writes to its self-pipe, a system call; delivery
    reports arrive in bursts (one per produce request), so a burst shares one wake-up.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, work: Callable[[], None]) -> None:
        """From any thread: run ``work`` on the loop soon."""
        self._items.append(work)
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # a closed loop: nothing waits on its futures any more
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            self._scheduled = False  # before draining: work put from now on schedules a new drain
        while self._items:
            self._items.popleft()()


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
        self._inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopInbox] = weakref.WeakKeyDictionary()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="gateway-kafka-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    def _inbox(self) -> _LoopInbox:
        loop = asyncio.get_running_loop()
        inbox = self._inboxes.get(loop)
        if inbox is None:
            inbox = self._inboxes[loop] = _LoopInbox(loop)
        return inbox

    def _produce(self, key: bytes, value: bytes, on_delivery: Callable[[KafkaError | None, Message], None]) -> None:
        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key, on_delivery=on_delivery)
                return
            except BufferError:
                time.sleep(0.01)  # local queue full: the poll thread is draining it

    def publish(self, key: bytes, value: bytes) -> asyncio.Future[None]:
        """Produce one message; the future resolves when Kafka acknowledges it, or fails with
        :class:`KafkaException` when Kafka refuses it or the publish timeout passes."""
        inbox = self._inbox()
        future: asyncio.Future[None] = inbox.loop.create_future()

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            inbox.put(partial(_settle, future, err))

        self._produce(key, value, delivered)
        return future

    def publish_many(self, messages: Sequence[tuple[bytes, bytes]]) -> asyncio.Future[list[KafkaError | None]]:
        """Produce every (key, value) now; the future resolves once Kafka has answered for all
        of them, with None (acknowledged) or the error per message, in order.

        One wake-up of the event loop for the whole batch instead of one per message.
        """
        inbox = self._inbox()
        future: asyncio.Future[list[KafkaError | None]] = inbox.loop.create_future()
        results: list[KafkaError | None] = [None] * len(messages)
        if not messages:
            future.set_result(results)
            return future
        pending = [len(messages)]
        lock = threading.Lock()

        def settle() -> None:
            if not future.done():
                future.set_result(results)

        def delivered(index: int, err: KafkaError | None, _msg: Message) -> None:
            results[index] = err
            with lock:  # delivery reports come from the poll thread, or from close()'s flush
                pending[0] -= 1
                last = pending[0] == 0
            if last:
                inbox.put(settle)

        for index, (key, value) in enumerate(messages):
            self._produce(key, value, partial(delivered, index))
        return future

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
