"""ClickHouse DDL, in one place, as numbered idempotent migrations.

``apply_migrations`` records what it applied in ``schema_migrations`` and only
runs what is new, so it is safe on every sink start.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from clickhouse_connect.driver.client import Client

from pipeline.settings import Settings

__all__ = ["MIGRATIONS", "RETENTION", "Migration", "apply_migrations", "for_cluster", "migrate", "sync_retention"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]
    #: statement index → (table, column): that statement runs only while the table has the column,
    #: so a re-run (after a crash before the ledger row) skips it once a later statement dropped it.
    while_column: dict[int, tuple[str, str]] = field(default_factory=dict)
    #: statement index → (table, field of system.tables, value): runs only while the table's
    #: ``engine`` or ``sorting_key`` is that (a Replicated engine counts as its plain kind), so a
    #: re-run skips a RENAME or EXCHANGE that already happened.
    while_table: dict[int, tuple[str, str, str]] = field(default_factory=dict)


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

MIGRATIONS += (
    Migration(
        6,
        "state history and triage",
        (
            """
            CREATE TABLE IF NOT EXISTS {db}.reputation_history
            (
                source           LowCardinality(String),
                score            Float64,
                observations     UInt64,
                downweighted     Bool,
                weight           Float64,
                published_at     DateTime64(3, 'UTC') COMMENT 'Kafka timestamp of the update',
                kafka_partition  UInt32,
                kafka_offset     UInt64
            )
            ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMM(published_at)
            ORDER BY (source, kafka_partition, kafka_offset)
            SETTINGS non_replicated_deduplication_window = 10000
            """,
            """
            CREATE TABLE IF NOT EXISTS {db}.directive_bias_history
            (
                directive        LowCardinality(String),
                model_version    LowCardinality(Nullable(String)),
                value            Float64 COMMENT 'bias at updated_at; decays with half_life_s',
                updated_at       DateTime64(6, 'UTC') COMMENT 'event time of the last event applied',
                half_life_s      Float64,
                events           UInt64,
                published_at     DateTime64(3, 'UTC'),
                kafka_partition  UInt32,
                kafka_offset     UInt64
            )
            ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMM(published_at)
            ORDER BY (directive, kafka_partition, kafka_offset)
            SETTINGS non_replicated_deduplication_window = 10000
            """,
            """
            CREATE TABLE IF NOT EXISTS {db}.triage
            (
                triage_id    String,
                event_id     String,
                source       LowCardinality(String),
                type         LowCardinality(String),
                status       LowCardinality(String) COMMENT 'open | labeled | resolved',
                label        LowCardinality(String) COMMENT 'e.g. noise, bug, model_error (empty while open)',
                note         String,
                created_at   DateTime64(3, 'UTC'),
                updated_at   DateTime64(3, 'UTC'),
                version      UInt64 COMMENT 'the latest version of a triage item wins'
            )
            ENGINE = ReplacingMergeTree(version)
            ORDER BY triage_id
            """,
        ),
    ),
    Migration(
        7,
        "rollups",
        (
            """
            CREATE TABLE IF NOT EXISTS {db}.feedback_daily
            (
                day             Date,
                source          LowCardinality(String),
                type            LowCardinality(String),
                model_version   LowCardinality(String),
                prompt_version  LowCardinality(String),
                events          UInt64,
                value_sum       Float64,
                value_count     UInt64 COMMENT 'events with a value: mean = value_sum / value_count',
                weighted_events Float64 COMMENT 'sum of 1 / sample_rate: events before sampling',
                thumbs_up       UInt64,
                thumbs_down     UInt64
            )
            ENGINE = SummingMergeTree
            PARTITION BY toYYYYMM(day)
            ORDER BY (day, source, type, model_version, prompt_version)
            SETTINGS non_replicated_deduplication_window = 10000
            """,
            """
            CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.feedback_daily_mv TO {db}.feedback_daily AS
            SELECT
                toDate(ts) AS day,
                source,
                type,
                ifNull(model_version, '') AS model_version,
                ifNull(prompt_version, '') AS prompt_version,
                count() AS events,
                sum(ifNull(value, 0)) AS value_sum,
                countIf(value IS NOT NULL) AS value_count,
                sum(1 / ifNull(sample_rate, 1)) AS weighted_events,
                countIf(type = 'thumbs' AND value > 0) AS thumbs_up,
                countIf(type = 'thumbs' AND value < 0) AS thumbs_down
            FROM {db}.feedback_events
            GROUP BY day, source, type, model_version, prompt_version
            """,
            """
            CREATE TABLE IF NOT EXISTS {db}.interaction_stats
            (
                interaction_id  String,
                feedback_count  SimpleAggregateFunction(sum, UInt64),
                value_sum       SimpleAggregateFunction(sum, Float64),
                value_count     SimpleAggregateFunction(sum, UInt64),
                first_at        SimpleAggregateFunction(min, DateTime64(6, 'UTC')),
                last_at         SimpleAggregateFunction(max, DateTime64(6, 'UTC')),
                last_type       AggregateFunction(argMax, String, DateTime64(6, 'UTC')),
                last_value      AggregateFunction(argMax, Nullable(Float64), DateTime64(6, 'UTC'))
            )
            ENGINE = AggregatingMergeTree
            ORDER BY interaction_id
            SETTINGS non_replicated_deduplication_window = 10000
            """,
            """
            CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.interaction_stats_mv TO {db}.interaction_stats AS
            SELECT
                assumeNotNull(interaction_id) AS interaction_id,
                count() AS feedback_count,
                sum(ifNull(value, 0)) AS value_sum,
                countIf(value IS NOT NULL) AS value_count,
                min(ts) AS first_at,
                max(ts) AS last_at,
                argMaxState(toString(type), ts) AS last_type,
                argMaxState(value, ts) AS last_value
            FROM {db}.feedback_events
            WHERE interaction_id IS NOT NULL
            GROUP BY interaction_id
            """,
        ),
    ),
)

MIGRATIONS += (
    Migration(
        8,
        "feedback_events value constraints",
        (
            # The gate guarantees these; the constraints stop anything else that writes the table.
            "ALTER TABLE {db}.feedback_events ADD CONSTRAINT IF NOT EXISTS value_range "
            "CHECK value IS NULL OR (value >= -1 AND value <= 1)",
            "ALTER TABLE {db}.feedback_events ADD CONSTRAINT IF NOT EXISTS confidence_range "
            "CHECK confidence IS NULL OR (confidence >= 0 AND confidence <= 1)",
            "ALTER TABLE {db}.feedback_events ADD CONSTRAINT IF NOT EXISTS sample_rate_range "
            "CHECK sample_rate IS NULL OR (sample_rate > 0 AND sample_rate <= 1)",
        ),
    ),
)

# Delayed feedback: the stream joins feedback to its interaction's context (track()) and
# records the result in payload keys starting with "interaction_". ALIAS columns make them
# first-class for analysts at no cost on insert (computed when read).
_ALIASES = (
    ("interaction_status", "LowCardinality(Nullable(String))", "nullIf(payload['interaction_status'], '')",
     "joined | expired | unknown; NULL without an interaction_id"),
    ("interaction_tracked_at", "Nullable(DateTime64(6, 'UTC'))",
     "parseDateTime64BestEffortOrNull(payload['interaction_tracked_at'], 6, 'UTC')",
     "when the interaction was tracked"),
    ("interaction_latency_ms", "Nullable(Float64)", "toFloat64OrNull(payload['interaction_latency_ms'])",
     "latency of the interaction, ms"),
    ("interaction_cost", "Nullable(Float64)", "toFloat64OrNull(payload['interaction_cost'])",
     "cost of the interaction"),
    ("interaction_response", "Nullable(String)", "nullIf(payload['interaction_response'], '')",
     "redacted answer snapshot (only with ALLOW_TEXT)"),
)  # fmt: skip

MIGRATIONS += (
    Migration(
        9,
        "feedback_events interaction context",
        tuple(
            f"ALTER TABLE {{db}}.feedback_events ADD COLUMN IF NOT EXISTS {name} {type_} ALIAS {expr} "
            f"COMMENT '{comment}'"
            for name, type_, expr, comment in _ALIASES
        ),
    ),
)

_LEDGER = """
CREATE TABLE IF NOT EXISTS {db}.schema_migrations
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


