"""Every ClickHouse store exact when rows arrive twice (a restarted worker sends events again, in
other batches), on the embedded store: the rollups, feedback_current, rejected_events and
dlq_events; and the migrations that move an existing deployment there."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import sinks.migrations as migrations
from pipeline.settings import Settings
from producers.synthetic import generate_events
from schemas.serde import AvroSerde
from sinks.clickhouse import EVENT_COLUMNS, ClickHouseWriter, connect, event_row
from sinks.feedback_sink import REJECTED_COLUMNS, DeadLetterSink, rejected_row
from sinks.migrations import MIGRATIONS, migrate
from stream_processors.normalize import normalize

pytestmark = pytest.mark.integration

N = 400
NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)


def _events(n: int = N) -> list[dict[str, Any]]:
    serde = AvroSerde()
    records = [normalize(serde.decode(serde.encode(e.to_avro()))) for e in generate_events(n, seed=11, now=NOW)]
    for i, r in enumerate(records):
        r["interaction_id"] = f"chat-{i % 50}"  # several events per interaction
    return records


def _rejections() -> list[list[Any]]:
    """Five refusals; two are items of one envelope (the same raw offset)."""
    rows = []
    for i, (offset, event_id) in enumerate([(1, "r1"), (2, "r2"), (3, "r3a"), (3, "r3b"), (4, "r4")]):
        record = {
            "event_id": event_id, "source": "ui", "type": "thumbs", "ts": NOW, "hash": f"h{i}",
            "reason": "rate_limited", "field": "", "rule": "over the limit", "topic": "raw", "partition": 0,
            "offset": offset, "rejected_at": NOW,
        }  # fmt: skip
        rows.append(rejected_row(record))
    return rows


def _letters(when: datetime) -> list[list[Any]]:
    """Three dead letters, two of them items of one envelope; ``when``: the time of dead-lettering,
    which a replay changes."""
    return [
        [when, "decode", "not avro", "raw", 0, 7, 10],
        [when, "gate", "ValueError in gate (envelope item 0)", "raw", 0, 8, 900],
        [when, "gate", "ValueError in gate (envelope item 3)", "raw", 0, 8, 900],
    ]


def _insert_everything(client: Any, db: str, records: list[dict[str, Any]], round_: int) -> None:
    """One delivery of everything; each round under other batch tokens, as after a crash."""
    events = ClickHouseWriter(client, db, "feedback_events", EVENT_COLUMNS)
    rows = [event_row(r, 0, i) for i, r in enumerate(records)]
    half = len(rows) // 2
    events.insert(rows[:half], f"events:{round_}:a")
    events.insert(rows[half:], f"events:{round_}:b")
    ClickHouseWriter(client, db, "rejected_events", REJECTED_COLUMNS).insert(_rejections(), f"rejected:{round_}")
    when = NOW + timedelta(days=40 * round_)  # the replay's dead letters are a month later
    ClickHouseWriter(client, db, "dlq_events", DeadLetterSink.COLUMNS).insert(_letters(when), f"dlq:{round_}")


def _sums(client: Any, db: str) -> dict[str, int]:
    one = lambda sql: int(client.command(sql.replace("{db}", f"`{db}`")))  # noqa: E731
    return {
        "daily": one("SELECT sum(events) FROM {db}.feedback_daily"),
        "daily_weighted": round(float(client.command(f"SELECT sum(weighted_events) FROM `{db}`.feedback_daily"))),
        "interactions": one("SELECT sum(feedback_count) FROM {db}.interaction_stats"),
        "interaction_rows": one("SELECT count() FROM {db}.interaction_stats"),
        "current": one("SELECT count() FROM {db}.feedback_current FINAL"),
        "rejected": one("SELECT count() FROM {db}.rejected_events FINAL"),
        "dlq": one("SELECT count() FROM {db}.dlq_events FINAL"),
    }


def _optimized(client: Any, db: str) -> dict[str, int]:
    """Plain counts after every table is merged (no FINAL)."""
    for table in ("feedback_events", "feedback_current", "feedback_daily_rows", "interaction_stats_rows",
                  "rejected_events", "dlq_events"):  # fmt: skip
        client.command(f"OPTIMIZE TABLE `{db}`.{table} FINAL")
    tables = ("feedback_events", "feedback_current", "rejected_events", "dlq_events")
    return {t: int(client.command(f"SELECT count() FROM `{db}`.{t}")) for t in tables}


def test_every_store_counts_an_event_inserted_twice_once(isolated: Settings) -> None:
    db = isolated.clickhouse_database
    migrate(connect(isolated), isolated)
    client = connect(isolated, db)
    records = _events()
    for round_ in range(2):
        _insert_everything(client, db, records, round_)

    # Without the gate's payload['rater'] and with raw user ids, every synthetic event is its own opinion.
    want = {"daily": N, "daily_weighted": N, "interactions": N, "interaction_rows": 50, "current": N,
            "rejected": 5, "dlq": 3}  # fmt: skip
    assert _sums(client, db) == want
    assert int(client.command(f"SELECT count() FROM `{db}`.feedback_events")) == 2 * N  # really inserted twice
    assert _optimized(client, db) == {"feedback_events": N, "feedback_current": N, "rejected_events": 5,
                                      "dlq_events": 3}  # fmt: skip
    assert _sums(client, db) == want

    def columns(table: str) -> set[str]:
        sql = f"SELECT name FROM system.columns WHERE database = '{db}' AND table = '{table}'"
        return {r[0] for r in client.query(sql).result_rows}

    assert columns("feedback_current") == columns("feedback_events") | {"rater", "opinion_key"}  # every column

    # The rollups agree with the deduplicated events, column by column.
    daily = client.query(
        "SELECT sum(value_count), round(sum(value_sum), 6), sum(thumbs_up), sum(thumbs_down) FROM feedback_daily"
    ).result_rows
    base = client.query(
        "SELECT countIf(value IS NOT NULL), round(sum(ifNull(value, 0)), 6), countIf(type = 'thumbs' AND value > 0),"
        " countIf(type = 'thumbs' AND value < 0) FROM feedback_events FINAL"
    ).result_rows
    assert daily == base
    last = dict(client.query("SELECT interaction_id, max(last).2 FROM interaction_stats GROUP BY interaction_id")
                .result_rows)  # fmt: skip
    latest = {}
    for r in sorted(records, key=lambda r: r["ts"]):
        latest[r["interaction_id"]] = r["type"]
    assert last == latest


def test_an_existing_deployment_moves_to_exact_rollups(isolated: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Migrations 20-23 on a database the old views counted repeats in: the rollups become exact,
    the old counts stay in *_legacy, feedback_current and the rebuilt tables hold every row, and a
    re-run of the statements (a crash before the ledger row) changes nothing."""
    db = isolated.clickhouse_database
    before = tuple(m for m in MIGRATIONS if m.version < 20)
    monkeypatch.setattr(migrations, "MIGRATIONS", before)
    migrate(connect(isolated), isolated)
    client = connect(isolated, db)
    records = _events()
    for round_ in range(2):
        _insert_everything(client, db, records, round_)
    assert int(client.command(f"SELECT sum(events) FROM `{db}`.feedback_daily")) == 2 * N  # the old overcount
    for table in ("rejected_events", "dlq_events"):  # merged: what the old keys kept of the envelopes
        client.command(f"OPTIMIZE TABLE `{db}`.{table} FINAL")
    assert int(client.command(f"SELECT count() FROM `{db}`.rejected_events")) == 4  # r3a and r3b: one row

    monkeypatch.setattr(migrations, "MIGRATIONS", MIGRATIONS)
    assert [v for v in migrate(client, isolated) if 20 <= v < 30] == [20, 21, 22, 23]
    after = _sums(client, db)
    assert (after["daily"], after["interactions"], after["current"]) == (N, N, N)
    assert (after["rejected"], after["dlq"]) == (4, 2)  # every row the old tables held, once
    assert int(client.command(f"SELECT sum(events) FROM `{db}`.feedback_daily_legacy")) == 2 * N
    engines = dict(client.query(f"SELECT name, engine FROM system.tables WHERE database = '{db}'").result_rows)
    assert engines["feedback_daily"] == "View" and engines["interaction_stats"] == "View"
    assert "rejected_events_next" not in engines and "dlq_events_next" not in engines

    for migration in MIGRATIONS:  # a re-run, as after a crash before the ledger rows
        if 20 <= migration.version < 30:
            for i, statement in enumerate(migration.statements):
                if i in migration.while_table and not migrations._table_is(client, db, *migration.while_table[i]):
                    continue
                client.command(migrations._render(statement, db))
    assert _sums(client, db) == after
    _insert_everything(client, db, records, 2)  # and a third delivery after the upgrade
    assert _sums(client, db) == {**after, "rejected": 5, "dlq": 3}  # the envelopes' items apart now
