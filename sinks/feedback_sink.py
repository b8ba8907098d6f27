"""The sinks: clean events to ClickHouse and JSONL, dead letters to ClickHouse."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Message, Producer

from pipeline.errors import PoisonEvent, TransientError
from pipeline.settings import Settings
from schemas.dead_letter import dead_letter
from schemas.serde import AvroSerde
from schemas.topics import Topics
from sinks.batching import BatchingSink
from sinks.clickhouse import EVENT_COLUMNS, ClickHouseWriter, connect, event_row
from sinks.jsonl import JsonlWriter
from sinks.migrations import apply_migrations

__all__ = [
    "REJECTED_COLUMNS",
    "DeadLetterSink",
    "EventSink",
    "RejectedSink",
    "all_sinks",
    "batch_token",
    "rejected_row",
]

log = logging.getLogger(__name__)


def batch_token(table: str, topic: str, partition: int, first: int, last: int) -> str:
    """Deterministic insert_deduplication_token for one partition's offset range."""
    return f"{table}:{topic}:{partition}:{first}-{last}"


REJECTED_COLUMNS: tuple[str, ...] = (
    "event_id",
    "source",
    "type",
    "ts",
    "hash",
    "reason",
    "field",
    "rule",
    "topic",
    "partition",
    "offset",
    "rejected_at",
)

# DateTime64's range in ClickHouse; a refused event's ts may lie outside it (that may be why it was refused).
_CH_MIN_TS = datetime(1900, 1, 1, tzinfo=UTC)
_CH_MAX_TS = datetime(2299, 12, 31, 23, 59, 59, tzinfo=UTC)


def rejected_row(record: dict[str, Any]) -> list[Any]:
    """One ``rejected_events`` row (in :data:`REJECTED_COLUMNS` order) from a decoded ``rejected_v1`` record.

    ``topic``/``partition``/``offset`` are the refused raw message's coordinates (the table's
    key), not the rejected topic's. A ``ts`` ClickHouse cannot represent is stored as NULL.
    """
    ts: datetime | None = record["ts"]
    if ts is not None and not _CH_MIN_TS <= ts <= _CH_MAX_TS:
        ts = None
    return [
        record["event_id"],
        record["source"],
        record["type"],
        ts,
        record["hash"],
        record["reason"],
        record["field"],
        record["rule"],
        record["topic"],
        record["partition"],
        record["offset"],
        record["rejected_at"],
    ]


def _by_partition(messages: Sequence[Message]) -> dict[int, list[Message]]:
    groups: dict[int, list[Message]] = defaultdict(list)
    for msg in messages:
        groups[msg.partition()].append(msg)
    return groups


class _DeadLetters:
    """Sends undecodable messages to the DLQ topic (stage ``sink``); mixed into sinks."""

    dead_lettered: int

    def _init_dead_letters(self, settings: Settings, topics: Topics) -> None:
        self.dlq_serde = AvroSerde("dead_letter_v1")
        self.dlq_topic = topics.dlq
        self._dlq = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True, "acks": "all"})
        self.dead_lettered = 0

    def _dead_letter(self, msg: Message, reason: str) -> None:
        # Coordinates and reason only: the bytes go to the DLQ topic, never to the log.
        log.warning(
            "sink_undecodable sink=%s partition=%d offset=%d reason=%s",
            getattr(self, "name", "sink"),
            msg.partition(),
            msg.offset(),
            reason,
        )
        record = dead_letter(
            stage="sink",
            error=reason,
            topic=msg.topic(),
            partition=msg.partition(),
            offset=msg.offset(),
            key=msg.key(),
            raw=msg.value(),
            now=datetime.now(UTC),
        )
        self._dlq.produce(self.dlq_topic, value=self.dlq_serde.encode(record), key=msg.key())
        self.dead_lettered += 1

    def _flush_dead_letters(self) -> None:
        if self._dlq.flush(30) > 0:
            raise TransientError("dead letters not acknowledged by Kafka")