def _render(statement: str, database: str, cluster: str | None = None) -> str:
    """Migrations 1-5 name one table and get the database put in front; later ones say ``{db}``."""
    rendered = statement.replace("{db}", f"`{database}`") if "{db}" in statement else _qualify(statement, database)
    return for_cluster(rendered, cluster) if cluster else rendered


_CREATE_HEAD = re.compile(
    r"^(\s*(?:CREATE (?:TABLE|MATERIALIZED VIEW|VIEW|DATABASE) IF NOT EXISTS|ALTER TABLE|DROP (?:TABLE|VIEW) IF EXISTS)"
    r"\s+(`[^`]+`(?:\.\S+)?|\S+))"
)
_ENGINE = re.compile(r"ENGINE = (Replacing|Summing|Aggregating|)MergeTree(?:\(([^)]*)\))?")


def for_cluster(statement: str, cluster: str) -> str:
    """The same DDL for a cluster: ``ON CLUSTER`` after the object name and Replicated engines
    (ZooKeeper path per shard, database and table; replica from the server's macros). An ``INSERT``
    (a migration's backfill) is returned as it is: it runs on the node the client is connected to."""
    if statement.lstrip().startswith("INSERT "):
        return statement
    if statement.lstrip().startswith(("RENAME TABLE ", "EXCHANGE TABLES ")):
        return f"{statement.rstrip()} ON CLUSTER `{cluster}`"
    statement, n = _CREATE_HEAD.subn(lambda m: f"{m.group(1)} ON CLUSTER `{cluster}`", statement, count=1)
    if not n:
        raise ValueError(f"cannot place ON CLUSTER in: {statement.strip()[:60]}")

    def replicated(m: re.Match[str]) -> str:
        kind, args = m.group(1), m.group(2)
        path = "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'"
        return f"ENGINE = Replicated{kind}MergeTree({path}{', ' + args if args else ''})"

    # Replicated tables deduplicate through Keeper; the non-replicated window setting does not apply.
    statement = re.sub(r"SETTINGS non_replicated_deduplication_window = \d+,?\s*", "SETTINGS ", statement)
    statement = re.sub(r"\s*SETTINGS\s*$", "\n", statement)
    return _ENGINE.sub(replicated, statement)


