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
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from pipeline.errors import PoisonEvent, TransientError
from pipeline.settings import Settings, get_settings
from schemas.envelope import is_envelope, pack_many, unpack
from schemas.models import FeedbackEvent
from schemas.serde import AvroSerde
from schemas.topics import Topics

if TYPE_CHECKING:
    from schemas.bulk import Accepted

__all__ = [
    "JAVA_PARTITIONER",
    "AsyncProducer",
    "DeliveryError",
    "FeedbackProducer",
    "PartitionMessage",
    "envelopes_by_partition",
    "partition_for",
    "subject_key",
]

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


#: Kafka's Java partitioner (murmur2), for keys the stream re-keys by too: ``interaction_id``
#: on feedback.interactions.v1 lands in the partition of its feedback on feedback.enrich.v1.
JAVA_PARTITIONER: Mapping[str, str] = {"partitioner": "murmur2_random"}


def partition_for(key: bytes, partitions: int) -> int:
    """The partition librdkafka's default partitioner (``consistent_random``) gives a message
    with the non-empty ``key``: CRC-32 of the key modulo the partition count. (An empty key it
    places at random; here it maps to CRC-32 of nothing, partition 0.)"""
    return zlib.crc32(key) % partitions


class PartitionMessage(NamedTuple):
    """One message of :func:`envelopes_by_partition`: ``value`` is an envelope, or the event's
    own value when it carries one event; ``indexes`` are the input positions of its events."""

    partition: int
    key: bytes  # the first event's key
    value: bytes
    indexes: list[int]


def envelopes_by_partition(items: Sequence[Sequence[bytes]], partitions: int) -> list[PartitionMessage]:
    """The messages that carry the events ``items``, each a (key, value) pair or a tuple that
    ends with them (``schemas.bulk.Accepted``): each key's events go to :func:`partition_for`
    that key, packed into envelopes (``schemas.envelope.pack_many``, so each within its
    limits), in input order within a partition; partitions in the order they first appear.

    An envelope of one event saves the worker nothing, so an event alone in its envelope
    travels as its own single-event message (to the same partition).
    """
    crc = zlib.crc32
    groups: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        partition = crc(item[-2]) % partitions
        group = groups.get(partition)
        if group is None:
            groups[partition] = [index]
        else:
            group.append(index)
    out: list[PartitionMessage] = []
    for partition, indexes in groups.items():
        start = 0
        for envelope, count in pack_many([items[i][-1] for i in indexes]):
            carried = indexes[start : start + count]
            first = items[carried[0]]
            out.append(PartitionMessage(partition, first[-2], first[-1] if count == 1 else envelope, carried))
            start += count
    return out


_CRC32_PARTITIONERS = ("consistent_random", "consistent")  # librdkafka's default, and the same for non-empty keys


class _PartitionCount:
    """The partition count of the producer's topic, from the producer's own metadata: what its
    partitioner divides by. Cached for :attr:`REFRESH_S`, refreshed in the background (a
    failed lookup keeps the last count: partitions are only ever added) and never waited for,
    except once, on first use, by a caller that asks to (at most :attr:`FIRST_WAIT_S`; a broker
    that does not answer by then leaves the count to a background lookup).
    """

    REFRESH_S = 60.0  # after a partition increase, envelopes follow the new count within this
    RETRY_S = 5.0  # after a failed lookup
    TIMEOUT_S = 5.0  # of a background lookup
    FIRST_WAIT_S = 1.0

    def __init__(self, producer: Producer, topic: str) -> None:
        self._producer: Producer | None = producer
        self._topic = topic
        self._count: int | None = None
        self._next = 0.0  # monotonic time of the next lookup; 0: never tried
        self._lock = threading.Lock()
        self._busy = False

    def get(self, *, wait: bool = False) -> int | None:
        """The partition count, or None while it is not known (send single-event messages)."""
        if time.monotonic() >= self._next:
            with self._lock:
                if self._busy or time.monotonic() < self._next:
                    return self._count
                first = self._next == 0.0
                self._busy = True
            if wait and first:
                self._lookup(self.FIRST_WAIT_S)
            else:
                threading.Thread(target=self._lookup, name="feedback-partition-count", daemon=True).start()
        return self._count

    def _lookup(self, timeout: float | None = None) -> None:
        count: int | None = None
        try:
            producer = self._producer
            if producer is not None:
                metadata = producer.list_topics(self._topic, timeout=timeout or self.TIMEOUT_S)
                topic = metadata.topics.get(self._topic)
                if topic is not None and topic.error is None and topic.partitions:
                    count = len(topic.partitions)
                else:
                    log.info("partition_count_unknown topic=%s error=%s", self._topic, topic and topic.error)
        except KafkaException as exc:
            log.info("partition_count_unknown topic=%s error=%s", self._topic, exc.args[0] if exc.args else exc)
        finally:
            with self._lock:
                if count is not None:
                    self._count = count
                if self._producer is not None:  # not closed meanwhile
                    self._next = time.monotonic() + (self.REFRESH_S if count is not None else self.RETRY_S)
                self._busy = False

    def close(self) -> None:
        """Let go of the producer (no more lookups)."""
        self._producer = None
        self._next = float("inf")


