"""The state topics' history in ClickHouse: every published reputation and directive-bias update.

Both sinks share the batching base; rows are keyed by the update's Kafka
coordinates, so a replayed batch collapses (ReplacingMergeTree plus the batch's
deduplication token). A value that does not decode is logged by coordinates and
skipped: the compacted topic keeps the next good value for the key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Message

from pipeline.settings import Settings
from schemas.state_records import decode_bias, decode_reputation
from schemas.topics import Topics
from sinks.batching import BatchingSink, by_partition
from sinks.clickhouse import ClickHouseWriter, batch_token, connect
from sinks.migrations import migrate

__all__ = [
    "BIAS_COLUMNS",
    "REPUTATION_COLUMNS",
    "BiasHistorySink",
    "ReputationHistorySink",
    "bias_row",
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
