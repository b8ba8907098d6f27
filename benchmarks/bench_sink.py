"""ClickHouse sink throughput: rows/s from Kafka into ClickHouse, against a bare insert.

Run with ``make bench`` (or ``python -m benchmarks.bench_sink --rows 200000``). It
starts a private local stack (Kafka KRaft + embedded ClickHouse) on free ports in
a temporary directory, then measures, in the same run:

* **bare**: ``clickhouse-connect`` inserting prebuilt rows of the same columns into
  ``feedback_events``, in batches of ``sink_batch_rows`` — the ceiling;
* **sink**: the real ``EventSink`` consuming the same events from
  ``feedback.clean.v1`` (intent commit, the message bodies under an Avro container
  header, ``INSERT ... SELECT FROM input()`` in chunks with their dedup tokens, offset
  commit; JSONL has its own sink and is not measured here). The clock starts when the first batch is durable, so
  consumer-group start-up is not counted, and stops when ClickHouse holds every row.
  The benchmark's own copies of the events are dropped (and the heap frozen) first, so
  garbage collections do not walk them while the sink runs in this process.

It prints a JSON line and appends it to ``benchmarks/results/bench_sink.jsonl``.
Targets (issue 5): sink at least 0.7 of bare, and ≥ 150,000 rows/s on the embedded store.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import free_port, record_result, stack
from benchmarks.procs import Child, tree_env
from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from producers.producer import FeedbackProducer
from producers.synthetic import generate_events
from schemas.serde import AvroSerde
from sinks.clickhouse import EVENT_COLUMNS, connect, event_row
from sinks.feedback_sink import EventSink
from sinks.migrations import migrate
from stream_processors.normalize import normalize


def bare_insert(settings: Settings, records: list[dict[str, Any]], batch: int) -> float:
    """Rows/s of clickhouse-connect inserting prebuilt rows (the same columns) in ``batch``-row inserts."""
    db = f"{settings.clickhouse_database}_bare"
    client = connect(settings)
    migrate(client, settings.model_copy(update={"clickhouse_database": db}))
    rows = [event_row(r, 0, i) for i, r in enumerate(records)]
    started = time.perf_counter()
    for i in range(0, len(rows), batch):
        client.insert("feedback_events", rows[i : i + batch], column_names=EVENT_COLUMNS, database=db)
    return len(rows) / (time.perf_counter() - started)


def sink_rate(settings: Settings, n: int) -> tuple[float, int]:
    """Rows/s of the EventSink from Kafka into ClickHouse, from its first durable batch to the last row."""
    sink = EventSink(settings)
    thread = threading.Thread(target=sink.run, kwargs={"idle_exit_s": 5.0}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 600
    while sink.rows_written == 0:
        if time.monotonic() > deadline or not thread.is_alive():
            raise SystemExit("the sink wrote nothing")
        time.sleep(0.005)
    first_rows, started = sink.rows_written, time.perf_counter()
    while sink.rows_written < n:
        if time.monotonic() > deadline or not thread.is_alive():
            raise SystemExit(f"the sink stopped at {sink.rows_written} of {n} rows")
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    sink.stop()
    thread.join(30)
    landed = int(connect(settings).command(f"SELECT count() FROM `{settings.clickhouse_database}`.feedback_events"))
    if landed != n:
        raise SystemExit(f"ClickHouse holds {landed} rows, expected {n}")
    return (n - first_rows) / elapsed, sink.batches


def measure(settings: Settings, rows: int) -> dict[str, Any]:
    """Bare insert and sink against a running stack (its clean topic, its database, which must
    be empty); the result line. The heap is frozen for the sink phase and unfrozen after."""
    serde = AvroSerde()
    events = list(generate_events(rows, seed=1))
    records = [normalize(serde.decode(serde.encode(e.to_avro()))) for e in events]
    ensure_topics(settings)
    with FeedbackProducer(settings, topic=f"{settings.topic_prefix}feedback.clean.v1") as producer:
        for record in records:
            producer.send_raw(serde.encode(record), key=record["source"].encode())
    bare = bare_insert(settings, records, settings.sink_batch_rows)
    # The 300k events and records built above are the benchmark's, not the sink's: left in this
    # process, each full garbage collection walks their millions of objects and stops the sink
    # for ~1-2 s (seen as one consume() call that long). A sink process holds none of them.
    del events, records
    gc.collect()
    gc.freeze()
    try:
        sink, batches = sink_rate(settings, rows)
    finally:
        gc.unfreeze()
    return {
        "benchmark": "clickhouse_sink",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows,
        "batch_rows": settings.sink_batch_rows,
        "batch_ms": settings.sink_batch_ms,
        "sink_batches": batches,
        "bare_rows_per_s": round(bare),
        "sink_rows_per_s": round(sink),
        "ratio": round(sink / bare, 3),
        "targets": {"ratio": 0.7, "sink_rows_per_s": 150_000},
        "machine": f"{platform.machine()} {platform.python_version()}",
    }


def measure_beside(settings: Settings, rows: int, server_src: Path, home: Path, rounds: int = 2) -> dict[str, Any]:
    """The sink through this stack's embedded server and through the embedded server of
    ``server_src`` (another source tree: the server before a change), started beside it on a
    free port with a data folder of its own. The two alternate ``rounds`` times each, in one run
    and on one broker, with this tree's sink, client and rows; the best round of each is kept
    (on a shared machine the best is the least disturbed), with every round in the result."""
    port = free_port()
    server = Child.python(
        "clickhouse-before",
        ["-m", "sinks.chdb_server", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(home / "data")],
        tree_env(None, server_src), home / "server.log", cwd=server_src,
    ).start()  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1):
                    break
            except OSError:
                if not server.alive() or time.monotonic() > deadline:
                    raise SystemExit(f"the server of {server_src} did not start: {server.tail()}") from None
                time.sleep(0.1)
        here: list[dict[str, Any]] = []
        before: list[dict[str, Any]] = []
        for i in range(rounds):
            here.append(measure(settings.model_copy(update={
                "topic_prefix": f"{settings.topic_prefix}now{i}.", "clickhouse_database": f"bench_sink_now{i}"}), rows))
            before.append(measure(settings.model_copy(update={
                "topic_prefix": f"{settings.topic_prefix}before{i}.", "clickhouse_database": f"bench_sink_before{i}",
                "clickhouse_url": f"http://127.0.0.1:{port}"}), rows))  # fmt: skip
    finally:
        server.stop()
    best_now = max(here, key=lambda r: r["sink_rows_per_s"])
    best_before = max(before, key=lambda r: r["sink_rows_per_s"])
    return {
        **best_now,
        "server_src": str(server_src),
        "before_sink_rows_per_s": best_before["sink_rows_per_s"],
        "before_bare_rows_per_s": best_before["bare_rows_per_s"],
        "sink_over_before": round(best_now["sink_rows_per_s"] / best_before["sink_rows_per_s"], 3),
        "bare_over_before": round(best_now["bare_rows_per_s"] / best_before["bare_rows_per_s"], 3),
        "rounds": {"now": [(r["bare_rows_per_s"], r["sink_rows_per_s"]) for r in here],
                   "before": [(r["bare_rows_per_s"], r["sink_rows_per_s"]) for r in before]},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="feedback-bench-") as tmp:
        local, settings = stack(Path(tmp), topic_partitions=2)
        try:
            result = measure(settings, args.rows)
        finally:
            local.down()
    record_result("bench_sink", result)


if __name__ == "__main__":
    main()