def _event_ids(value: bytes | None, serde: AvroSerde) -> list[str]:
    """The ids of the events a message value carries (one, or an envelope's), for failures;
    "unknown" for bytes that do not decode."""
    try:
        values = unpack(value) if is_envelope(value) else [value]
    except PoisonEvent:
        return ["unknown"]
    ids = []
    for item in values:
        try:
            ids.append(str(serde.decode(item)["event_id"]))
        except Exception:  # a delivery report must never raise; the id is only a label
            ids.append("unknown")
    return ids


class FeedbackProducer:
    """Publishes :class:`FeedbackEvent` to ``feedback.raw.v1`` with idempotence and acks=all.

    ``send`` is asynchronous; ``flush`` waits for every acknowledgement and raises
    :class:`DeliveryError` if any event was not delivered. Use as a context manager
    so ``close`` flushes. :meth:`send_encoded_many` publishes envelopes (one message per
    partition and up to ``schemas.envelope.MAX_EVENTS`` events) unless ``settings.envelopes``
    is off; ``delivered`` counts events, not messages.
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
        # Envelopes go to the partition librdkafka's partitioner would give their events' keys;
        # with another partitioner configured, that is not known here: single-event messages.
        self._partitions = (
            _PartitionCount(self._producer, self.topic)
            if self.settings.envelopes and conf.get("partitioner", "consistent_random") in _CRC32_PARTITIONERS
            else None
        )

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
        events were queued.

        The events go in envelopes, one message per partition (and per
        ``schemas.envelope.MAX_EVENTS``), each to the partition its events' keys map to
        (:func:`envelopes_by_partition`), unless ``settings.envelopes`` is off or the
        topic's partition count is not known (yet): then one message per event. A delivery
        failure names every event of the message.
        """
        partitions = self._partitions.get(wait=True) if self._partitions is not None else None
        if partitions is None:
            return self._send_singles(events)
        items = events if isinstance(events, list) else list(events)
        producer, topic = self._producer, self.topic
        for partition, key, value, indexes in envelopes_by_partition(items, partitions):
            count = len(indexes)
            while True:
                try:
                    if count == 1:  # a lone event travels as itself, to the default callback
                        producer.produce(topic, value, key, partition=partition)
                    else:
                        producer.produce(
                            topic, value, key, partition=partition, on_delivery=partial(self._envelope_delivered, count)
                        )
                    break
                except BufferError:  # local queue full: serve delivery reports to make room
                    producer.poll(0.05)
        producer.poll(0)
        return len(items)

    def _send_singles(self, events: Iterable[Accepted]) -> int:
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
        # to track while it is in flight); a failure names the event by the id its bytes carry
        # (every event's, for an envelope).
        if err is None:
            self.delivered += 1
            return
        self._failed(msg.value(), err)

    def _envelope_delivered(self, count: int, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += count
            return
        self._failed(msg.value(), err)

    def _failed(self, value: bytes | None, err: KafkaError) -> None:
        reason = err.str()
        labels = _event_ids(value, self.serde)
        with self._lock:
            self._failures.extend((label, reason) for label in labels)

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
    Kafka acknowledges (or refuses) the message. Used by the gateway and the async client.

    :meth:`publish_many` publishes envelopes unless ``settings.envelopes`` is off; the
    topic's partition count they need is looked up in the background from the start, and
    until it is known the messages go one per event (the event loop never waits for it).
    """

    def __init__(
        self,
        settings: Settings,
        timeout_s: float,
        client_id: str = "feedback-async",
        *,
        topic: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        raw = Topics(settings.topic_prefix).raw
        self.topic = topic or raw
        self._producer = Producer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 2,
                "compression.type": "lz4",
                "message.timeout.ms": int(timeout_s * 1000),
                "client.id": client_id,
                **(config or {}),
            }
        )
        self._inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopInbox] = weakref.WeakKeyDictionary()
        # Envelopes are a raw-topic form only (publish_many); any other topic gets one message per value.
        self._partitions = (
            _PartitionCount(self._producer, self.topic) if settings.envelopes and self.topic == raw else None
        )
        if self._partitions is not None:
            self._partitions.get()  # starts the lookup, so the first batch likely has the count
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

    def _produce(
        self,
        key: bytes,
        value: bytes,
        on_delivery: Callable[[KafkaError | None, Message], None],
        partition: int | None = None,
    ) -> None:
        extra: dict[str, Any] = {} if partition is None else {"partition": partition}
        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key, on_delivery=on_delivery, **extra)
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
        """Produce every (key, value) event now; the future resolves once Kafka has answered for
        all of them, with None (acknowledged) or the error per event, in input order.

        The events go in envelopes, one message per partition (:func:`envelopes_by_partition`),
        each event answered with its envelope's result; one message per event while the
        partition count is not known or with ``settings.envelopes`` off. One wake-up of the
        event loop for the whole batch instead of one per message.
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

        def delivered_all(indexes: list[int], err: KafkaError | None, _msg: Message) -> None:
            for index in indexes:
                results[index] = err
            with lock:
                pending[0] -= len(indexes)
                last = pending[0] == 0
            if last:
                inbox.put(settle)

        partitions = self._partitions.get() if self._partitions is not None else None
        if partitions is None:
            for index, (key, value) in enumerate(messages):
                self._produce(key, value, partial(delivered, index))
        else:
            for partition, key, value, indexes in envelopes_by_partition(messages, partitions):
                self._produce(key, value, partial(delivered_all, indexes), partition)
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
        if self._partitions is not None:
            self._partitions.close()  # its reference to the handle too
        del self._producer  # the librdkafka handle goes now, not at some later garbage collection
