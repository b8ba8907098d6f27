"""ClickHouse DDL, in one place, as numbered idempotent migrations.

``apply_migrations`` records what it applied in ``schema_migrations`` and only
runs what is new, so it is safe on every sink start.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from clickhouse_connect.driver.client import Client

__all__ = ["MIGRATIONS", "Migration", "apply_migrations"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "feedback_events",
        (
            """
            CREATE TABLE IF NOT EXISTS feedback_events
            (
                event_id            String,
                ts                  DateTime64(6, 'UTC'),
                source              LowCardinality(String),
                type                LowCardinality(String),
                severity            LowCardinality(String),
                user_id             Nullable(String),
                session_id          Nullable(String),
                interaction_id      Nullable(String),
                model_version       LowCardinality(Nullable(String)),
                prompt_version      LowCardinality(Nullable(String)),
                value               Nullable(Float64),
                confidence          Nullable(Float64),
                tags                Array(LowCardinality(String)),
                idempotency_key     Nullable(String),
                payload_text        Nullable(String),
                payload_comment     Nullable(String),
                corrected_response  Nullable(String),
                payload             Map(String, String) COMMENT 'non-text payload values, JSON-encoded',
                hash                String,
                kafka_partition     UInt32,
                kafka_offset        UInt64,
                ingested_at         DateTime64(3, 'UTC') DEFAULT now64(3)
            )
            ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMM(ts)
            ORDER BY (source, type, toDate(ts), event_id)
            SETTINGS non_replicated_deduplication_window = 10000
            """,
        ),
    ),
    Migration(
        2,
        "dlq_events",
        (
            """
            CREATE TABLE IF NOT EXISTS dlq_events
            (
                ts            DateTime64(6, 'UTC'),
                stage         LowCardinality(String),
                error         String,
                topic         LowCardinality(String),
                partition     UInt32,
                offset        UInt64,
                raw_bytes     UInt32 COMMENT 'size of the original message; the bytes stay in Kafka',
                ingested_at   DateTime64(3, 'UTC') DEFAULT now64(3)
            )
            ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMM(ts)
            ORDER BY (topic, partition, offset)
            SETTINGS non_replicated_deduplication_window = 10000
            """,
        ),
    ),
)

MIGRATIONS += (
    Migration(
        3,
        "feedback_events gate annotations",
        (
            "ALTER TABLE feedback_events ADD COLUMN IF NOT EXISTS sample_rate Nullable(Float64) "
            "COMMENT 're-weight by 1/sample_rate' AFTER confidence",
            "ALTER TABLE feedback_events ADD COLUMN IF NOT EXISTS text_dropped Bool DEFAULT false AFTER sample_rate",
        ),
    ),
)

MIGRATIONS += (
    Migration(
        4,
        "rejected_events",
        (
            """
            CREATE TABLE IF NOT EXISTS rejected_events
            (
                event_id      String,
                source        LowCardinality(String),
                type          LowCardinality(String),
                ts            Nullable(DateTime64(6, 'UTC')),
                hash          String,
                reason        LowCardinality(String) COMMENT 'invalid | rate_limited | duplicate',
                field         String COMMENT 'the field that broke a rule (empty when none)',
                rule          String,
                topic         LowCardinality(String) COMMENT 'the refused message: topic, partition, offset',
                partition     Int32,
                offset        Int64,
                rejected_at   DateTime64(6, 'UTC'),
                ingested_at   DateTime64(3, 'UTC') DEFAULT now64(3)
            )
            ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMM(rejected_at)
            ORDER BY (topic, partition, offset)
            SETTINGS non_replicated_deduplication_window = 10000
            """,
        ),
    ),
)

MIGRATIONS += (
    Migration(
        5,
        "feedback_events propagation_weight",
        (
            "ALTER TABLE feedback_events ADD COLUMN IF NOT EXISTS propagation_weight Nullable(Float64) "
            "COMMENT '1 for one interaction; session-level feedback: weight per interaction' AFTER text_dropped",
        ),
    ),
)

_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations
(
    version     UInt32,
    name        String,
    applied_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY version
"""


_TABLE_HEAD = re.compile(r"((?:CREATE TABLE IF NOT EXISTS|ALTER TABLE)\s+)")


def _qualify(statement: str, database: str) -> str:
    """Put ``database`` in front of the statement's table name."""
    qualified, n = _TABLE_HEAD.subn(lambda m: f"{m.group(1)}`{database}`.", statement, count=1)
    if not n:
        raise ValueError(f"migration statement without a table: {statement[:60]}")
    return qualified


def apply_migrations(client: Client, database: str) -> list[int]:
    """Create ``database`` and apply every migration not yet recorded; returns the versions applied."""
    client.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
    client.command(_LEDGER.replace("schema_migrations", f"`{database}`.schema_migrations"))
    done = {row[0] for row in client.query(f"SELECT version FROM `{database}`.schema_migrations FINAL").result_rows}
    applied: list[int] = []
    for migration in MIGRATIONS:
        if migration.version in done:
            continue
        for statement in migration.statements:
            client.command(_qualify(statement, database))
        client.insert(
            "schema_migrations",
            [[migration.version, migration.name]],
            column_names=["version", "name"],
            database=database,
        )
        applied.append(migration.version)
        log.info("migration_applied version=%d name=%s", migration.version, migration.name)
    return applied
