"""The ``feedback`` command line."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from pipeline.cli_app import app, console, print_json
from pipeline.cli_app import settings as load_settings
from pipeline.errors import PipelineError, field_rules
from pipeline.private_files import restrict_umask
from pipeline.term import plain, safe

__all__ = ["app", "main"]

_settings = load_settings
_print_json = print_json


# --- local stack -------------------------------------------------------------
def _with_brokers(settings: Any, brokers: int | None) -> Any:
    """``settings`` with FEEDBACK_KAFKA_BROKERS replaced by ``--brokers``, validated like the variable."""
    from pipeline.errors import ConfigError

    if brokers is None:
        return settings
    try:
        return type(settings).model_validate({**settings.model_dump(), "kafka_brokers": brokers})
    except ValidationError as exc:
        problems = "; ".join(str(err["msg"]) for err in exc.errors())
        raise ConfigError(f"--brokers {brokers}: {problems}") from None


@app.command()
def up(
    brokers: Annotated[
        int | None,
        typer.Option(
            "--brokers",
            min=1,
            max=5,
            help="Local Kafka brokers (default FEEDBACK_KAFKA_BROKERS, 1). 3: a three-broker KRaft cluster whose "
            "topics keep 3 replicas, min.insync.replicas 2. Export FEEDBACK_KAFKA_BROKERS=3 for the other commands.",
        ),
    ] = None,
) -> None:
    """Start the local stack (Kafka, embedded ClickHouse), create topics and tables. Idempotent."""
    from pipeline.kafka_admin import ensure_topics, topic_replication
    from pipeline.localstack import LocalStack
    from sinks.clickhouse import connect
    from sinks.migrations import apply_migrations

    settings = _with_brokers(_settings(), brokers)
    LocalStack(settings).up()
    created = ensure_topics(settings)
    applied = apply_migrations(connect(settings), settings.clickhouse_database)
    replicas, min_isr = topic_replication(settings)
    cluster = f", {replicas} replicas, min.insync.replicas {min_isr}" if replicas > 1 else ""
    console.print(
        f"[green]up[/green]: Kafka {settings.kafka_bootstrap}{cluster}, ClickHouse {settings.clickhouse_endpoint} "
        f"({len(created)} topics created, {len(applied)} migrations applied)"
    )


@app.command()
def down() -> None:
    """Stop the local stack, every broker of it, by the PIDs it recorded. Idempotent."""
    from pipeline.localstack import LocalStack

    LocalStack(_settings()).down()
    console.print("[green]down[/green]")


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Show whether the local services run (each broker of a local cluster), with PIDs, addresses, logs."""
    from dataclasses import asdict

    from pipeline.localstack import LocalStack

    statuses = [asdict(s) for s in LocalStack(_settings()).status()]
    if as_json:
        _print_json(statuses)
        return
    table = Table("service", "running", "pid", "address", "log")
    for s in statuses:
        table.add_row(
            safe(s.get("name")),
            "yes" if s.get("running") else "no",
            str(s.get("pid") or "-"),
            safe(s.get("address") or s.get("bootstrap") or "-"),
            safe(s.get("log_path") or s.get("log") or "-"),
        )
    Console().print(table)
    for s in statuses:
        if s.get("connect"):
            Console().print(f"connect to {safe(s.get('name'))}: {safe(s.get('connect'))}")


@app.command()
def topics() -> None:
    """Create any missing pipeline topics."""
    from pipeline.kafka_admin import ensure_topics

    created = ensure_topics(_settings())
    console.print(f"{len(created)} topic(s) created")


@app.command()
def migrate() -> None:
    """Apply ClickHouse migrations (idempotent)."""
    from sinks.clickhouse import connect
    from sinks.migrations import migrate as apply_all

    settings = _settings()
    applied = apply_all(connect(settings), settings)
    console.print(
        f"{len(applied)} migration(s) applied; retention {settings.clickhouse_retention_days or 'forever'} days"
    )


