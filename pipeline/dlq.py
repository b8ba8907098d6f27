"""Dead letters: reading ``feedback.dlq.v1`` and sending letters back through the gate.

The DLQ topic is the source of truth here, not ClickHouse ``dlq_events``: only the topic
holds each letter's original bytes and key (what a replay re-publishes), it needs no sink
to be running, and what it holds is exactly what can still be replayed (14 days). The
table keeps metadata for longer (``FEEDBACK_CLICKHOUSE_RETENTION_DAYS``) for analysis.

A replay never loops: it reads each DLQ partition only up to the end it had when the replay
started, and only letters dead-lettered before that moment. A replayed message that fails
again becomes a new letter after that end, which this replay does not see. Running a replay
twice is safe because the gate drops the second copy of an event it already accepted (its
dedup key, within ``FEEDBACK_DEDUP_WINDOW_S``).

Nothing here logs or returns payload bytes, keys or personal data except through
:attr:`Letter.raw` and :attr:`Letter.key`, which only :func:`replay` uses.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.errors import PoisonEvent, StackError
from pipeline.settings import Settings
from schemas.serde import AvroSerde
from schemas.topics import Topics
from stream_processors.redact import redact_text

__all__ = [
    "DlqRead",
    "Letter",
    "ReplayPlan",
    "erased_filter",
    "letter_subjects",
    "newest_first",
    "plan_replay",
    "read_erasures",
    "read_letters",
    "replay",
    "select_letters",
]

log = logging.getLogger(__name__)

#: Message timestamps may run ahead of the letter's own ``ts`` (another host's clock, or
#: LogAppendTime): start reading this much before ``--since`` and filter on ``ts`` exactly.
_CLOCK_SLACK = timedelta(minutes=10)
_POLL_S = 1.0
_QUIET_S = 30.0  # no message for this long while data is still expected: give up


def _quiet_logger() -> logging.Logger:
    # librdkafka logs every failed connection attempt; the caller reports one line instead.
    logger = logging.getLogger("pipeline.dlq.kafka")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger


@dataclass(frozen=True)
class Letter:
    """One dead letter: where it sits in the DLQ, what failed, and where the message came from.

    ``key`` and ``raw`` are the original message's key and bytes; they may carry personal
    data and are never printed (:meth:`to_json` leaves them out).
    """

    dlq_partition: int
    dlq_offset: int
    ts: datetime
    stage: str
    error: str = field(repr=False)  # payload-free by contract; printed only through safe_error
    topic: str
    partition: int
    offset: int
    key: bytes | None = field(repr=False)
    raw: bytes = field(repr=False)

    @property
    def size(self) -> int:
        """The original message's size in bytes."""
        return len(self.raw)

    @property
    def safe_error(self) -> str:
        """The error with any PII pattern replaced (errors are payload-free by contract; this
        is a second line of defence before anything is printed)."""
        return redact_text(" ".join(self.error.split()))

    def to_json(self) -> dict[str, Any]:
        """The letter's metadata for ``--json``: never the key nor the bytes."""
        return {
            "ts": self.ts.astimezone(UTC).isoformat(),
            "stage": self.stage,
            "error": self.safe_error,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "size": self.size,
            "dlq_partition": self.dlq_partition,
            "dlq_offset": self.dlq_offset,
        }


@dataclass(frozen=True)
class DlqRead:
    """What :func:`read_letters` found: the letters, how many could not be decoded, and the
    end offset of each DLQ partition when reading started (letters at or after it were not read)."""

    letters: list[Letter]
    unreadable: int
    ends: dict[int, int]


def letter_from_record(record: dict[str, Any], dlq_partition: int, dlq_offset: int) -> Letter:
    """A :class:`Letter` from a decoded ``dead_letter_v1`` record."""
    ts: datetime = record["ts"]
    return Letter(
        dlq_partition=dlq_partition,
        dlq_offset=dlq_offset,
        ts=ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC),
        stage=str(record["stage"]),
        error=str(record["error"]),
        topic=str(record["topic"]),
        partition=int(record["partition"]),
        offset=int(record["offset"]),
        key=record.get("key"),
        raw=bytes(record.get("raw") or b""),
    )


