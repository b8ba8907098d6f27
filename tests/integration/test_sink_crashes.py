"""Each accepted event exactly once in ClickHouse and in the JSONL files, whatever crashes in between."""

from __future__ import annotations

import gzip
import logging
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
from sinks import feedback_sink
from sinks.clickhouse import EVENT_COLUMNS, connect
from sinks.feedback_sink import EventSink, JsonlSink
from sinks.jsonl import Ledger
from sinks.migrations import migrate
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


def _no_merges(settings: Settings) -> None:
    """Keep this test's feedback_events unmerged (no part may grow past 1 byte by merging), so a
    row inserted twice stays in ``count()`` without FINAL: ReplacingMergeTree merges would hide it
    sooner or later, and the rollups count each event id once (migration 21)."""
    client = connect(settings)
    migrate(client, settings)
    client.command(
        f"ALTER TABLE `{settings.clickhouse_database}`.feedback_events "
        "MODIFY SETTING max_bytes_to_merge_at_max_space_in_pool = 1"
    )


def _inserted(settings: Settings) -> int:
    """Every row ever inserted into feedback_events, repeats included (after :func:`_no_merges`);
    a block ClickHouse deduplicated by its token is not among them."""
    return _counts(settings)[0]


def _jsonl_ids(settings: Settings, *, allow_partial: bool = False) -> Counter[str]:
    """Event ids in the JSONL files (``.jsonl`` and ``.jsonl.gz``), with how often each appears."""
    ids: Counter[str] = Counter()
    for path in sorted(settings.path.glob("feedback-*.jsonl*")):
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        if allow_partial:
            data = data[: data.rfind(b"\n") + 1]
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


class _Killed(BaseException):
    """A kill, as far as the sink can tell: nothing catches it, nothing after it runs."""


def _run_until_killed(sink: Any, timeout: float = 90.0) -> None:
    """Run ``sink`` in a thread until it is "killed" (raises :class:`_Killed`)."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            sink.run()
            outcome.append(None)
        except BaseException as exc:  # the kill, or a real failure to report
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        sink.stop()
        thread.join(30)
        raise AssertionError(f"{sink.name} sink was never killed")
    assert outcome and isinstance(outcome[0], _Killed), f"{sink.name} sink ended with {outcome!r}"


class _RecordingEventSink(EventSink):
    """Records each flushed batch's ranges; "killed" after inserting batch ``kill_after`` (1-based)."""

    def __init__(self, settings: Settings, kill_after: int | None = None) -> None:
        super().__init__(settings)
        self.kill_after = kill_after
        self.ranges: list[dict[int, tuple[int, int]]] = []

    def flush(self, messages: Any) -> None:
        ranges: dict[int, tuple[int, int]] = {}
        for m in messages:
            first, _ = ranges.get(m.partition(), (m.offset(), m.offset()))
            ranges[m.partition()] = (first, m.offset())
        self.ranges.append(ranges)
        super().flush(messages)
        if len(self.ranges) == self.kill_after:
            raise _Killed  # inserted; the offsets after it are never committed


