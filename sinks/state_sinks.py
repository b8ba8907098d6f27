"""The state topics in ClickHouse: every published reputation and directive-bias update, the
triage queue (its items' latest state, plus the open queue as a JSONL file), and the
interactions ``track()`` published (so the gateway can answer for one).

Both sinks share the batching base; rows are keyed by the update's Kafka
coordinates, so a replayed batch collapses (ReplacingMergeTree plus the batch's
deduplication token). A value that does not decode is logged by coordinates and
skipped: the compacted topic keeps the next good value for the key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Message

from pipeline.errors import InvalidEvent, PoisonEvent
from pipeline.private_files import make_private_dirs, open_private
from pipeline.settings import Settings
from schemas.serde import AvroSerde
from schemas.state_records import decode_bias, decode_reputation
from schemas.topics import Topics
from schemas.triage_records import TriageItem, decode_item
from sinks.batching import BatchingSink, by_partition
from sinks.clickhouse import ClickHouseWriter, batch_token, connect
from sinks.migrations import migrate
from stream_processors.enrich import context_of

__all__ = [
    "BIAS_COLUMNS",
    "INTERACTION_COLUMNS",
    "REPUTATION_COLUMNS",
    "TRIAGE_COLUMNS",
    "TRIAGE_QUEUE_FILE",
    "BiasHistorySink",
    "InteractionSink",
    "ReputationHistorySink",
    "TriageSink",
    "bias_row",
    "erasure_bounds",
    "interaction_row",
    "reputation_row",
]

log = logging.getLogger(__name__)

REPUTATION_COLUMNS = (
    "source", "score", "observations", "downweighted", "weight", "published_at", "kafka_partition", "kafka_offset",
)  # fmt: skip
BIAS_COLUMNS = (
    "directive", "model_version", "value", "updated_at", "half_life_s", "events", "published_at",
    "kafka_partition", "kafka_offset",
)  # fmt: skip


def _published_at(msg: Message) -> datetime:
    _kind, ms = msg.timestamp()
    return datetime.fromtimestamp(ms / 1000, UTC) if ms and ms > 0 else datetime.now(UTC)


def reputation_row(msg: Message) -> list[Any]:
    r = decode_reputation(msg.value())
    coords = [_published_at(msg), msg.partition(), msg.offset()]
    return [r.source, r.score, r.observations, r.downweighted, r.weight, *coords]


def bias_row(msg: Message) -> list[Any]:
    r = decode_bias(msg.value())
    coords = [_published_at(msg), msg.partition(), msg.offset()]
    return [r.directive, r.model_version, r.value, r.updated_at, r.half_life_s, r.events, *coords]


class _HistorySink(BatchingSink):
    side_table = True
    table: str
    columns: tuple[str, ...]
    to_row: Callable[[Message], list[Any]]

    def __init__(self, settings: Settings, topic: str, **kwargs: Any) -> None:
        super().__init__(settings, topic, f"{settings.sink_group}-{self.name}", **kwargs)
        client = connect(settings)
        migrate(client, settings)
        self.clickhouse = ClickHouseWriter(client, settings.clickhouse_database, self.table, self.columns)

    def flush(self, messages: Sequence[Message]) -> None:
        for partition, msgs in by_partition(messages).items():
            rows = []
            for msg in msgs:
                if msg.value() is None:
                    continue  # a tombstone: the key was removed, nothing to record
                try:
                    rows.append(type(self).to_row(msg))
                except ValueError as exc:
                    log.warning(
                        "state_record_skipped sink=%s partition=%d offset=%d reason=%s",
                        self.name, partition, msg.offset(), exc,
                    )  # fmt: skip
            self.clickhouse.insert(
                rows, batch_token(self.table, self.topic, partition, msgs[0].offset(), msgs[-1].offset())
            )


class ReputationHistorySink(_HistorySink):
    """``feedback.reputation.v1`` → ClickHouse ``reputation_history``."""

    name = "reputation-history"
    table = "reputation_history"
    columns = REPUTATION_COLUMNS
    to_row = staticmethod(reputation_row)

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(settings, Topics(settings.topic_prefix).reputation, **kwargs)


class BiasHistorySink(_HistorySink):
    """``feedback.directive-bias.v1`` → ClickHouse ``directive_bias_history``."""

    name = "bias-history"
    table = "directive_bias_history"
    columns = BIAS_COLUMNS
    to_row = staticmethod(bias_row)

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(settings, Topics(settings.topic_prefix).directive_bias, **kwargs)


TRIAGE_COLUMNS = (
    "triage_id", "event_id", "source", "type", "severity", "reason", "value", "status", "label", "note",
    "created_at", "updated_at", "version", "history",
)  # fmt: skip
TRIAGE_QUEUE_FILE = "triage-queue.jsonl"


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def triage_row(msg: Message) -> list[Any]:
    i = decode_item(msg.value())
    return [
        i.triage_id, i.event_id, i.source, i.type, i.severity, i.reason, i.value, i.status, i.label, i.note,
        _at(i.created_s), _at(i.updated_s), i.version, orjson.dumps(i.history).decode(),
    ]  # fmt: skip


def _item_from_row(r: dict[str, Any]) -> TriageItem:
    item = TriageItem(
        triage_id=r["triage_id"], event_id=r["event_id"], source=r["source"], type=r["type"], severity=r["severity"],
        value=r["value"], reason=r["reason"], status=r["status"], label=r["label"], note=r["note"],
        created_s=r["created_at"].replace(tzinfo=UTC).timestamp(),
        updated_s=r["updated_at"].replace(tzinfo=UTC).timestamp(), version=r["version"],
        history=orjson.loads(r["history"]),
    )  # fmt: skip
    return item


class TriageSink(_HistorySink):
    """``feedback.triage.v1`` → ClickHouse ``triage`` (ReplacingMergeTree by version: the latest
    state per item) and ``$FEEDBACK_PATH/triage-queue.jsonl``: every item not yet resolved, oldest
    first, one JSON object per line. The file is rewritten whole (temp file, fsync, rename) after
    each batch reached ClickHouse, so a reader never sees half a queue and a replay rewrites the
    same file. On start the queue is loaded back from ClickHouse.
    """

    name = "triage"
    table = "triage"
    columns = TRIAGE_COLUMNS
    to_row = staticmethod(triage_row)

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(settings, Topics(settings.topic_prefix).triage, **kwargs)
        self.queue_path = Path(settings.path) / TRIAGE_QUEUE_FILE
        self._items: dict[str, TriageItem] = {item.triage_id: item for item in self._load()}
        self._lines: dict[str, bytes] = {tid: item.to_bytes() + b"\n" for tid, item in self._items.items()}
        self._write_queue()  # ClickHouse is the truth on start (an erasure while stopped shows at once)

    def _load(self) -> list[TriageItem]:
        names = ", ".join(TRIAGE_COLUMNS)
        rows = self.clickhouse.client.query(
            f"SELECT {names} FROM `{self.clickhouse.database}`.triage FINAL WHERE status != 'resolved'"
        ).named_results()
        return [_item_from_row(r) for r in rows]

    def flush(self, messages: Sequence[Message]) -> None:
        super().flush(messages)
        erased: set[str] = set()
        for msg in messages:
            if msg.value() is None:  # erased (``feedback forget``): from the queue and from ClickHouse
                triage_id = (msg.key() or b"").decode()
                self._items.pop(triage_id, None)
                self._lines.pop(triage_id, None)
                erased.add(triage_id)
                continue
            try:
                item = decode_item(msg.value())
            except ValueError:
                continue  # logged by the row pass above
            known = self._items.get(item.triage_id)
            if known is None or item.version >= known.version:
                self._items[item.triage_id] = item
                self._lines[item.triage_id] = item.to_bytes() + b"\n"
            erased.discard(item.triage_id)
        if erased:
            self.clickhouse.client.command(
                f"ALTER TABLE `{self.clickhouse.database}`.triage DELETE WHERE triage_id IN {{ids:Array(String)}}",
                parameters={"ids": sorted(erased)},
                settings={"mutations_sync": 2},
            )
        self._write_queue()

    def _write_queue(self) -> None:
        # Each item's line is kept from when it changed (orjson of the dataclass, as asdict would
        # give): rewriting the queue costs a sort and a write, not a serialization of every item.
        queue = sorted((i for i in self._items.values() if i.status != "resolved"), key=lambda i: i.created_s)
        make_private_dirs(self.queue_path.parent)
        tmp = self.queue_path.with_suffix(".jsonl.tmp")
        lines = self._lines
        with open_private(tmp, "wb") as fh:
            fh.writelines(lines[i.triage_id] for i in queue)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.queue_path)


INTERACTION_COLUMNS = (
    "interaction_id", "ts", "source", "model_version", "prompt_version", "prompt", "response", "latency_ms", "cost",
    "kafka_partition", "kafka_offset",
)  # fmt: skip


def interaction_row(record: dict[str, Any], partition: int, offset: int, *, allow_text: bool) -> list[Any]:
    """One ``interactions`` row for a decoded ``interaction_v1`` record: the context the worker
    keeps for it (:func:`~stream_processors.enrich.context_of`: validated, the snapshots redacted
    again, or dropped unless ``allow_text``). Raises :class:`InvalidEvent` naming the field."""
    c = context_of(record, allow_text=allow_text)
    return [
        str(record["interaction_id"]), record["ts"], c["source"], c["model_version"], c["prompt_version"],
        c["prompt"], c["response"], c["latency_ms"], c["cost"], partition, offset,
    ]  # fmt: skip


def erasure_bounds(messages: Sequence[tuple[bytes | None, bytes | None, int]]) -> dict[str, int]:
    """For (key, value, offset) messages of one partition: each tombstoned id and the offset of its
    last tombstone. Rows of the id below that offset are erased; a row after it (the id tracked
    again) stays, so the answer depends only on the messages, not on how they were batched."""
    return {(key or b"").decode(errors="replace"): offset for key, value, offset in messages if value is None}


class InteractionSink(BatchingSink):
    """``feedback.interactions.v1`` → ClickHouse ``interactions``, tombstones honoured: a tombstone
    (``feedback forget``) deletes the id's rows from before it, with a synchronous mutation (the
    parts are rewritten, not masked). Inserting before deleting keeps a replayed batch harmless:
    its insert is deduplicated by token and the delete bound is the same offset. A record that
    does not decode or breaks the schema's rules is logged by coordinates and skipped (the worker
    dead-letters the same record)."""

    side_table = True

    name = "interactions"

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        topic = Topics(settings.topic_prefix).interactions
        super().__init__(settings, topic, f"{settings.sink_group}-{self.name}", **kwargs)
        self.serde = AvroSerde("interaction_v1")
        self.allow_text = settings.allow_text
        client = connect(settings)
        migrate(client, settings)
        self.clickhouse = ClickHouseWriter(client, settings.clickhouse_database, "interactions", INTERACTION_COLUMNS)

    def flush(self, messages: Sequence[Message]) -> None:
        for partition, msgs in by_partition(messages).items():
            rows = []
            for msg in msgs:
                if msg.value() is None:
                    continue
                try:
                    record = self.serde.decode(msg.value())
                    rows.append(interaction_row(record, partition, msg.offset(), allow_text=self.allow_text))
                except (PoisonEvent, InvalidEvent) as exc:
                    reason = exc.reason if isinstance(exc, PoisonEvent) else f"{exc.field}: {exc.rule}"
                    log.warning("interaction_skipped partition=%d offset=%d reason=%s", partition, msg.offset(), reason)
            self.clickhouse.insert(
                rows, batch_token("interactions", self.topic, partition, msgs[0].offset(), msgs[-1].offset())
            )
            bounds = erasure_bounds([(m.key(), m.value(), m.offset()) for m in msgs])
            if bounds:
                ids = sorted(bounds)
                # An id's bound by its position; indexOf is 0 for any other id, and element 0 is 0: nothing goes.
                self.clickhouse.client.command(
                    f"ALTER TABLE `{self.clickhouse.database}`.interactions DELETE WHERE kafka_partition = {{p:UInt32}}"
                    " AND kafka_offset < {at:Array(UInt64)}[indexOf({ids:Array(String)}, interaction_id)]",
                    parameters={"p": partition, "ids": ids, "at": [bounds[i] for i in ids]},
                    settings={"mutations_sync": 2},
                )
                log.info("interactions_erased partition=%d ids=%d", partition, len(bounds))