# --- producing ---------------------------------------------------------------
def _read_events(source: str) -> list[tuple[int, dict[str, Any] | None, str]]:
    """(line number, parsed object or None, parse error) for JSON Lines or a JSON array."""
    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            return [(1, None, f"not valid JSON: {exc}")]
        return [(i + 1, item, "") for i, item in enumerate(items)]
    out: list[tuple[int, dict[str, Any] | None, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((number, orjson.loads(line), ""))
        except orjson.JSONDecodeError as exc:
            out.append((number, None, f"not valid JSON: {exc}"))
    return out


def _first_problem(exc: ValidationError) -> str:
    field, message = field_rules(exc)[0]
    if message.startswith(f"{field}:") or message.startswith("payload"):
        return message
    return f"{field}: {message}"


@app.command()
def produce(
    source: Annotated[str, typer.Argument(help="File of JSON events (JSON Lines or an array), or - for stdin.")] = "-",
    generate: Annotated[int, typer.Option("--generate", help="Publish N synthetic events instead.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed for --generate.")] = 7,
) -> None:
    """Publish events to feedback.raw.v1. Every event is validated first: if any is invalid,
    one line per problem names the field and the rule, and nothing is published."""
    from producers.producer import FeedbackProducer
    from producers.synthetic import generate_events
    from schemas.models import FeedbackEvent

    settings = _settings()
    if generate:
        events = list(generate_events(generate, seed=seed))
    else:
        events, problems = [], []
        for number, obj, error in _read_events(source):
            if obj is None:
                problems.append(f"line {number}: {error}")
                continue
            try:
                events.append(FeedbackEvent.model_validate(obj))
            except ValidationError as exc:
                problems.append(f"line {number}: {_first_problem(exc)}")
        if problems:
            for problem in problems:
                typer.echo(f"invalid event: {plain(problem)}", err=True)
            typer.echo(f"nothing published ({len(problems)} invalid event(s))", err=True)
            raise typer.Exit(2)
    with FeedbackProducer(settings) as producer:
        producer.send_many(events)
    console.print(f"published {len(events)} event(s) to {producer.topic}")


# --- long-running processes -----------------------------------------------------
@app.command()
def worker() -> None:
    """Run the stream worker (Faust): feedback.raw.v1 → feedback.clean.v1 / feedback.dlq.v1."""
    from stream_processors.app import run_worker

    run_worker(_settings())


@app.command()
def sink(
    idle_exit: Annotated[float | None, typer.Option(help="Exit after this many idle seconds.")] = None,
) -> None:
    """Run the sinks: clean events → ClickHouse + JSONL; rejections and dead letters → ClickHouse."""
    from sinks.batching import run_sinks
    from sinks.feedback_sink import all_sinks

    sinks = all_sinks(_settings())

    def _stop(*_: object) -> None:
        for s in sinks:
            s.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    failed = run_sinks(sinks, idle_exit_s=idle_exit)
    if failed:
        console.print(f"[red]sink failed[/red]: {', '.join(failed)} stopped with an error (see the log); exiting")
        raise typer.Exit(1)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (default FEEDBACK_GATEWAY_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default FEEDBACK_GATEWAY_PORT).")] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes sharing the port (one core each). The gateway's per-subject rate limit "
            "is kept per process; the stream applies the shared limit again.",
        ),
    ] = 1,
) -> None:
    """Run the HTTP gateway: POST /internal/feedback(/batch) → feedback.raw.v1."""
    import uvicorn

    from producers.gateway import create_gateway

    settings = _settings()
    app_ = create_gateway(settings)  # also checks the configuration before any worker starts
    host, port = host or settings.gateway_host, port or settings.gateway_port
    if workers == 1:
        uvicorn.run(app_, host=host, port=port, log_level="warning", access_log=False)
        return
    # Several processes: uvicorn's own command line supervises them, each building its app (and
    # Kafka producer) from the same environment. Exec'd, so signals reach it directly, and its
    # workers import only the gateway, not this CLI (spawned workers re-import the main module).
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "uvicorn", "producers.gateway:gateway_from_env", "--factory",
                              "--workers", str(workers), "--host", host, "--port", str(port),
                              "--log-level", "warning", "--no-access-log"])  # fmt: skip


