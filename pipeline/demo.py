"""``feedback demo``: the whole pipeline on generated feedback, in one command."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.private_files import open_private, private_dir
from pipeline.settings import Settings
from pipeline.term import safe

__all__ = ["print_stats", "run_demo"]

console = Console()

POISON_SAMPLES = (
    b'{"source": "plain-json", "type": "thumbs"}',
    b"\xc3\x01" + b"\x00" * 8 + b"unknown schema",
    b"\x00\x00\x00\x00\x2a not registered",
    b"",
    b"\xc3\x01\x16",
)


def print_stats(data: dict[str, Any]) -> None:
    """Render ``collect_stats`` output as tables."""
    table = Table("where", "what", "count", title="What landed")
    for name, count in data.get("kafka", {}).items():
        table.add_row("kafka", safe(name), str(count))
    for name, count in data.get("clickhouse", {}).items():
        if isinstance(count, dict):  # a breakdown, e.g. rejections by reason
            for part, n in count.items():
                table.add_row("clickhouse", safe(f"{name.removesuffix('_by_reason')}: {part}"), str(n))
        else:
            table.add_row("clickhouse", safe(name), str(count))
    jsonl = data.get("jsonl", {})
    for name, count in jsonl.get("files", {}).items():
        table.add_row("jsonl", safe(name), str(count))
    console.print(table)


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    fh = open_private(log, "ab")  # handed to the child, which keeps it open
    return subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run_demo(settings: Settings, *, events: int, poison: int, timeout_s: float = 150.0) -> int:
    """Run the demo; returns 0 when every event landed exactly once, 1 otherwise."""
    from pipeline.kafka_admin import ensure_topics
    from pipeline.localstack import LocalStack
    from pipeline.stats import collect_stats
    from producers.producer import FeedbackProducer
    from producers.synthetic import generate_events
    from sinks.clickhouse import connect
    from sinks.migrations import migrate

    started = time.monotonic()
    run_id = time.strftime("%Y%m%d%H%M%S")
    demo = settings.model_copy(
        update={
            "topic_prefix": f"demo.{run_id}.",
            "clickhouse_database": f"demo_{run_id}",
            "path": settings.path / "demo" / run_id,
            "sink_group": f"demo-{run_id}-sink",
        }
    )
    console.print(f"[bold]feedback demo[/bold] run {run_id}: {events} events + {poison} poison messages")
    console.print("starting the local stack (Kafka KRaft + embedded ClickHouse)…")
    LocalStack(settings).up()
    ensure_topics(demo)
    client = connect(demo)
    migrate(client, demo)

    env = {**os.environ, **demo.to_env()}
    logs = settings.state_dir / "demo" / run_id
    private_dir(logs)
    cli = [sys.executable, "-m", "pipeline.cli"]
    procs = [
        _start([*cli, "worker"], env, logs / "worker.log"),
        _start([*cli, "sink"], env, logs / "sink.log"),
    ]
    try:
        generated = list(generate_events(events, seed=int(run_id[-6:])))
        showcase = _showcase(generated)
        with FeedbackProducer(demo) as producer:
            producer.send_many(generated)
            for event, arrival_ms in showcase:
                producer.send(event, timestamp_ms=arrival_ms)
            for i in range(poison):
                producer.send_raw(POISON_SAMPLES[i % len(POISON_SAMPLES)], key=b"demo-poison")
        sent = events + len(showcase) + poison
        console.print(
            f"published {sent} messages to {producer.topic} (with {DUPLICATES} duplicates, a burst of {BURST} from "
            f"one user, PII in a comment); waiting for the pipeline…"
        )
        clean = events + RATE_LIMIT + 1
        deadline = time.monotonic() + timeout_s
        landed: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if any(proc.poll() is not None for proc in procs):
                console.print(f"[red]a pipeline process exited early[/red]; see logs in {logs}")
                return 1
            landed = collect_stats(demo)
            if _all_landed(landed, clean, poison):
                break
            time.sleep(1.0)
        print_stats(landed)
        _print_rows(client, demo)
        _print_state(demo)
        ok = _all_landed(landed, clean, poison)
        verdict = "[green]every event landed exactly once[/green]" if ok else "[red]counts do not match[/red]"
        console.print(f"{verdict} in {time.monotonic() - started:.0f}s")
        db = demo.clickhouse_database
        console.print(
            f"explore: FEEDBACK_TOPIC_PREFIX={demo.topic_prefix} FEEDBACK_CLICKHOUSE_DATABASE={db} "
            f"FEEDBACK_PATH={demo.path} .venv/bin/feedback stats\n"
            f"query:   curl '{settings.clickhouse_endpoint}/?query="
            f"SELECT+type,count()+FROM+{db}.feedback_events+GROUP+BY+type'\n"
            f"stop the stack: .venv/bin/feedback down   (logs: {logs})",
            soft_wrap=True,
        )
        return 0 if ok else 1
    finally:
        for proc in procs:
            _stop(proc)


DUPLICATES = 20
BURST = 80
RATE_LIMIT = 60  # the default: 60 per minute per subject


def _showcase(generated: list[Any]) -> list[tuple[Any, int]]:
    """Events that put the gate to work: re-sent duplicates, a burst from one user arriving at
    one instant (so exactly RATE_LIMIT pass), and a comment with PII."""
    from datetime import UTC, datetime

    from schemas import FeedbackEvent

    now = datetime.now(UTC)
    arrival_ms = int(now.timestamp() * 1000)
    out: list[tuple[Any, int]] = [(e, arrival_ms) for e in generated[:DUPLICATES]]
    for i in range(BURST):
        burst = FeedbackEvent(source="dream_ui", type="thumbs", ts=now, user_id="demo-burst",
                              idempotency_key=f"burst-{i}", payload={"direction": "up"})  # fmt: skip
        out.append((burst, arrival_ms))
    pii = FeedbackEvent(source="dream_ui", type="thumbs", ts=now, user_id="demo-pii", payload={
        "direction": "down", "comment": "wrong answer; write to jane.doe@example.com or call +1 415 555 0100",
        "text": "the model's answer text"})  # fmt: skip
    out.append((pii, arrival_ms))
    return out


def _all_landed(landed: dict[str, Any], clean: int, poison: int) -> bool:
    ch = landed.get("clickhouse", {})
    return (
        ch.get("feedback_events_final") == clean
        and ch.get("dlq_events") == poison
        and ch.get("rejected_events") == DUPLICATES + BURST - RATE_LIMIT
        and landed.get("jsonl", {}).get("lines") == clean
    )


def _print_state(settings: Settings) -> None:
    """The state the worker publishes: directive bias and source reputation."""
    from datetime import UTC, datetime

    from producers.subscriber import read_bias, read_reputation

    now = datetime.now(UTC)
    table = Table("directive", "bias now", "events", title="Directive bias (feedback.directive-bias.v1)")
    for key, record in sorted(read_bias(settings).items()):
        table.add_row(safe(key), f"{record.at(now):.3f}", str(record.events))
    console.print(table)
    table = Table("source", "score", "observations", "down-weighted", title="Source reputation")
    for source, rep in sorted(read_reputation(settings).items()):
        table.add_row(safe(source), f"{rep.score:.3f}", str(rep.observations), str(rep.downweighted))
    console.print(table)


def _print_rows(client: Any, settings: Settings) -> None:
    result = client.query(
        "SELECT source, type, value, user_id, payload_comment, text_dropped "
        f"FROM `{settings.clickhouse_database}`.feedback_events FINAL ORDER BY payload_comment LIKE '%[EMAIL]%' DESC,"
        " ts DESC LIMIT 5"
    )
    table = Table(*result.column_names, title="A few rows in ClickHouse")
    for row in result.result_rows:
        table.add_row(*(safe(str(v)[:70] if i == 4 else str(v)[:16]) for i, v in enumerate(row)))
    console.print(table)