def distributed_tables(database: str, cluster: str) -> list[str]:
    """``<table>_all`` Distributed tables over the sharded event tables (query these on a cluster)."""
    shard_keys = {"feedback_events": "cityHash64(event_id)", "rejected_events": "cityHash64(topic, partition, offset)"}
    return [
        f"CREATE TABLE IF NOT EXISTS `{database}`.{table}_all ON CLUSTER `{cluster}` AS `{database}`.{table} "
        f"ENGINE = Distributed(`{cluster}`, `{database}`, {table}, {key})"
        for table, key in shard_keys.items()
    ]


#: Tables with a time-to-live, and the column it counts from.
RETENTION = {
    "feedback_events": "ts", "rejected_events": "rejected_at", "dlq_events": "ts", "interactions": "ts",
    "feedback_current": "ts",
}  # fmt: skip
_TTL = re.compile(r"\bTTL (.+?)(?: SETTINGS |$)")


def sync_retention(client: Client, database: str, days: int) -> list[str]:
    """Make each table's TTL ``days`` (0: none). Changes only what differs; existing parts are
    not rewritten (``materialize_ttl_after_modify=0``): old rows go at the next merge."""
    changed = []
    for table, column in RETENTION.items():
        ddl = client.command(
            "SELECT create_table_query FROM system.tables WHERE database = {db:String} AND name = {t:String}",
            parameters={"db": database, "t": table},
        )
        if not ddl:
            continue
        current = _TTL.search(str(ddl))
        want = f"toDateTime({column}) + toIntervalDay({days})"
        if days and (current is None or current.group(1).strip() != want):
            client.command(
                f"ALTER TABLE `{database}`.{table} MODIFY TTL toDateTime({column}) + INTERVAL {days} DAY",
                settings={"materialize_ttl_after_modify": 0},
            )
            changed.append(table)
        elif not days and current is not None:
            client.command(f"ALTER TABLE `{database}`.{table} REMOVE TTL")
            changed.append(table)
    if changed:
        log.info("retention_set days=%d tables=%s", days, ",".join(changed))
    return changed