def test_the_same_batch_delivered_twice_is_stored_once(isolated: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = isolated.model_copy(update={"sink_batch_rows": 700, "sink_batch_ms": 200})
    monkeypatch.setattr(feedback_sink, "INSERT_CHUNK_ROWS", 150)  # a partition's range goes in as 1-2 chunks
    ensure_topics(settings)
    _no_merges(settings)
    n = 3000
    ids = _produce_clean(settings, n, seed=21)

    # ClickHouse: killed after the second insert, before its commit, so that batch comes again.
    killed = _RecordingEventSink(settings, kill_after=2)
    _run_until_killed(killed)
    assert 0 < _counts(settings)[0] < n
    # Restarted with another batch size: only the intent makes the first batch the same again.
    again = _RecordingEventSink(settings.model_copy(update={"sink_batch_rows": 450}))
    _run(again, lambda: _counts(settings)[0] >= n and again.rows_written > 0)
    for partition, batch_range in killed.ranges[-1].items():  # rebuilt from the intents: same ranges, same tokens
        assert again.ranges[0].get(partition) == batch_range
    assert again.fast_batches > 0  # the Avro fast path did the work
    assert _counts(settings) == (n, n)  # without FINAL too: the repeat was dropped by ClickHouse
    client = connect(settings)
    db = settings.clickhouse_database
    landed = {r[0] for r in client.query(f"SELECT event_id FROM `{db}`.feedback_events").result_rows}
    assert landed == set(ids)
    assert _inserted(settings) == n  # never inserted twice, not merely merged away

    # JSONL: killed after writing and fsyncing a batch, before the ledger; then after the ledger,
    # before the Kafka commit. Each time the restarted sink leaves every line exactly once.
    jsonl_settings = settings.model_copy(update={"sink_batch_rows": 500})
    real_save = Ledger.save
    saves = {"n": 0}

    def save_then_die(self: Ledger, directory: Path) -> None:
        saves["n"] += 1
        if saves["n"] == 3:  # the ledger write after the second batch (the first is the writer's start)
            raise _Killed
        real_save(self, directory)

    monkeypatch.setattr(Ledger, "save", save_then_die)
    first = JsonlSink(jsonl_settings)
    _run_until_killed(first)
    monkeypatch.setattr(Ledger, "save", real_save)
    assert 0 < sum(_jsonl_ids(settings, allow_partial=True).values()) < n

    class DiesBeforeCommit(JsonlSink):
        def _commit_done(self, batch: Any) -> None:
            raise _Killed  # the ledger says the batch is written; Kafka never hears of it

    second = DiesBeforeCommit(jsonl_settings)
    _run_until_killed(second)
    third = JsonlSink(jsonl_settings)
    _run(third, lambda: sum(_jsonl_ids(settings, allow_partial=True).values()) >= n)
    time.sleep(1.0)
    lines = _jsonl_ids(settings)
    assert set(lines) == set(ids) and max(lines.values()) == 1


def test_killed_between_the_chunks_of_a_batch(isolated: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch is inserted in chunks side by side; a kill after some of them landed leaves the
    intent, and the restarted sink cuts the same chunks: the landed ones are dropped as repeats."""
    settings = isolated.model_copy(update={"sink_batch_rows": 900, "sink_batch_ms": 300})
    monkeypatch.setattr(feedback_sink, "INSERT_CHUNK_ROWS", 100)
    ensure_topics(settings)
    _no_merges(settings)
    n = 2000
    ids = _produce_clean(settings, n, seed=23)
    landed: list[str] = []

    class DiesAfterOneChunk(EventSink):
        def _insert_chunk(self, partition: int, msgs: Any, token: str) -> int:
            if landed and self.rows_written:  # the second batch: one chunk lands, then the kill
                raise _Killed
            written = super()._insert_chunk(partition, msgs, token)
            if self.rows_written:
                landed.append(token)
            return written

    _run_until_killed(DiesAfterOneChunk(settings))
    assert landed and 0 < _counts(settings)[0] < n
    again = EventSink(settings.model_copy(update={"sink_batch_rows": 400}))
    _run(again, lambda: _counts(settings)[0] >= n and again.rows_written > 0)
    time.sleep(0.5)
    assert _counts(settings) == (n, n) and _inserted(settings) == n
    rows = connect(settings).query(f"SELECT event_id FROM `{settings.clickhouse_database}`.feedback_events")
    assert {r[0] for r in rows.result_rows} == set(ids)


@pytest.mark.parametrize("fast_path", ["native", "avro"])
def test_fast_path_rows_equal_the_python_path(isolated: Settings, fast_path: str) -> None:
    """Both fast paths (Native blocks built in C; the bodies under an Avro header, read by
    ClickHouse) store exactly the rows the Python path stores, payload values included."""
    ensure_topics(isolated)
    _produce_clean(isolated, 300, seed=22)
    fast = EventSink(isolated)
    assert fast._native is not None  # the extension is built: Native is the default fast path
    if fast_path == "avro":
        fast._native = None
    _run(fast, lambda: _counts(isolated)[0] >= 300)
    assert fast.fast_batches > 0
    assert not any(t.is_alive() for t in fast._inserts._threads)  # the run stopped its insert threads
    slow_settings = isolated.model_copy(
        update={"sink_group": "python-path", "clickhouse_database": isolated.clickhouse_database + "_py"}
    )
    slow = EventSink(slow_settings)
    slow._fast_header = None  # force the Python path
    _run(slow, lambda: _counts(slow_settings)[0] >= 300)
    assert slow.fast_batches == 0
    client = connect(isolated)
    columns = ", ".join(c for c in EVENT_COLUMNS if c != "payload")
    # ClickHouse's JSON for a float in the Avro path may differ from orjson's: keys only there.
    payload = "payload" if fast_path == "native" else "mapKeys(payload)"
    q = "SELECT {cols}, {payload} FROM `{db}`.feedback_events ORDER BY event_id"
    a = client.query(q.format(cols=columns, payload=payload, db=isolated.clickhouse_database)).result_rows
    b = client.query(q.format(cols=columns, payload=payload, db=slow_settings.clickhouse_database)).result_rows
    assert len(a) == 300 and a == b
    assert any(row[-1] for row in a)  # payload maps were compared, not only empty ones


def _kill_mid_insert(proc: Any, log: Path, delay_s: float, timeout: float = 15.0) -> None:
    """SIGKILL ``proc`` ``delay_s`` after its log shows a ClickHouse insert: inside the next batch's
    insert (~100 ms here), after its intent and before its commit (or after ``timeout``)."""
    with open(log, "rb") as fh:
        fh.seek(0, 2)
        deadline = time.monotonic() + timeout
        seen = b""
        while time.monotonic() < deadline and b"inserted sink=events" not in seen:
            seen = seen[-64:] + fh.read()
            time.sleep(0.002)
    time.sleep(delay_s)
    proc.kill()


def test_sink_killed_with_sigkill_leaves_exact_jsonl_and_clickhouse(isolated: Settings, tmp_path: Path) -> None:
    settings = isolated.model_copy(
        update={"sink_batch_rows": 500, "sink_batch_ms": 100, "kafka_session_timeout_s": 6.0}
    )
    ensure_topics(settings)
    _no_merges(settings)
    n = 20_000
    ids = _produce_clean(settings, n, seed=23)
    kills = 0
    for attempt, batch_rows in enumerate((500, 350, 650, 450)):
        # Another batch size at each restart: only the intents rebuild the batches in flight.
        run_settings = settings.model_copy(update={"sink_batch_rows": batch_rows})
        with pipeline_process(run_settings, "sink", tmp_path / f"sink-{attempt}.log") as sink:
            if attempt < 3:
                target = n * (attempt + 1) // 4
                wait_for(
                    lambda t=target: sum(_jsonl_ids(settings, allow_partial=True).values()) >= t,
                    120,
                    f"{target} lines",
                    [sink],
                )
                # SIGKILL while a ClickHouse insert is in flight, before its offsets are committed
                # (the JSONL sink is mid-batch too, somewhere).
                _kill_mid_insert(sink, tmp_path / f"sink-{attempt}.log", delay_s=0.03 + 0.02 * attempt)
                sink.wait(10)
                kills += 1
                continue
            wait_for(
                lambda: _counts(settings)[0] >= n and sum(_jsonl_ids(settings, allow_partial=True).values()) >= n,
                180,
                "all rows",
                [sink],
            )
            time.sleep(2.0)
    assert kills == 3
    lines = _jsonl_ids(settings)
    assert set(lines) == set(ids) and max(lines.values()) == 1
    assert _counts(settings) == (n, n)
    assert _inserted(settings) == n  # never inserted twice, not merely merged away
    # Batches of several partitions went in as one insert each (the replays too), not one by one.
    logs = b"".join((tmp_path / f"sink-{attempt}.log").read_bytes() for attempt in range(4))
    assert b"path=whole" in logs


def test_clickhouse_down_mid_stream_loses_nothing(isolated: Settings, tmp_path: Path) -> None:
    # A private ClickHouse, so stopping it disturbs no other test.
    private = isolated.model_copy(
        update={
            "state_dir": tmp_path / "ch",
            "clickhouse_port": _free_port(),
            "sink_batch_rows": 300,
            "sink_batch_ms": 100,
        }
    )
    clickhouse = EmbeddedClickHouse(private)
    clickhouse.start()
    sink: EventSink | None = None
    thread: threading.Thread | None = None
    try:
        ensure_topics(private)
        _no_merges(private)
        produced: list[str] = []
        producing = threading.Thread(
            target=lambda: [produced.extend(_produce_clean(private, 500, seed=240 + i)) for i in range(8)],
            daemon=True,
        )
        sink = EventSink(private)
        thread = threading.Thread(target=sink.run, daemon=True)
        thread.start()
        producing.start()
        wait_for(lambda: _counts(private)[0] >= 600, 60, "the first events")
        clickhouse.stop()  # while events flow and batches are being inserted
        assert _counts_or_none(private) is None
        time.sleep(4.0)  # the sink retries with backoff while ClickHouse is away; more events arrive
        assert thread.is_alive()
        producing.join(60)
        second = _produce_clean(private, 1000, seed=25)
        clickhouse.start()  # the same port and data folder
        n = len(produced) + len(second)
        assert n == 5000
        wait_for(lambda: _counts(private)[0] >= n, 120, "the events produced while ClickHouse was down")
        time.sleep(1.0)
        assert _counts(private) == (n, n)
        assert _inserted(private) == n
        landed = {
            r[0]
            for r in connect(private)
            .query(f"SELECT event_id FROM `{private.clickhouse_database}`.feedback_events")
            .result_rows
        }
        assert landed == set(produced) | set(second)
    finally:
        if sink is not None and thread is not None:
            sink.stop()
            thread.join(30)
        clickhouse.stop()


def _counts_or_none(settings: Settings) -> tuple[int, int] | None:
    try:
        return _counts(settings)
    except Exception:  # any failure to reach ClickHouse will do
        return None


def test_a_row_clickhouse_refuses_goes_to_the_dlq_and_the_rest_lands(
    isolated: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    ensure_topics(isolated)
    _no_merges(isolated)
    serde = AvroSerde()
    topic = Topics(isolated.topic_prefix).clean
    events = [normalize(e.to_avro()) for e in generate_events(20, seed=26)]
    # A value outside [-1, 1]: valid Avro, refused by the table's constraint.
    caplog.set_level(logging.DEBUG)
    secret = "refused-row-comment-must-not-be-logged"
    events[7] = {**events[7], "value": 5.0, "payload": {**events[7]["payload"], "comment": secret}}
    with FeedbackProducer(isolated, topic=topic) as producer:
        for record in events:
            producer.send_raw(serde.encode(record), key=b"k")
    sink = EventSink(isolated)
    _run(sink, lambda: _counts(isolated)[0] >= 19 and sink.dead_lettered >= 1)
    assert _counts(isolated) == (19, 19)
    assert _inserted(isolated) == 19
    letters = [
        AvroSerde("dead_letter_v1").decode(v) for _, v in read_topic(isolated, Topics(isolated.topic_prefix).dlq)
    ]
    assert len(letters) == 1 and letters[0]["stage"] == "sink" and "ClickHouse refused" in letters[0]["error"]
    assert "469" in letters[0]["error"] and "VIOLATED_CONSTRAINT" in letters[0]["error"]
    assert letters[0]["offset"] == 7
    assert secret not in caplog.text  # coordinates and reason in the log, never the row


def test_jsonl_sink_restarts_exactly_where_its_ledger_says(isolated: Settings) -> None:
    ensure_topics(isolated)
    ids = _produce_clean(isolated, 1000, seed=27)
    sink = JsonlSink(isolated.model_copy(update={"sink_batch_rows": 300}))
    _run(sink, lambda: sum(_jsonl_ids(isolated, allow_partial=True).values()) >= 1000)
    # A second sink in the same group resumes after the ledger and writes nothing more.
    again = JsonlSink(isolated)
    thread = threading.Thread(target=again.run, kwargs={"idle_exit_s": 4.0}, daemon=True)
    thread.start()
    thread.join(60)
    lines = _jsonl_ids(isolated)
    assert set(lines) == set(ids) and max(lines.values()) == 1
