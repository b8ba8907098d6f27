"""Pure pieces of the sinks: row and line building, JSONL files, batch tokens, topics."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from schemas import AvroSerde, FeedbackEvent, Topics
from schemas.topics import TOPICS
from sinks.clickhouse import EVENT_COLUMNS, event_row
from sinks.feedback_sink import batch_token
from sinks.jsonl import JsonlWriter, event_json

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _event(**kw: object) -> FeedbackEvent:
    base = {"source": "dream_ui", "type": "thumbs", "ts": "2026-11-22T23:59:59Z", "client_ip": "198.51.100.7"}
    return FeedbackEvent.model_validate({**base, **kw})


def test_event_row_matches_columns_and_drops_client_ip() -> None:
    record = AvroSerde().decode(AvroSerde().encode(_event(payload={"comment": "c", "stars": 4, "ok": True}).to_avro()))
    row = dict(zip(EVENT_COLUMNS, event_row(record, 3, 99), strict=True))
    assert row["payload_comment"] == "c"
    assert row["payload"] == {"stars": "4", "ok": "true"}
    assert (row["kafka_partition"], row["kafka_offset"]) == (3, 99)
    assert "198.51.100.7" not in repr(row)


def test_jsonl_writer_appends_by_utc_day_and_omits_client_ip(tmp_path: Path) -> None:
    serde = AvroSerde()
    records = [
        serde.decode(serde.encode(_event(ts=ts, payload={"comment": "x"}).to_avro()))
        for ts in ("2026-11-22T23:59:59Z", "2026-11-23T00:00:00Z", "2026-11-23T01:00:00+02:00")
    ]
    writer = JsonlWriter(tmp_path)
    assert writer.write(records) == 3
    assert writer.write(records[:1]) == 0 and writer.repeats == 1  # the same event id again: one line
    files = {p.name: p.read_bytes().splitlines() for p in tmp_path.glob("feedback-*")}
    assert sorted(files) == ["feedback-2026-11-22.jsonl", "feedback-2026-11-23.jsonl"]
    assert len(files["feedback-2026-11-22.jsonl"]) == 2  # 23:59:59Z, and 01:00+02:00 is 23:00Z
    assert len(files["feedback-2026-11-23.jsonl"]) == 1
    line = orjson.loads(files["feedback-2026-11-23.jsonl"][0])
    assert line["ts"] == "2026-11-23T00:00:00.000000Z"
    assert line["payload"] == {"comment": "x"}
    assert "client_ip" not in line
    assert line == event_json(records[1])


def test_batch_token_is_deterministic_per_partition_range() -> None:
    assert batch_token("t", "x", 1, 10, 20) == batch_token("t", "x", 1, 10, 20)
    assert batch_token("t", "x", 1, 10, 20) != batch_token("t", "x", 2, 10, 20)


def test_topic_specs() -> None:
    assert set(TOPICS) == {
        "feedback.raw.v1",
        "feedback.clean.v1",
        "feedback.rejected.v1",
        "feedback.dlq.v1",
        "feedback.outcomes.v1",
        "feedback.bias-input.v1",
        "feedback.directive-bias.v1",
        "feedback.reputation.v1",
        "feedback.triage.v1",
        "feedback.interactions.v1",
        "feedback.enrich.v1",
        "feedback.triage-commands.v1",
        "feedback.erasures.v1",
        "feedback.rewards-input.v1",
        "feedback.rewards.v1",
    }
    assert TOPICS["feedback.interactions.v1"].config()["cleanup.policy"] == "compact,delete"
    raw = TOPICS["feedback.raw.v1"].config()
    assert int(raw["retention.ms"]) <= 24 * 3600 * 1000
    assert raw["cleanup.policy"] == "delete"
    for name in ("feedback.directive-bias.v1", "feedback.reputation.v1", "feedback.triage.v1", "feedback.erasures.v1",
                 "feedback.rewards.v1"):  # fmt: skip
        assert TOPICS[name].config()["cleanup.policy"] == "compact"
    assert Topics("t1.").raw == "t1.feedback.raw.v1"
    with pytest.raises(KeyError):
        Topics().name("feedback.unknown.v1")