# --- inspection ----------------------------------------------------------------
@app.command(epilog="Example: feedback stats  |  feedback stats --json > stats.json")
def stats(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """What landed where, totals by source and type, rejections, sampling, reputation and bias.

    Counts per Kafka topic, ClickHouse table and JSONL file; events per source and type (FINAL,
    and re-weighted by sampling); rejection reasons; sampling per type; the current source
    reputation and directive bias. Exits 1 when ClickHouse cannot be reached.
    """
    import logging

    from pipeline.stats import collect_stats, print_stats

    settings = _settings()
    for name in ("urllib3.connectionpool", "clickhouse_connect.driver"):  # one error line below says it
        logging.getLogger(name).setLevel(logging.ERROR)
    data = collect_stats(settings, detail=True)
    if as_json:
        _print_json(data)
    else:
        print_stats(data)
    error = data["clickhouse"].get("error") or data.get("analytics", {}).get("error")
    if error:
        console.print(f"error: {plain(error)}", soft_wrap=True, markup=False, highlight=False)
        raise typer.Exit(1)


@app.command()
def bias(
    mode: Annotated[str | None, typer.Argument(help="`watch`: print the current values, then each update.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON lines with watch).")] = False,
    max_seconds: Annotated[float | None, typer.Option(help="Stop watching after this long.")] = None,
) -> None:
    """Directive bias per directive (and model version): as published, and decayed to now."""
    import time
    from datetime import UTC, datetime

    from producers.subscriber import BiasSubscriber

    if mode not in (None, "watch"):
        raise typer.BadParameter(f"unknown mode {mode!r}; the only mode is `watch`", param_hint="MODE")
    settings = _settings()
    with BiasSubscriber(settings) as subscriber:
        records = subscriber.snapshot()
        if mode is None:
            now = datetime.now(UTC)
            rows = [{**r.to_json(), "value_now": round(r.at(now), 6)} for _, r in sorted(records.items())]
            if as_json:
                _print_json(rows)
                return
            table = Table(
                "key", "directive", "model_version", "value", "now", "updated_at", "events", title="Directive bias"
            )
            for r in rows:
                table.add_row(
                    safe(r["key"]),
                    safe(r["directive"]),
                    safe(r["model_version"] or "-"),
                    f"{r['value']:.4f}",
                    f"{r['value_now']:.4f}",
                    safe(r["updated_at"]),
                    str(r["events"]),
                )
            Console().print(table)
            return
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        pending = [r for _, r in sorted(records.items())]
        try:
            while deadline is None or time.monotonic() < deadline:
                for record in pending or subscriber.poll(0.5):
                    line = {**record.to_json(), "value_now": round(record.at(datetime.now(UTC)), 6)}
                    if as_json:
                        sys.stdout.write(orjson.dumps(line).decode() + "\n")
                    else:
                        sys.stdout.write(f"{plain(line['key'])}  {line['value']:.4f}  (now {line['value_now']:.4f})\n")
                    sys.stdout.flush()
                pending = []
        except KeyboardInterrupt:  # Ctrl-C ends a watch; not an error
            return


@app.command()
def reputation(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Source reputation: EWMA score, observations, and whether the source is down-weighted."""
    from producers.subscriber import read_reputation

    rows = [r.to_json() for _, r in sorted(read_reputation(_settings()).items())]
    if as_json:
        _print_json(rows)
        return
    table = Table("source", "score", "observations", "downweighted", "weight", title="Source reputation")
    for r in rows:
        table.add_row(
            safe(r["source"]), f"{r['score']:.4f}", str(r["observations"]), str(r["downweighted"]), f"{r['weight']:.3f}"
        )
    Console().print(table)


@app.command()
def redact() -> None:
    """Redact PII in JSON events read from stdin (one per line); write them to stdout, in order.

    The gate's redaction: every string of ``payload`` and the top-level free-text fields
    ``text``, ``comment`` and ``corrected_response`` (a flat payload). Exit 2 at the first
    line that is not a JSON object (its content is never echoed).
    """
    from pipeline.redact_cli import redact_stream

    raise typer.Exit(redact_stream(sys.stdin.buffer, sys.stdout.buffer, sys.stderr))


@app.command()
def demo(
    events: Annotated[int, typer.Option(help="How many synthetic events to send.")] = 3000,
    poison: Annotated[int, typer.Option(help="How many undecodable messages to inject.")] = 5,
) -> None:
    """Start the local stack, run worker and sink on generated feedback, and show what landed."""
    from pipeline.demo import run_demo

    raise typer.Exit(run_demo(_settings(), events=events, poison=poison))


@app.command()
def bench(
    as_json: Annotated[bool, typer.Option("--json", help="No table: only the JSON summary line.")] = False,
    stages: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: worker,state,scaleout,memory,latency,client,gateway,sink (or all). "
            "Default: all but memory."
        ),
    ] = None,
    events: Annotated[int, typer.Option(min=100, help="Events for the worker and scale-out stages.")] = 50_000,
    worker_src: Annotated[
        Path | None, typer.Option(help="Run the worker, sink and publishing client from this source tree.")
    ] = None,
    server_src: Annotated[
        Path | None,
        typer.Option(help="Sink stage: also measure through this source tree's embedded ClickHouse server."),
    ] = None,
    latency_rate: Annotated[float, typer.Option(min=1, help="Latency stage: emit_many events per second.")] = 5000.0,
    latency_duration: Annotated[float, typer.Option(min=1, help="Latency stage: seconds of publishing.")] = 60.0,
    ramp: Annotated[bool, typer.Option(help="Latency stage: find the rate single-event messages sustain.")] = True,
    memory_events: Annotated[int, typer.Option(min=100, help="Memory stage: events (distinct users).")] = 1_000_000,
    label: Annotated[str, typer.Option(help="A note stored with the result.")] = "",
    keep_tmp: Annotated[bool, typer.Option(help="Keep the scratch folder (logs, result.json).")] = False,
) -> None:
    """Benchmark every stage beside its baseline on a private stack (free ports, temp dir).

    Prints a table and one JSON summary line and appends the result to
    benchmarks/results/bench.jsonl. Exit 1 if a stage failed. More options:
    python -m benchmarks.suite --help.
    """
    from pipeline.settings import PROJECT_ROOT

    if str(PROJECT_ROOT) not in sys.path:  # benchmarks/ lives beside the packages, it is not installed
        sys.path.append(str(PROJECT_ROOT))
    from benchmarks.suite import Options, parse_stages, run_and_report

    try:
        chosen = parse_stages(stages)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--stages") from None
    opts = Options(stages=chosen, events=events, worker_src=worker_src, server_src=server_src, latency_rate=latency_rate,
                   latency_duration=latency_duration, latency_ramp=ramp, memory_events=memory_events, label=label,
                   keep_tmp=keep_tmp)  # fmt: skip
    raise typer.Exit(run_and_report(opts, as_json=as_json))


def main() -> None:
    """Entry point: turns the project's errors into one clear line and exit code 1.

    Sets the umask to 0o077 first: every file this process and its children write is private.
    """
    restrict_umask()
    try:
        app()
    except PipelineError as exc:
        console.print(f"[red]error[/red]: {safe(exc, newlines=True)}")
        sys.exit(1)


import pipeline.ops_cli  # noqa: E402,F401  (registers dlq list/replay; it imports query_cli first)

# Register forget, insights/suggest, list/report/export, triage/label/resolve and rewards.
from pipeline import forget_cli, insights_cli, query_cli, rewards_cli, triage_cli  # noqa: E402,F401

if __name__ == "__main__":
    main()
