"""The rejected sink's pure pieces: rows from ``rejected_v1`` records and migration 4."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

import pytest

from schemas.serde import AvroSerde
from sinks.feedback_sink import REJECTED_COLUMNS, RejectedSink, all_sinks, rejected_row
from sinks.migrations import MIGRATIONS, _qualify, apply_migrations

TS = datetime(2026, 11, 22, 23, 59, 59, 123456, tzinfo=UTC)
AT = datetime(2026, 11, 23, 0, 0, 1, tzinfo=UTC)


def _rejection(**kw: Any) -> dict[str, Any]:
    base = {
        "event_id": "e-1",
        "source": "dream_ui",
        "type": "thumbs",
        "ts": TS,
        "hash": "ab" * 16,
        "reason": "invalid",
        "field": "value",
        "rule": "must be between -1 and 1",
        "topic": "feedback.raw.v1",
        "partition": 2,
        "offset": 12345678901,
        "rejected_at": AT,
    }
    return {**base, **kw}


def _decoded(**kw: Any) -> dict[str, Any]:
    serde = AvroSerde("rejected_v1")
    return serde.decode(serde.encode(_rejection(**kw)))


def test_rejected_row_matches_columns_from_a_decoded_record() -> None:
    row = dict(zip(REJECTED_COLUMNS, rejected_row(_decoded()), strict=True))
    assert row == _rejection()
    # The raw message's coordinates are the row's identity.
    assert (row["topic"], row["partition"], row["offset"]) == ("feedback.raw.v1", 2, 12345678901)
    assert row["ts"].tzinfo is not None and row["rejected_at"].tzinfo is not None


@pytest.mark.parametrize("reason", ["invalid", "rate_limited", "duplicate"])
def test_rejected_row_keeps_the_reason(reason: str) -> None:
    row = dict(zip(REJECTED_COLUMNS, rejected_row(_decoded(reason=reason, field="")), strict=True))
    assert row["reason"] == reason
    assert row["field"] == ""


def test_rejected_row_null_or_unrepresentable_ts_becomes_null() -> None:
    assert rejected_row(_decoded(ts=None))[REJECTED_COLUMNS.index("ts")] is None
    far = datetime(9000, 1, 1, tzinfo=UTC)
    assert rejected_row(_decoded(ts=far))[REJECTED_COLUMNS.index("ts")] is None


def test_rejected_row_carries_no_payload_fields() -> None:
    assert set(REJECTED_COLUMNS) == {f["name"] for f in AvroSerde("rejected_v1").writer_schema["fields"]}
    assert not {"payload", "user_id", "client_ip", "payload_text"} & set(REJECTED_COLUMNS)


def test_migration_versions_strictly_increase() -> None:
    versions = [m.version for m in MIGRATIONS]
    assert versions == sorted(set(versions))
    assert versions[0] == 1
    assert all(b > a for a, b in pairwise(versions))


def _migration(version: int) -> Any:
    return next(m for m in MIGRATIONS if m.version == version)


def test_migration_4_creates_rejected_events_keyed_by_raw_coordinates() -> None:
    m4 = _migration(4)
    assert m4.name == "rejected_events"
    (ddl,) = m4.statements
    assert "CREATE TABLE IF NOT EXISTS rejected_events" in ddl
    assert "ReplacingMergeTree" in ddl
    assert re.search(r"ORDER BY \(topic, partition, offset\)", ddl)
    assert "PARTITION BY toYYYYMM(rejected_at)" in ddl
    columns = dict(re.findall(r"^\s{16}(\w+)\s+(.+?)(?:\s+COMMENT .*)?,?$", ddl, re.MULTILINE))
    assert set(REJECTED_COLUMNS) <= set(columns)
    assert columns["ts"] == "Nullable(DateTime64(6, 'UTC'))"
    assert columns["rejected_at"] == "DateTime64(6, 'UTC')"
    assert columns["offset"] == "Int64"
    for name in ("reason", "source", "type"):
        assert columns[name].startswith("LowCardinality(String)")
    assert _qualify(ddl, "db1").count("`db1`.rejected_events") == 1


class _FakeClient:
    """Records DDL; the ledger starts with versions 1-3 already applied."""

    def __init__(self, done: set[int]) -> None:
        self.done = done
        self.commands: list[str] = []
        self.inserted: list[list[Any]] = []

    def command(self, sql: str) -> None:
        self.commands.append(sql)

    def query(self, sql: str, **kw: Any) -> Any:
        return type("R", (), {"result_rows": [(v,) for v in self.done]})()

    def insert(self, table: str, rows: list[list[Any]], **kw: Any) -> None:
        self.inserted.extend(rows)


def test_apply_migrations_runs_only_what_a_version_3_database_lacks() -> None:
    client = _FakeClient({1, 2, 3})
    later = [m.version for m in MIGRATIONS if m.version > 3]
    assert apply_migrations(client, "db1") == later  # type: ignore[arg-type]
    assert any("CREATE TABLE IF NOT EXISTS `db1`.rejected_events" in c for c in client.commands)
    assert client.inserted[0] == [4, "rejected_events"]
    everything = {m.version for m in MIGRATIONS}
    assert apply_migrations(_FakeClient(everything), "db1") == []  # type: ignore[arg-type]


def test_all_sinks_runs_every_sink(monkeypatch: pytest.MonkeyPatch) -> None:
    import sinks.feedback_sink as fs
    import sinks.state_sinks as ss

    made: list[str] = []

    def fake(name: str) -> Any:
        return lambda settings: made.append(name) or name

    for module, cls, name in [
        (fs, "EventSink", "events"), (fs, "JsonlSink", "jsonl"), (fs, "DeadLetterSink", "dlq"),
        (fs, "RejectedSink", "rejected"), (ss, "ReputationHistorySink", "reputation"), (ss, "BiasHistorySink", "bias"),
        (ss, "TriageSink", "triage"), (ss, "InteractionSink", "interactions"),
    ]:  # fmt: skip
        monkeypatch.setattr(module, cls, fake(name))
    expected = {"events", "jsonl", "dlq", "rejected", "reputation", "bias", "triage", "interactions"}
    assert set(all_sinks(object())) == expected  # type: ignore[arg-type]
    assert RejectedSink.name == "rejected"
