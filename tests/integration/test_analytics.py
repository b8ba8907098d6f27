"""The analyst's schema on the embedded store: migrations, rollups, retention, and every
example query in docs/analytics.md."""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipeline.settings import Settings
from producers.synthetic import generate_events
from schemas.serde import AvroSerde
from schemas.state_records import BiasRecord, ReputationRecord
from sinks.clickhouse import EVENT_COLUMNS, ClickHouseWriter, connect, event_row
from sinks.migrations import MIGRATIONS, RETENTION, migrate, sync_retention
from stream_processors.normalize import normalize

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "analytics.md"
N = 3000
JOINED = 100


def _queries() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.S)


def _load(settings: Settings) -> tuple[Any, list[dict[str, Any]]]:
    assert migrate(connect(settings), settings) == [m.version for m in MIGRATIONS]
    client = connect(settings, settings.clickhouse_database)  # unqualified names, as an analyst types them
    assert migrate(client, settings) == []  # idempotent
    serde = AvroSerde()
    # Normalized as the gate leaves them (value and confidence set).
    records = [normalize(serde.decode(serde.encode(e.to_avro()))) for e in generate_events(N, seed=9)]
    for i, r in enumerate(records[:JOINED]):  # delayed feedback joined to its interaction, as the stream does
        r["payload"]["extra"].update(
            interaction_status="joined", interaction_latency_ms=float(400 * (i % 20)), interaction_cost=0.001,
            interaction_tracked_at="2026-11-20T12:00:00+00:00",
        )  # fmt: skip
    for r in records[JOINED : JOINED + 10]:
        r["payload"]["extra"]["interaction_status"] = "unknown"
    events = ClickHouseWriter(client, settings.clickhouse_database, "feedback_events", EVENT_COLUMNS)
    rows = [event_row(r, 0, i) for i, r in enumerate(records)]
    for _ in range(2):  # the same batch delivered twice: the table and the rollups hold it once
        events.insert(rows[: N // 2], "test:events:0:0-1499")
        events.insert(rows[N // 2 :], "test:events:0:1500-2999")

    now = datetime.now(UTC)
    rejected = [
        ["e1", "dream_ui", "thumbs", now, "h1", "invalid", "ts", "more than 300s in the future", "raw", 0, 1, now],
        ["e2", "dream_ui", "thumbs", now, "h2", "rate_limited", "", "over the limit", "raw", 0, 2, now],
        ["e3", "oracle", "rating", None, "h3", "rate_limited", "", "over the limit", "raw", 1, 2, now],
    ]
    client.insert("rejected_events", rejected, database=settings.clickhouse_database, column_names=[
        "event_id", "source", "type", "ts", "hash", "reason", "field", "rule", "topic", "partition", "offset",
        "rejected_at"])  # fmt: skip
    reps = [ReputationRecord("mesh", 0.3, 40, True, 0.3), ReputationRecord("oracle", 0.95, 40, False, 1.0)]
    client.insert(
        "reputation_history",
        [[r.source, r.score, r.observations, r.downweighted, r.weight, now, 0, i] for i, r in enumerate(reps)],
        database=settings.clickhouse_database,
        column_names=["source", "score", "observations", "downweighted", "weight", "published_at",
                      "kafka_partition", "kafka_offset"],
    )  # fmt: skip
    bias = BiasRecord("increase_grounding", None, 0.4, (now - timedelta(hours=1)).timestamp(), 3600.0, 9)
    client.insert(
        "directive_bias_history",
        [[bias.directive, bias.model_version, bias.value, bias.updated_at, bias.half_life_s, bias.events, now, 0, 0]],
        database=settings.clickhouse_database,
        column_names=["directive", "model_version", "value", "updated_at", "half_life_s", "events", "published_at",
                      "kafka_partition", "kafka_offset"],
    )  # fmt: skip
    return client, records


def test_rollups_and_example_queries(isolated: Settings) -> None:
    client, records = _load(isolated)
    db = isolated.clickhouse_database
    assert int(client.command(f"SELECT count() FROM `{db}`.feedback_events")) == N  # no FINAL needed

    # Rollups agree with the base table (and saw each event once despite the second delivery).
    daily = client.query("SELECT sum(events), sum(thumbs_up), sum(thumbs_down), sum(value_count) FROM feedback_daily")
    base = client.query(
        "SELECT count(), countIf(type = 'thumbs' AND value > 0), countIf(type = 'thumbs' AND value < 0),"
        " countIf(value IS NOT NULL) FROM feedback_events FINAL"
    )
    assert daily.result_rows == base.result_rows and daily.result_rows[0][0] == N
    per_interaction = client.query(
        "SELECT interaction_id, sum(feedback_count), max(last).2, max(last).3, max(last_at) FROM interaction_stats"
        " GROUP BY interaction_id"
    ).result_rows
    assert len(per_interaction) == N and all(row[1] == 1 for row in per_interaction)
    want = {r["interaction_id"]: (r["type"], r["value"], r["ts"].replace(tzinfo=None)) for r in records}
    assert all(want[i] == (t, v, at) for i, _, t, v, at in per_interaction)

    queries = _queries()
    assert len(queries) >= 9
    results = [client.query(q) for q in queries]
    for q, result in zip(queries, results, strict=True):
        assert result.result_rows, f"no rows for:\n{q}"

    by_reason = {(r[0], r[1]): r[2] for r in results[4].result_rows}
    assert by_reason == {("rate_limited", ""): 2, ("invalid", "ts"): 1}
    model_rows = {r[0]: r[1] for r in results[2].result_rows}
    assert model_rows == Counter(r["model_version"] for r in records)
    (bias_row,) = results[6].result_rows
    assert bias_row[0] == "increase_grounding" and bias_row[2] == pytest.approx(0.2, abs=0.01)  # one half-life on
    assert [r[0] for r in results[7].result_rows] == ["mesh"]
    statuses = {r[0]: r[1] for r in results[9].result_rows}
    week_ago = datetime.now(UTC) - timedelta(days=7)
    assert statuses["joined"] == sum(1 for r in records[:JOINED] if r["ts"] >= week_ago) > 0
    assert statuses.get("unknown") == sum(1 for r in records[JOINED : JOINED + 10] if r["ts"] >= week_ago)
    bands = {r[0]: r[1] for r in results[10].result_rows}
    assert bands == {"under 1 s": 15, "1-5 s": 50, "over 5 s": 35}


def test_retention_is_applied_changed_and_removed(isolated: Settings) -> None:
    client = connect(isolated)
    db = isolated.clickhouse_database
    migrate(client, isolated.model_copy(update={"clickhouse_retention_days": 30}))

    def ttl(table: str) -> str:
        ddl = str(
            client.command(f"SELECT create_table_query FROM system.tables WHERE database = '{db}' AND name = '{table}'")
        )
        m = re.search(r"TTL (.+?) SETTINGS", ddl)
        return m.group(1) if m else ""

    assert ttl("feedback_events") == "toDateTime(ts) + toIntervalDay(30)"
    assert ttl("rejected_events") == "toDateTime(rejected_at) + toIntervalDay(30)"
    assert sync_retention(client, db, 30) == []  # nothing to change
    assert sorted(sync_retention(client, db, 7)) == sorted(RETENTION)  # every table with a time-to-live
    assert ttl("dlq_events") == "toDateTime(ts) + toIntervalDay(7)" and ttl("interactions") == ttl("dlq_events")
    assert sorted(sync_retention(client, db, 0)) == sorted(RETENTION) and ttl("feedback_events") == ""


def test_interaction_stats_keeps_what_the_aggregate_states_held(
    isolated: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 11 on a database the argMaxState view has written to: old rows keep their counts
    and get their last feedback; later events (one arriving late, with an older ts) add to them;
    a re-run of the migration's statements changes nothing; a replayed batch counts once."""
    import sinks.migrations as migrations

    db = isolated.clickhouse_database
    before = tuple(m for m in MIGRATIONS if m.version < 11)
    monkeypatch.setattr(migrations, "MIGRATIONS", before)
    migrate(connect(isolated), isolated)
    client = connect(isolated, db)
    events = ClickHouseWriter(client, db, "feedback_events", EVENT_COLUMNS)
    serde = AvroSerde()
    records = [normalize(serde.decode(serde.encode(e.to_avro()))) for e in generate_events(6, seed=3)]
    base = datetime(2026, 11, 20, 12, tzinfo=UTC)
    for i, r in enumerate(records):
        r["interaction_id"], r["ts"] = ("chat-a" if i % 2 == 0 else "chat-b"), base + timedelta(minutes=i)
        r["value"] = (-1.0, 0.5, -0.5, None, 1.0, 0.25)[i]
    old, new = records[:4], records[4:]
    events.insert([event_row(r, 0, i) for i, r in enumerate(old)], "t:0:0-3")  # through the old view

    upto_11 = tuple(m for m in MIGRATIONS if m.version <= 11)
    monkeypatch.setattr(migrations, "MIGRATIONS", upto_11)
    assert migrate(client, isolated) == [11]
    late = {**old[0], "event_id": "late", "ts": base - timedelta(hours=1), "type": "correction", "value": 0.0}
    for _ in range(2):  # delivered twice: counted once
        events.insert([event_row(r, 0, 4 + i) for i, r in enumerate([*new, late])], "t:0:4-6")
    m11 = upto_11[-1]
    for i, statement in enumerate(m11.statements):  # a re-run, as after a crash before the ledger row
        if i not in m11.while_column or migrations._has_column(client, db, *m11.while_column[i]):
            client.command(migrations._render(statement, db))

    def stats() -> dict[str, tuple[Any, ...]]:
        rows = client.query(
            "SELECT interaction_id, sum(feedback_count), sum(value_sum), sum(value_count), min(first_at), max(last_at),"
            " max(last).2, max(last).3 FROM interaction_stats GROUP BY interaction_id"
        ).result_rows
        return {r[0]: tuple(r[1:]) for r in rows}

    def naive(t: datetime) -> datetime:
        return t.replace(tzinfo=None)

    everything = [*records, late]
    want = {}
    for chat in ("chat-a", "chat-b"):
        mine = [r for r in everything if r["interaction_id"] == chat]
        values = [r["value"] for r in mine if r["value"] is not None]
        last = max(mine, key=lambda r: r["ts"])
        want[chat] = (len(mine), pytest.approx(sum(values)), len(values), naive(min(r["ts"] for r in mine)),
                      naive(last["ts"]), last["type"], last["value"])  # fmt: skip
    assert stats() == want
    client.command(f"OPTIMIZE TABLE `{db}`.interaction_stats FINAL")  # merged: the same answers
    assert stats() == want
    assert int(client.command(f"SELECT count() FROM `{db}`.interaction_stats")) == 2
    # Migration 21: interaction_stats becomes a view over one row per event, filled from the events.
    monkeypatch.setattr(migrations, "MIGRATIONS", MIGRATIONS)
    assert 21 in migrate(client, isolated)
    assert stats() == want