def _has_column(client: Client, database: str, table: str, column: str) -> bool:
    return bool(
        client.query(
            "SELECT 1 FROM system.columns WHERE database = {db:String} AND table = {t:String} AND name = {c:String}",
            parameters={"db": database, "t": table, "c": column},
        ).result_rows
    )


def _table_is(client: Client, database: str, table: str, column: str, value: str) -> bool:
    if column not in ("engine", "sorting_key"):
        raise ValueError(f"while_table: {column!r} is not engine or sorting_key")
    found = client.query(
        f"SELECT {column} FROM system.tables WHERE database = {{db:String}} AND name = {{t:String}}",
        parameters={"db": database, "t": table},
    ).result_rows
    return bool(found) and str(found[0][0]) in (value, f"Replicated{value}")


def apply_migrations(
    client: Client, database: str, *, retention_days: int | None = None, cluster: str | None = None
) -> list[int]:
    """Create ``database`` and apply every migration not yet recorded; returns the versions applied.

    With ``retention_days`` the tables' TTLs are brought in line too; with ``cluster`` the DDL
    runs ``ON CLUSTER`` with Replicated engines, and ``<table>_all`` Distributed tables are added.
    """
    on_cluster = f" ON CLUSTER `{cluster}`" if cluster else ""
    client.command(f"CREATE DATABASE IF NOT EXISTS `{database}`{on_cluster}")
    client.command(_render(_LEDGER, database, cluster))
    done = {row[0] for row in client.query(f"SELECT version FROM `{database}`.schema_migrations FINAL").result_rows}
    applied: list[int] = []
    for migration in MIGRATIONS:
        if migration.version in done:
            continue
        for i, statement in enumerate(migration.statements):
            if i in migration.while_column and not _has_column(client, database, *migration.while_column[i]):
                continue
            if i in migration.while_table and not _table_is(client, database, *migration.while_table[i]):
                continue
            client.command(_render(statement, database, cluster))
        client.insert(
            "schema_migrations",
            [[migration.version, migration.name]],
            column_names=["version", "name"],
            database=database,
        )
        applied.append(migration.version)
        log.info("migration_applied version=%d name=%s", migration.version, migration.name)
    if cluster:
        for statement in distributed_tables(database, cluster):
            client.command(statement)
    if retention_days is not None:
        sync_retention(client, database, retention_days)
    return applied


def migrate(client: Client, settings: Settings) -> list[int]:
    """:func:`apply_migrations` with the settings' database, retention and cluster (what sinks run on start)."""
    return apply_migrations(
        client,
        settings.clickhouse_database,
        retention_days=settings.clickhouse_retention_days,
        cluster=settings.clickhouse_cluster,
    )


MIGRATIONS += (
    Migration(
        10,
        "triage item details",
        (
            "ALTER TABLE {db}.triage ADD COLUMN IF NOT EXISTS severity LowCardinality(String) DEFAULT '' AFTER type",
            "ALTER TABLE {db}.triage ADD COLUMN IF NOT EXISTS reason String DEFAULT '' "
            "COMMENT 'why it needs a human, e.g. type veto' AFTER severity",
            "ALTER TABLE {db}.triage ADD COLUMN IF NOT EXISTS value Nullable(Float64) AFTER reason",
            "ALTER TABLE {db}.triage ADD COLUMN IF NOT EXISTS history String DEFAULT '[]' "
            "COMMENT 'JSON list of changes: op, tag, by, at_s'",
        ),
    ),
)