class EventSink(_DeadLetters, BatchingSink):
    """``feedback.clean.v1`` → ClickHouse ``feedback_events`` and the daily JSONL files.

    A message that does not decode goes to the DLQ (stage ``sink``) and never stops the sink.
    """

    name = "events"

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        topics = Topics(settings.topic_prefix)
        super().__init__(settings, topics.clean, settings.sink_group, **kwargs)
        self.serde = AvroSerde.from_url(settings.schema_registry_url)
        self._init_dead_letters(settings, topics)
        client = connect(settings)
        apply_migrations(client, settings.clickhouse_database)
        self.clickhouse = ClickHouseWriter(client, settings.clickhouse_database, "feedback_events", EVENT_COLUMNS)
        self.jsonl = JsonlWriter(settings.path)

    def flush(self, messages: Sequence[Message]) -> None:
        records: list[dict[str, Any]] = []
        for partition, msgs in _by_partition(messages).items():
            rows: list[list[Any]] = []
            for msg in msgs:
                try:
                    record = self.serde.decode(msg.value())
                except PoisonEvent as exc:
                    self._dead_letter(msg, exc.reason)
                    continue
                rows.append(event_row(record, partition, msg.offset()))
                records.append(record)
            token = batch_token("feedback_events", self.topic, partition, msgs[0].offset(), msgs[-1].offset())
            self.clickhouse.insert(rows, token)
        self.jsonl.write(records)
        self._flush_dead_letters()
        log.info("batch_written sink=events rows=%d dead_lettered=%d", len(records), self.dead_lettered)


class DeadLetterSink(BatchingSink):
    """``feedback.dlq.v1`` → ClickHouse ``dlq_events`` (metadata only; the bytes stay in Kafka)."""

    name = "dlq"
    COLUMNS = ("ts", "stage", "error", "topic", "partition", "offset", "raw_bytes")

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        topics = Topics(settings.topic_prefix)
        super().__init__(settings, topics.dlq, f"{settings.sink_group}-dlq", **kwargs)
        self.serde = AvroSerde("dead_letter_v1")
        client = connect(settings)
        apply_migrations(client, settings.clickhouse_database)
        self.clickhouse = ClickHouseWriter(client, settings.clickhouse_database, "dlq_events", self.COLUMNS)

    def flush(self, messages: Sequence[Message]) -> None:
        for partition, msgs in _by_partition(messages).items():
            rows = []
            for msg in msgs:
                try:
                    r = self.serde.decode(msg.value())
                except PoisonEvent as exc:
                    # Nowhere further to send it: count it loudly and keep going.
                    log.error("dlq_undecodable partition=%d offset=%d reason=%s", partition, msg.offset(), exc.reason)
                    continue
                rows.append([r["ts"], r["stage"], r["error"], r["topic"], r["partition"], r["offset"], len(r["raw"])])
            token = batch_token("dlq_events", self.topic, partition, msgs[0].offset(), msgs[-1].offset())
            self.clickhouse.insert(rows, token)


class RejectedSink(_DeadLetters, BatchingSink):
    """``feedback.rejected.v1`` → ClickHouse ``rejected_events`` (why the gate refused; never a payload).

    The table is keyed by the refused message's coordinates, so a replayed rejection
    collapses to one row. A message that does not decode goes to the DLQ (stage ``sink``)
    and never stops the sink.
    """

    name = "rejected"

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        topics = Topics(settings.topic_prefix)
        super().__init__(settings, topics.rejected, f"{settings.sink_group}-rejected", **kwargs)
        self.serde = AvroSerde("rejected_v1")
        self._init_dead_letters(settings, topics)
        client = connect(settings)
        apply_migrations(client, settings.clickhouse_database)
        self.clickhouse = ClickHouseWriter(client, settings.clickhouse_database, "rejected_events", REJECTED_COLUMNS)

    def flush(self, messages: Sequence[Message]) -> None:
        written = 0
        for partition, msgs in _by_partition(messages).items():
            rows: list[list[Any]] = []
            for msg in msgs:
                try:
                    record = self.serde.decode(msg.value())
                except PoisonEvent as exc:
                    self._dead_letter(msg, exc.reason)
                    continue
                rows.append(rejected_row(record))
            token = batch_token("rejected_events", self.topic, partition, msgs[0].offset(), msgs[-1].offset())
            self.clickhouse.insert(rows, token)
            written += len(rows)
        self._flush_dead_letters()
        log.info("batch_written sink=rejected rows=%d dead_lettered=%d", written, self.dead_lettered)


def all_sinks(settings: Settings) -> list[BatchingSink]:
    """Every sink ``feedback sink`` runs, one thread each."""
    return [EventSink(settings), RejectedSink(settings), DeadLetterSink(settings)]
