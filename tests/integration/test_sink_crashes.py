"""Each accepted event exactly once in ClickHouse and in the JSONL files, whatever crashes in between."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.kafka_admin import ensure_topics
from pipeline.localstack import EmbeddedClickHouse
from pipeline.settings import Settings
from producers.producer import FeedbackProducer
from producers.synthetic import generate_events
from schemas.serde import AvroSerde
from schemas.topics import Topics
from sinks.clickhouse import connect
from sinks.feedback_sink import EventSink, JsonlSink
from stream_processors.normalize import normalize
from tests.conftest import _free_port
from tests.integration.kafka_read import read_topic
from tests.integration.pipeline_procs import pipeline_process, wait_for

pytestmark = pytest.mark.integration


def _produce_clean(settings: Settings, n: int, seed: int) -> list[str]:
    """``n`` gate-shaped events on the clean topic; returns their ids."""
    serde = AvroSerde()
    topic = Topics(settings.topic_prefix).clean
    ids = []
    with FeedbackProducer(settings, topic=topic) as producer:
        for event in generate_events(n, seed=seed):
            record = normalize(event.to_avro())
            producer.send_raw(serde.encode(record), key=str(record["user_id"]).encode())
            ids.append(event.event_id)
    return ids


def _counts(settings: Settings) -> tuple[int, int]:
    client = connect(settings)
    db = settings.clickhouse_database
    if not client.command(f"EXISTS TABLE `{db}`.feedback_events"):
        return 0, 0
    plain = int(client.command(f"SELECT count() FROM `{db}`.feedback_events"))
    final = int(client.command(f"SELECT count() FROM `{db}`.feedback_events FINAL"))
    return plain, final


def _jsonl_ids(settings: Settings) -> Counter[str]:
    ids: Counter[str] = Counter()
    for path in sorted(settings.path.glob("feedback-*.jsonl")):
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"partial last line in {path.name}"
        ids.update(orjson.loads(line)["event_id"] for line in data.splitlines())
    return ids


def _run(sink: Any, until: Any, timeout: float = 120.0) -> None:
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not until():
            assert thread.is_alive(), f"{sink.name} sink died"
            assert time.monotonic() < deadline, f"{sink.name} sink timed out"
            time.sleep(0.2)
    finally:
        sink.stop()
        thread.join(30)


def test_the_same_batches_delivered_twice_are_stored_once(isolated: Settings) -> None:
    settings = isolated.model_copy(update={"sink_batch_rows": 700})
    ensure_topics(settings)
    ids = _produce_clean(settings, 3000, seed=21)
    sink = EventSink(settings)
    _run(sink, lambda: _counts(settings)[0] >= 3000)
    assert sink.fast_batches > 0  # the Avro fast path did the work
    # Everything again, from the start, as a sink that lost its offsets would: same batches, same tokens.
    again = EventSink(settings.model_copy(update={"sink_group": settings.sink_group + "-again"}))
    _run(again, lambda: again.rows_written >= 3000)
    assert _counts(settings) == (3000, 3000)  # without FINAL too: nothing was inserted twice
    client = connect(settings)
    landed = {
        r[0] for r in client.query(f"SELECT event_id FROM `{settings.clickhouse_database}`.feedback_events").result_rows
    }
    assert landed == set(ids)
    rollup = int(client.command(f"SELECT sum(events) FROM `{settings.clickhouse_database}`.feedback_daily"))
    assert rollup == 3000  # the rollups saw each event once too


def test_fast_path_rows_equal_the_python_path(isolated: Settings) -> None:
    ensure_topics(isolated)
    _produce_clean(isolated, 300, seed=22)
    fast = EventSink(isolated)
    _run(fast, lambda: _counts(isolated)[0] >= 300)
    assert fast.fast_batches > 0
    slow_settings = isolated.model_copy(
        update={"sink_group": "python-path", "clickhouse_database": isolated.clickhouse_database + "_py"}
    )
    slow = EventSink(slow_settings)
    slow._fast_header = None  # force the Python path
    _run(slow, lambda: _counts(slow_settings)[0] >= 300)
    client = connect(isolated)
    cols = (
        "event_id, ts, source, type, severity, user_id, value, confidence, tags, payload_text, payload_comment,"
        " corrected_response, hash, kafka_partition, kafka_offset, text_dropped"
    )
    q = "SELECT {cols}, mapKeys(payload) FROM `{db}`.feedback_events ORDER BY event_id"
    a = client.query(q.format(cols=cols, db=isolated.clickhouse_database)).result_rows
    b = client.query(q.format(cols=cols, db=slow_settings.clickhouse_database)).result_rows
    assert a == b and len(a) == 300


def test_sink_killed_with_sigkill_leaves_exact_jsonl_and_clickhouse(isolated: Settings, tmp_path: Path) -> None:
    settings = isolated.model_copy(
        update={"sink_batch_rows": 500, "sink_batch_ms": 100, "kafka_session_timeout_s": 6.0}
    )
    ensure_topics(settings)
    n = 20_000
    ids = _produce_clean(settings, n, seed=23)
    kills = 0
    for attempt in range(4):
        with pipeline_process(settings, "sink", tmp_path / f"sink-{attempt}.log") as sink:
            if attempt < 3:
                target = n * (attempt + 1) // 4
                wait_for(lambda t=target: sum(_jsonl_ids(settings).values()) >= t, 120, f"{target} lines", [sink])
                sink.kill()  # mid-stream: batches in flight in both sinks
                sink.wait(10)
                kills += 1
                continue
            wait_for(
                lambda: _counts(settings)[0] >= n and sum(_jsonl_ids(settings).values()) >= n, 180, "all rows", [sink]
            )
            time.sleep(2.0)
    assert kills == 3
    lines = _jsonl_ids(settings)
    assert set(lines) == set(ids) and max(lines.values()) == 1
    assert _counts(settings) == (n, n)


def test_clickhouse_down_mid_stream_loses_nothing(isolated: Settings, tmp_path: Path) -> None:
    # A private ClickHouse, so stopping it disturbs no other test.
    private = isolated.model_copy(
        update={"state_dir": tmp_path / "ch", "clickhouse_port": _free_port(), "sink_batch_rows": 1000}
    )
    clickhouse = EmbeddedClickHouse(private)
    clickhouse.start()
    try:
        ensure_topics(private)
        first = _produce_clean(private, 2000, seed=24)
        sink = EventSink(private)
        thread = threading.Thread(target=sink.run, daemon=True)
        thread.start()
        wait_for(lambda: _counts(private)[0] >= 2000, 60, "the first events")
        clickhouse.stop()
        second = _produce_clean(private, 3000, seed=25)
        time.sleep(4.0)  # the sink retries with backoff while ClickHouse is away
        assert thread.is_alive()
        clickhouse.start()
        wait_for(lambda: _counts(private)[0] >= 5000, 120, "the events produced while ClickHouse was down")
        sink.stop()
        thread.join(30)
        assert _counts(private) == (5000, 5000)
        landed = {
            r[0]
            for r in connect(private)
            .query(f"SELECT event_id FROM `{private.clickhouse_database}`.feedback_events")
            .result_rows
        }
        assert landed == set(first) | set(second)
    finally:
        clickhouse.stop()


def test_a_row_clickhouse_refuses_goes_to_the_dlq_and_the_rest_lands(isolated: Settings) -> None:
    ensure_topics(isolated)
    serde = AvroSerde()
    topic = Topics(isolated.topic_prefix).clean
    events = [normalize(e.to_avro()) for e in generate_events(20, seed=26)]
    # A value outside [-1, 1]: valid Avro, refused by the table's constraint.
    events[7] = {**events[7], "value": 5.0}
    with FeedbackProducer(isolated, topic=topic) as producer:
        for record in events:
            producer.send_raw(serde.encode(record), key=b"k")
    sink = EventSink(isolated)
    _run(sink, lambda: _counts(isolated)[0] >= 19 and sink.dead_lettered >= 1)
    assert _counts(isolated) == (19, 19)
    letters = [
        AvroSerde("dead_letter_v1").decode(v) for _, v in read_topic(isolated, Topics(isolated.topic_prefix).dlq)
    ]
    assert len(letters) == 1 and letters[0]["stage"] == "sink" and "ClickHouse refused" in letters[0]["error"]
    assert letters[0]["offset"] == 7


def test_jsonl_sink_restarts_exactly_where_its_ledger_says(isolated: Settings) -> None:
    ensure_topics(isolated)
    ids = _produce_clean(isolated, 1000, seed=27)
    sink = JsonlSink(isolated.model_copy(update={"sink_batch_rows": 300}))
    _run(sink, lambda: sum(_jsonl_ids(isolated).values()) >= 1000)
    # A second sink in the same group resumes after the ledger and writes nothing more.
    again = JsonlSink(isolated)
    thread = threading.Thread(target=again.run, kwargs={"idle_exit_s": 4.0}, daemon=True)
    thread.start()
    thread.join(60)
    lines = _jsonl_ids(isolated)
    assert set(lines) == set(ids) and max(lines.values()) == 1