# interaction_stats without aggregate states: the view wrote one argMaxState pair per interaction
# after a GROUP BY over every inserted block, the largest cost of an insert (docs/performance.md).
# Now each event becomes one row of plain values (SimpleAggregateFunction: sum, min, max) that
# merges, and queries, aggregate; the last feedback is max((ts, type, value)). The view is switched
# in place (MODIFY QUERY: no insert is missed or counted twice), rows written before are given their
# `last` from the old states, then the state columns go.
_INTERACTION_LAST = "Tuple(DateTime64(6, 'UTC'), String, Nullable(Float64))"
MIGRATIONS += (
    Migration(
        11,
        "interaction_stats without aggregate states",
        (
            f"ALTER TABLE {{db}}.interaction_stats ADD COLUMN IF NOT EXISTS last "
            f"SimpleAggregateFunction(max, {_INTERACTION_LAST}) "
            "COMMENT 'the last feedback: max((ts, type, value)); max(last).2 is its type' AFTER last_at",
            """
            ALTER TABLE {db}.interaction_stats_mv MODIFY QUERY
            SELECT
                assumeNotNull(interaction_id) AS interaction_id,
                toUInt64(1) AS feedback_count,
                ifNull(value, 0) AS value_sum,
                toUInt64(value IS NOT NULL) AS value_count,
                ts AS first_at,
                ts AS last_at,
                (ts, toString(type), value) AS last
            FROM {db}.feedback_events
            WHERE interaction_id IS NOT NULL
            """,
            "ALTER TABLE {db}.interaction_stats UPDATE last = "
            "(last_at, finalizeAggregation(last_type), finalizeAggregation(last_value)) "
            "WHERE last.1 = toDateTime64(0, 6, 'UTC') SETTINGS mutations_sync = 2",
            "ALTER TABLE {db}.interaction_stats DROP COLUMN IF EXISTS last_type, DROP COLUMN IF EXISTS last_value",
        ),
        while_column={2: ("interaction_stats", "last_type")},
    ),
)

# Revisions (docs/stream.md): a later explicit signal of the same type from the same rater on the
# same interaction is kept and names the event it replaces in payload['supersedes'];
# `feedback_current` keeps one row per opinion, its latest revision (ReplacingMergeTree(ts): the
# newest ts wins a merge; readers say FINAL). A revision that arrived after a newer one carries
# payload['superseded_by'] and never enters it. The rater is the stored (pseudonymized) user_id, else
# the session, else the gate's keyed client pseudonym (payload['rater']); a user_id not in pseudonym
# form (rows written with pseudonymization off, before the gate set payload['rater']) is never copied:
# such a row gets rater '' and is its own opinion, like every event that is not an explicit signal.
_EXPLICIT_SQL = "('correction', 'quality_score', 'rating', 'task_success', 'thumbs')"  # dedup.EXPLICIT_SIGNALS
_RATER_SQL = (
    "multiIf(payload['rater'] != '', payload['rater'], "
    "match(ifNull(user_id, ''), '^u_[0-9a-f]{32}$'), assumeNotNull(user_id), "
    "ifNull(user_id, '') != '', '', ifNull(session_id, ''))"
)
_OPINION_SQL = (
    f"if(ifNull(interaction_id, '') != '' AND type IN {_EXPLICIT_SQL} AND rater != '', "
    "concat(assumeNotNull(interaction_id), '|', rater, '|', toString(type)), event_id)"
)
_CURRENT_COLUMNS = (
    "event_id, ts, source, type, severity, user_id, session_id, interaction_id, model_version, prompt_version, "
    "value, confidence, sample_rate, text_dropped, propagation_weight, tags, idempotency_key, payload_text, "
    "payload_comment, corrected_response, payload, hash, kafka_partition, kafka_offset, ingested_at"
)
_CURRENT_SELECT = (
    f"SELECT {_CURRENT_COLUMNS}, {_RATER_SQL} AS rater, {_OPINION_SQL} AS opinion_key "
    "FROM {db}.feedback_events WHERE payload['superseded_by'] = ''"
)
_SUPERSEDES = (
    "supersedes Nullable(String) ALIAS nullIf(payload['supersedes'], '') "
    "COMMENT 'the event_id of the revision this one replaces (docs/stream.md); NULL for a first opinion'"
)
MIGRATIONS += (
    Migration(
        20,
        "feedback_current: the latest revision of each opinion",
        (
            f"ALTER TABLE {{db}}.feedback_events ADD COLUMN IF NOT EXISTS {_SUPERSEDES}",
            f"""
            CREATE TABLE IF NOT EXISTS {{db}}.feedback_current
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
                sample_rate         Nullable(Float64),
                text_dropped        Bool DEFAULT false,
                propagation_weight  Nullable(Float64),
                tags                Array(LowCardinality(String)),
                idempotency_key     Nullable(String),
                payload_text        Nullable(String),
                payload_comment     Nullable(String),
                corrected_response  Nullable(String),
                payload             Map(String, String) COMMENT 'non-text payload values, JSON-encoded',
                hash                String,
                kafka_partition     UInt32,
                kafka_offset        UInt64,
                ingested_at         DateTime64(3, 'UTC') DEFAULT now64(3),
                rater               String COMMENT 'pseudonymized user_id, else session_id, else client pseudonym',
                opinion_key         String COMMENT 'interaction_id|rater|type for an explicit signal, else event_id',
                {_SUPERSEDES}
            )
            ENGINE = ReplacingMergeTree(ts)
            ORDER BY opinion_key
            SETTINGS non_replicated_deduplication_window = 10000
            """,
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.feedback_current_mv TO {{db}}.feedback_current AS "
            f"{_CURRENT_SELECT}",
            # Existing deployments: every event so far (a re-run adds rows that FINAL and merges collapse).
            # On a cluster this runs on the node the sink connects to: its shard's events (docs/stream.md).
            f"INSERT INTO {{db}}.feedback_current ({_CURRENT_COLUMNS}, rater, opinion_key) {_CURRENT_SELECT}",
        ),
    ),
)