def select_letters(
    letters: Iterable[Letter],
    *,
    since: datetime | None = None,
    before: datetime | None = None,
    stages: Sequence[str] = (),
) -> list[Letter]:
    """Letters dead-lettered at or after ``since`` and strictly before ``before``, of one of
    ``stages`` (all when empty), in DLQ order."""
    wanted = set(stages)
    return [
        letter
        for letter in letters
        if (since is None or letter.ts >= since)
        and (before is None or letter.ts < before)
        and (not wanted or letter.stage in wanted)
    ]


def newest_first(letters: Iterable[Letter], limit: int | None = None) -> list[Letter]:
    """Letters by ``ts`` descending (ties: the later DLQ position first), at most ``limit``."""
    ordered = sorted(letters, key=lambda lt: (lt.ts, lt.dlq_partition, lt.dlq_offset), reverse=True)
    return ordered if limit is None else ordered[:limit]


@dataclass(frozen=True)
class ReplayPlan:
    """What a replay sends, and what it leaves out with the reason for each group."""

    send: list[Letter]
    skipped: Counter[str]
    duplicates: int  # letters of a message already in ``send`` (the same bytes, key and origin)

    def busiest_key_count(self) -> int:
        """How many letters to send share the most common key (one subject's rate limit)."""
        counts = Counter(letter.key for letter in self.send)
        return max(counts.values(), default=0)


ERASED = "events of a user erased with `feedback forget`"


def letter_subjects(letter: Letter, serde: AvroSerde | None = None) -> set[str]:
    """The user ids (and the message key, the subject) a letter's raw bytes carry: a single event
    or every item of an envelope. Bytes that do not decode give only the key."""
    from schemas.envelope import is_envelope, unpack

    found = {letter.key.decode(errors="replace")} if letter.key else set()
    try:
        bodies = unpack(letter.raw) if is_envelope(letter.raw) else [letter.raw]
        serde = serde or AvroSerde()
        for body in bodies:
            user_id = serde.decode(body).get("user_id")
            if user_id:
                found.add(str(user_id))
    except (PoisonEvent, KeyError, TypeError, ValueError):
        pass  # poison: only its key can tell whose it is
    return found


def erased_filter(erased: set[str], key: bytes) -> Callable[[Letter], bool]:
    """Whether a letter holds an event of a user in ``erased`` (keyed pseudonyms read from
    ``feedback.erasures.v1``; ``key``: the worker's hash key, see ``stream_processors.config``)."""
    from stream_processors.redact import pseudonymize

    serde = AvroSerde()  # one for every letter

    def is_erased(letter: Letter) -> bool:
        return any(s in erased or pseudonymize(s, key) in erased for s in letter_subjects(letter, serde))

    return is_erased


def plan_replay(
    letters: Iterable[Letter], raw_topic: str, erased: Callable[[Letter], bool] | None = None
) -> ReplayPlan:
    """Which letters go back to ``raw_topic`` (the gate's input), oldest first.

    Only letters whose origin is ``raw_topic`` can be replayed: a letter from another
    topic (an outcome, an interaction, a clean event a sink refused) would not be read by
    the gate, and re-publishing it to its own topic would repeat state updates. Letters
    without bytes (an empty message) have nothing to replay. A letter holding an event of a
    user erased since (``erased``, see :func:`erased_filter`) is never sent again. The same
    message dead-lettered twice (an agent retried after a crash) is sent once.
    """
    send: list[Letter] = []
    skipped: Counter[str] = Counter()
    seen: set[tuple[str, int, bytes | None, bytes]] = set()
    duplicates = 0
    for letter in sorted(letters, key=lambda lt: (lt.ts, lt.dlq_partition, lt.dlq_offset)):
        if letter.topic != raw_topic:
            reason = f"from {letter.topic} (stage {letter.stage}): only letters from {raw_topic} go through the gate"
            skipped[reason] += 1
            continue
        if not letter.raw:
            skipped["an empty message: no bytes to replay"] += 1
            continue
        if erased is not None and erased(letter):
            skipped[ERASED] += 1
            continue
        identity = (letter.topic, letter.partition, letter.key, letter.raw)
        if identity in seen:
            duplicates += 1
            continue
        seen.add(identity)
        send.append(letter)
    return ReplayPlan(send, skipped, duplicates)