# Rollups exact after a crash (docs/stream.md): the views feedback_daily_mv and
# interaction_stats_mv counted every inserted row, so events a restarted worker sent again were
# counted twice. Now each event is one row, keyed by its event id, in a ReplacingMergeTree
# (feedback_daily_rows, interaction_stats_rows: narrow, no TTL, like the rollups they replace), and
# feedback_daily and interaction_stats are views aggregating those rows FINAL: the same names and
# columns, each event counted once whatever was inserted twice. The old daily rollup is kept as
# feedback_daily_legacy (what it counted, repeats included, for days whose events have aged out);
# the old interaction_stats is dropped (interaction ids: `feedback forget` erases from the rows
# table only). The new rows are filled from feedback_events.
_DAILY_ROW = (
    "toDate(ts) AS day, source, type, ifNull(model_version, '') AS model_version, "
    "ifNull(prompt_version, '') AS prompt_version, event_id, value, 1 / ifNull(sample_rate, 1) AS weight "
    "FROM {db}.feedback_events"
)
_INTERACTION_ROW = (
    "assumeNotNull(interaction_id) AS interaction_id, event_id, ts, type, value "
    "FROM {db}.feedback_events WHERE interaction_id IS NOT NULL"
)
MIGRATIONS += (
    Migration(
        21,
        "rollups over deduplicated rows",
        (
            "DROP VIEW IF EXISTS {db}.feedback_daily_mv",
            "DROP VIEW IF EXISTS {db}.interaction_stats_mv",
            "RENAME TABLE {db}.feedback_daily TO {db}.feedback_daily_legacy",
            "DROP TABLE IF EXISTS {db}.interaction_stats",
            """
            CREATE TABLE IF NOT EXISTS {db}.feedback_daily_rows
            (
                day             Date,
                source          LowCardinality(String),
                type            LowCardinality(String),
                model_version   LowCardinality(String),
                prompt_version  LowCardinality(String),
                event_id        String,
                value           Nullable(Float64),
                weight          Float64 COMMENT '1 / sample_rate'
            )
            ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMM(day)
            ORDER BY (day, source, type, model_version, prompt_version, event_id)
            SETTINGS non_replicated_deduplication_window = 10000
            """,
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.feedback_daily_rows_mv TO {{db}}.feedback_daily_rows AS "
            f"SELECT {_DAILY_ROW}",
            f"INSERT INTO {{db}}.feedback_daily_rows SELECT {_DAILY_ROW}",
            """
            CREATE VIEW IF NOT EXISTS {db}.feedback_daily AS
            SELECT
                day, source, type, model_version, prompt_version,
                count() AS events,
                sum(ifNull(value, 0)) AS value_sum,
                countIf(value IS NOT NULL) AS value_count,
                sum(weight) AS weighted_events,
                countIf(type = 'thumbs' AND value > 0) AS thumbs_up,
                countIf(type = 'thumbs' AND value < 0) AS thumbs_down
            FROM {db}.feedback_daily_rows FINAL
            GROUP BY day, source, type, model_version, prompt_version
            """,
            """
            CREATE TABLE IF NOT EXISTS {db}.interaction_stats_rows
            (
                interaction_id  String,
                event_id        String,
                ts              DateTime64(6, 'UTC'),
                type            LowCardinality(String),
                value           Nullable(Float64)
            )
            ENGINE = ReplacingMergeTree
            ORDER BY (interaction_id, event_id)
            SETTINGS non_replicated_deduplication_window = 10000
            """,
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.interaction_stats_rows_mv TO {{db}}.interaction_stats_rows "
            f"AS SELECT {_INTERACTION_ROW}",
            f"INSERT INTO {{db}}.interaction_stats_rows SELECT {_INTERACTION_ROW}",
            """
            CREATE VIEW IF NOT EXISTS {db}.interaction_stats AS
            SELECT
                interaction_id,
                count() AS feedback_count,
                sum(ifNull(value, 0)) AS value_sum,
                countIf(value IS NOT NULL) AS value_count,
                min(ts) AS first_at,
                max(ts) AS last_at,
                max((ts, toString(type), value)) AS last
            FROM {db}.interaction_stats_rows FINAL
            GROUP BY interaction_id
            """,
        ),
        while_table={
            2: ("feedback_daily", "engine", "SummingMergeTree"),
            3: ("interaction_stats", "engine", "AggregatingMergeTree"),
        },
    ),
)

# rejected_events and dlq_events exact after re-inserts: both were keyed by the refused message's
# (topic, partition, offset) alone, so the items of one envelope collapsed into one row; and
# dlq_events was partitioned by the time of dead-lettering, which a replay changes (two partitions
# never merge). Rebuilt with keys that name the item (the event id; the envelope item of the error)
# and, for dead letters, no partitions; the rows are copied, the tables swapped (EXCHANGE), rows
# that arrived meanwhile copied again (repeats collapse), the old table dropped.
_REJECTED_COLUMNS = (
    "event_id, source, type, ts, hash, reason, field, rule, topic, partition, offset, rejected_at, ingested_at"
)
_DLQ_COLUMNS = "ts, stage, error, topic, partition, offset, raw_bytes, ingested_at"
_OLD_KEY = "topic, partition, offset"


def _rebuild(table: str, columns: str) -> tuple[str, ...]:
    """Copy ``table`` into ``<table>_next``, swap the two, copy what came meanwhile, drop the old."""
    return (
        f"INSERT INTO {{db}}.{table}_next ({columns}) SELECT {columns} FROM {{db}}.{table}",
        f"EXCHANGE TABLES {{db}}.{table} AND {{db}}.{table}_next",
        f"INSERT INTO {{db}}.{table} ({columns}) SELECT {columns} FROM {{db}}.{table}_next",
        f"DROP TABLE IF EXISTS {{db}}.{table}_next",
    )