# --- Kafka ------------------------------------------------------------------------------------------
def _consumer(settings: Settings) -> Any:
    from confluent_kafka import Consumer

    return Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            # Assigned partitions, nothing committed: reading the DLQ changes no group's position.
            "group.id": f"feedback-dlq-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "logger": _quiet_logger(),
        }
    )


def read_letters(
    settings: Settings,
    since: datetime | None = None,
    *,
    timeout: float = 10.0,
    progress: Callable[[int, int], None] | None = None,
) -> DlqRead:
    """Every letter in the DLQ topic from ``since`` (by message time, with some slack; filter
    with :func:`select_letters`) up to each partition's end when reading started.

    ``progress(done, total)`` is called as messages are read. Raises :class:`StackError`
    (one line naming the servers) when Kafka cannot be reached or the topic does not exist.
    """
    from confluent_kafka import KafkaException, TopicPartition

    topic = Topics(settings.topic_prefix).dlq
    where = settings.kafka_bootstrap
    consumer = _consumer(settings)
    try:
        try:
            meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        except KafkaException as exc:
            raise StackError(
                f"cannot reach Kafka at {where} ({exc.args[0].str()}); start it with `feedback up` "
                "or set FEEDBACK_BOOTSTRAP_SERVERS"
            ) from None
        if meta is None or meta.error is not None or not meta.partitions:
            raise StackError(f"topic {topic} does not exist at {where}; create the topics with `feedback topics`")
        partitions = sorted(meta.partitions)
        try:
            bounds = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout) for p in partitions}
            starts = {p: low for p, (low, _) in bounds.items()}
            if since is not None:
                at_ms = int((since - _CLOCK_SLACK).timestamp() * 1000)
                found = consumer.offsets_for_times([TopicPartition(topic, p, at_ms) for p in partitions], timeout)
                for tp in found:
                    # -1: no message at or after that time; start at the end (read nothing).
                    low, high = bounds[tp.partition]
                    starts[tp.partition] = high if tp.offset < 0 else max(tp.offset, low)
        except KafkaException as exc:
            raise StackError(f"cannot read {topic} at {where}: {exc.args[0].str()}") from None
        ends = {p: high for p, (_, high) in bounds.items()}
        todo = {p: (starts[p], ends[p]) for p in partitions if starts[p] < ends[p]}
        total = sum(end - start for start, end in todo.values())
        letters, unreadable = _consume(consumer, topic, todo, total, progress)
        return DlqRead(letters, unreadable, ends)
    finally:
        consumer.close()