MIGRATIONS += (
    Migration(
        22,
        "rejected_events and dlq_events keyed per item",
        (
            """
            CREATE TABLE IF NOT EXISTS {db}.rejected_events_next
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
            ORDER BY (topic, partition, offset, event_id)
            SETTINGS non_replicated_deduplication_window = 10000
            """,
            *_rebuild("rejected_events", _REJECTED_COLUMNS),
            """
            CREATE TABLE IF NOT EXISTS {db}.dlq_events_next
            (
                ts            DateTime64(6, 'UTC'),
                stage         LowCardinality(String),
                error         String,
                topic         LowCardinality(String),
                partition     UInt32,
                offset        UInt64,
                raw_bytes     UInt32 COMMENT 'size of the original message; the bytes stay in Kafka',
                ingested_at   DateTime64(3, 'UTC') DEFAULT now64(3),
                item          UInt32 MATERIALIZED toUInt32OrZero(extract(error, '\\\\(envelope item (\\\\d+)\\\\)'))
                              COMMENT 'the envelope item that failed (0 for a single-event message)'
            )
            ENGINE = ReplacingMergeTree
            ORDER BY (topic, partition, offset, stage, item)
            SETTINGS non_replicated_deduplication_window = 10000
            """,
            *_rebuild("dlq_events", _DLQ_COLUMNS),
        ),
        while_table={
            1: ("rejected_events", "sorting_key", _OLD_KEY),
            2: ("rejected_events", "sorting_key", _OLD_KEY),
            3: ("rejected_events_next", "sorting_key", _OLD_KEY),
            6: ("dlq_events", "sorting_key", _OLD_KEY),
            7: ("dlq_events", "sorting_key", _OLD_KEY),
            8: ("dlq_events_next", "sorting_key", _OLD_KEY),
        },
    ),
)

# feedback_current has every column of feedback_events: the interaction_* ALIAS columns too.
MIGRATIONS += (
    Migration(
        23,
        "feedback_current interaction context",
        tuple(
            f"ALTER TABLE {{db}}.feedback_current ADD COLUMN IF NOT EXISTS {name} {type_} ALIAS {expr} "
            f"COMMENT '{comment}'"
            for name, type_, expr, comment in _ALIASES
        ),
    ),
)

# Interactions as track() published them, so the gateway can answer for one (its context
# beside its feedback stats). ORDER BY interaction_id: a lookup reads one granule. The
# stream's rule for a re-tracked id is the latest ts (ties: the later offset); the version
# column makes merges keep that row, and readers order by (ts, kafka_offset) to see it before.
MIGRATIONS += (
    Migration(
        30,
        "interactions",
        (
            """
            CREATE TABLE IF NOT EXISTS {db}.interactions
            (
                interaction_id   String,
                ts               DateTime64(6, 'UTC') COMMENT 'when the interaction happened',
                source           LowCardinality(String),
                model_version    LowCardinality(Nullable(String)),
                prompt_version   LowCardinality(Nullable(String)),
                prompt           Nullable(String) COMMENT 'redacted snapshot; only with ALLOW_TEXT',
                response         Nullable(String) COMMENT 'redacted snapshot; only with ALLOW_TEXT',
                latency_ms       Nullable(Float64),
                cost             Nullable(Float64),
                kafka_partition  UInt32,
                kafka_offset     UInt64,
                ingested_at      DateTime64(3, 'UTC') DEFAULT now64(3)
            )
            ENGINE = ReplacingMergeTree(ts)
            ORDER BY interaction_id
            SETTINGS non_replicated_deduplication_window = 10000
            """,
        ),
    ),
)

# interaction_stats counted feedback that names no interaction, as interaction '': in the rows
# view, `assumeNotNull(interaction_id) AS interaction_id` shadows the column, so its
# `WHERE interaction_id IS NOT NULL` tested the alias (never NULL). The fault suite found it (the
# rollup's sum exceeded the events naming an interaction). The qualified name is the column; the
# rows written for '' go (an interaction id is never empty: the gate refuses one).
MIGRATIONS += (
    Migration(
        31,
        "interaction_stats: only feedback that names an interaction",
        (
            "ALTER TABLE {db}.interaction_stats_rows_mv MODIFY QUERY SELECT "
            "assumeNotNull(interaction_id) AS interaction_id, event_id, ts, type, value "
            "FROM {db}.feedback_events WHERE isNotNull(feedback_events.interaction_id)",
            "ALTER TABLE {db}.interaction_stats_rows DELETE WHERE interaction_id = '' SETTINGS mutations_sync = 2",
        ),
    ),
)