def _consume(
    consumer: Any,
    topic: str,
    todo: dict[int, tuple[int, int]],
    total: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[list[Letter], int]:
    import time

    from confluent_kafka import TopicPartition

    if not todo:
        if progress:
            progress(0, 0)
        return [], 0
    serde = AvroSerde("dead_letter_v1")
    consumer.assign([TopicPartition(topic, p, start) for p, (start, _) in todo.items()])
    letters: list[Letter] = []
    unreadable, done = 0, 0
    remaining = set(todo)
    last_message = time.monotonic()
    while remaining:
        batch = consumer.consume(500, timeout=_POLL_S)
        if not batch:
            # Offsets without a message (transaction markers) never arrive: the position says we are past them.
            for tp in consumer.position([TopicPartition(topic, p) for p in remaining]):
                if tp.offset >= todo[tp.partition][1]:
                    remaining.discard(tp.partition)
            if remaining and time.monotonic() - last_message > _QUIET_S:
                raise StackError(f"timed out reading {topic}: no message for {_QUIET_S:.0f}s before its end")
        for msg in batch:
            if msg.error():
                continue
            last_message = time.monotonic()
            partition, offset = msg.partition(), msg.offset()
            end = todo[partition][1]
            if offset >= end:  # written after reading started: not ours to read
                remaining.discard(partition)
                continue
            done += 1
            try:
                letters.append(letter_from_record(serde.decode(msg.value()), partition, offset))
            except (PoisonEvent, KeyError, TypeError, ValueError) as exc:
                unreadable += 1
                log.warning("dlq_letter_unreadable partition=%d offset=%d reason=%s", partition, offset,
                            exc.reason if isinstance(exc, PoisonEvent) else type(exc).__name__)  # fmt: skip
            if offset >= end - 1:
                remaining.discard(partition)
        if progress:
            progress(done, total)
    return letters, unreadable


def read_erasures(settings: Settings, *, timeout: float = 10.0) -> set[str]:
    """The keys of every erasure record on ``feedback.erasures.v1`` (keyed pseudonyms); empty
    when the topic does not exist yet (nobody was ever erased)."""
    import time

    from confluent_kafka import KafkaException, TopicPartition

    topic = Topics(settings.topic_prefix).erasures
    consumer = _consumer(settings)
    try:
        try:
            meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                return set()
            bounds = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
                      for p in meta.partitions}  # fmt: skip
        except KafkaException as exc:
            raise StackError(f"cannot read {topic} at {settings.kafka_bootstrap}: {exc.args[0].str()}") from None
        todo = {p: high for p, (low, high) in bounds.items() if low < high}
        consumer.assign([TopicPartition(topic, p, bounds[p][0]) for p in todo])
        keys: dict[bytes, bool] = {}
        deadline = time.monotonic() + max(timeout, _QUIET_S)
        while todo:
            if time.monotonic() > deadline:
                raise StackError(f"timed out reading {topic}: erasures unknown, so nothing is replayed")
            for msg in consumer.consume(500, timeout=_POLL_S):
                if msg.error():
                    continue
                keys[msg.key() or b""] = msg.value() is not None
                if msg.offset() >= todo.get(msg.partition(), 0) - 1:
                    todo.pop(msg.partition(), None)
            for tp in consumer.position([TopicPartition(topic, p) for p in list(todo)]):
                if tp.offset >= todo.get(tp.partition, 0):
                    todo.pop(tp.partition, None)
        return {k.decode(errors="replace") for k, present in keys.items() if present}
    finally:
        consumer.close()


def replay(settings: Settings, letters: Sequence[Letter], *, timeout: float = 30.0) -> int:
    """Re-publish each letter's original bytes with its original key to the partition it came
    from (same key, same partition: the gate's dedup keys and rate limits live there).

    Returns how many were acknowledged. Raises :class:`StackError` when Kafka cannot be
    reached or does not acknowledge them all.
    """
    from confluent_kafka import KafkaException, Producer

    if not letters:
        return 0
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "message.timeout.ms": int(timeout * 1000),
            "logger": _quiet_logger(),
        }
    )
    failed: list[str] = []
    acked = 0

    def delivered(err: Any, _msg: Any) -> None:
        nonlocal acked
        if err is None:
            acked += 1
        else:
            failed.append(err.str())

    try:
        producer.list_topics(letters[0].topic, timeout=min(timeout, 10.0))
    except KafkaException as exc:
        raise StackError(f"cannot reach Kafka at {settings.kafka_bootstrap} ({exc.args[0].str()})") from None
    for letter in letters:
        while True:
            try:
                producer.produce(
                    letter.topic, value=letter.raw, key=letter.key, partition=letter.partition, on_delivery=delivered
                )
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.5)
        producer.poll(0)
    producer.flush(timeout)
    if failed or acked != len(letters):
        reason = Counter(failed).most_common(1)[0][0] if failed else "no acknowledgement in time"
        raise StackError(
            f"Kafka at {settings.kafka_bootstrap} acknowledged {acked} of {len(letters)} replayed message(s) "
            f"({reason}); running the replay again is safe"
        )
    log.info("dlq_replayed count=%d topic=%s", acked, letters[0].topic)
    return acked
