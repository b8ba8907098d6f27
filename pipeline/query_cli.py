"""The analyst commands of ``feedback``: ``list``, ``report`` and ``export`` (read ClickHouse).

They register on :data:`pipeline.cli_app.app`; ``pipeline/cli.py`` imports this module, so
``feedback --help`` lists them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.cli_app import app, console, print_json
from pipeline.cli_app import settings as load_settings
from pipeline.errors import StackError
from pipeline.insights_query import load_insights, opinions_table
from pipeline.private_files import make_private_dirs
from pipeline.settings import Settings
from pipeline.since import parse_time, to_micros
from pipeline.term import plain, safe

__all__ = ["clickhouse_client", "events_table", "fail", "list_cells", "list_events"]


_settings: Callable[[], Settings] = load_settings
_print_json: Callable[[Any], None] = print_json

# --- shared ------------------------------------------------------------------------------------
_TIME_HELP = "30m, 1h, 7d, 2w, or an ISO date/time (2026-11-01, 2026-11-01T08:30Z)."


def _time_option(value: str | None, option: str, now: datetime | None = None) -> datetime | None:
    """The instant an option names; a bad value exits 2 with a one-line reason."""
    if value is None:
        return None
    try:
        return parse_time(value, now or datetime.now(UTC))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=f"'{option}'") from None


def events_table(settings: Settings) -> str:
    """The qualified events table (the Distributed ``feedback_events_all`` on a cluster)."""
    name = "feedback_events_all" if settings.clickhouse_cluster else "feedback_events"
    return f"`{settings.clickhouse_database}`.{name}"


_DB_EXCEPTION = re.compile(r"DB::Exception: (.+?)(?:\. \(|\n|$)")


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit 1."""
    console.print(f"[red]error[/red]: {safe(message)}", soft_wrap=True)
    raise typer.Exit(1)


@contextmanager
def clickhouse_client(settings: Settings) -> Iterator[Any]:
    """A ClickHouse client. Failing to reach or query it prints one line naming the server and
    what to do, and exits 1 (no traceback)."""
    from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError
    from urllib3.exceptions import HTTPError

    from sinks.clickhouse import connect

    # The HTTP client logs each failed attempt with a stack of details; the one line below says it.
    for name in ("urllib3.connectionpool", "clickhouse_connect.driver"):
        logging.getLogger(name).setLevel(logging.ERROR)
    where = settings.clickhouse_endpoint
    try:
        client = connect(settings)
    except StackError as exc:
        fail(str(exc))
    try:
        yield client
    except DatabaseError as exc:
        text = str(exc)
        if "UNKNOWN_TABLE" in text or "UNKNOWN_DATABASE" in text:
            fail(
                f"no feedback tables in database {settings.clickhouse_database} at {where}; "
                "run `feedback migrate` (sinks also create them on start)"
            )
        found = _DB_EXCEPTION.search(text)
        fail(f"ClickHouse at {where} refused the query: {(found.group(1) if found else type(exc).__name__)[:200]}")
    except (ClickHouseError, HTTPError, OSError) as exc:
        fail(f"lost ClickHouse at {where} ({type(exc).__name__}); is it running? See `feedback status`")
    finally:
        client.close()


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


# --- list ----------------------------------------------------------------------------------------
_LIST_COLUMNS = (
    "event_id", "ts", "source", "type", "severity", "value", "confidence", "sample_rate", "model_version",
    "prompt_version", "interaction_id", "session_id", "tags", "payload_comment", "payload_text",
    "corrected_response", "payload",
)  # fmt: skip


def _clip(text: str | None, width: int) -> str:
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def list_cells(row: dict[str, Any]) -> list[str]:
    """One event as the table's cells: time (UTC, seconds), source, type, severity, value,
    model, prompt, interaction, tags, and the comment (or text) clipped to 50 characters; each
    escaped for the terminal and rich markup (:func:`pipeline.term.safe`)."""
    ts: datetime = row["ts"]
    ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    value = row.get("value")
    cells = [
        ts.strftime("%Y-%m-%d %H:%M:%S"),
        row["source"],
        row["type"],
        row["severity"],
        "-" if value is None else f"{value:+.2f}",
        row.get("model_version") or "-",
        row.get("prompt_version") or "-",
        row.get("interaction_id") or "-",
        ",".join(row.get("tags") or []),
        _clip(plain(row.get("payload_comment") or row.get("payload_text") or row.get("corrected_response")), 50),
    ]
    return [safe(cell) for cell in cells]


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    ts: datetime = row["ts"]
    out["ts"] = (ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)).isoformat()
    out["tags"] = list(row.get("tags") or [])
    return out


@app.command(
    "list",
    epilog="Example: feedback list --type thumbs --type rating --since 1h --source dream_ui --limit 20",
)
def list_events(
    types: Annotated[
        list[str] | None, typer.Option("--type", "-t", help="Event type; repeat for several (default: all).")
    ] = None,
    since: Annotated[str, typer.Option(help=f"Events from then on: {_TIME_HELP}")] = "1d",
    sources: Annotated[list[str] | None, typer.Option("--source", "-s", help="Source; repeat for several.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many events.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Events from ClickHouse (deduplicated), newest first."""
    start = _time_option(since, "--since")
    assert start is not None
    settings = _settings()
    where = ["ts >= fromUnixTimestamp64Micro({since:Int64})"]
    params: dict[str, Any] = {"since": to_micros(start), "limit": limit}
    if types:
        where.append("type IN {types:Array(String)}")
        params["types"] = types
    if sources:
        where.append("source IN {sources:Array(String)}")
        params["sources"] = sources
    sql = (
        f"SELECT {', '.join(_LIST_COLUMNS)} FROM {events_table(settings)} FINAL WHERE {' AND '.join(where)} "
        "ORDER BY ts DESC, event_id LIMIT {limit:UInt32}"
    )
    with clickhouse_client(settings) as client:
        rows = [dict(zip(_LIST_COLUMNS, r, strict=True)) for r in client.query(sql, parameters=params).result_rows]
    if as_json:
        _print_json([_json_row(r) for r in rows])
        return
    table = Table(
        "time (UTC)", "source", "type", "severity", "value", "model", "prompt", "interaction", "tags", "comment",
        title=f"Feedback events since {start:%Y-%m-%d %H:%M} UTC (newest first)",
    )  # fmt: skip
    for row in rows:
        table.add_row(*list_cells(row))
    Console().print(table)
    console.print(f"{len(rows)} event(s){' (the limit; raise --limit for more)' if len(rows) == limit else ''}")


# --- report ----------------------------------------------------------------------------------------
class PeriodChoice(StrEnum):
    week = "week"
    month = "month"


class ReportFormat(StrEnum):
    md = "md"
    html = "html"


class ImageFormat(StrEnum):
    png = "png"
    svg = "svg"


@app.command(
    epilog="Example: feedback report --period week --format html --output reports/week.html "
    "(charts: reports/week-trend.png, reports/week-breakdown.png)"
)
def report(
    period: Annotated[
        PeriodChoice, typer.Option(help="A rolling week (7 days) or month (30 days).")
    ] = PeriodChoice.week,
    format_: Annotated[ReportFormat, typer.Option("--format", help="Markdown or HTML.")] = ReportFormat.md,
    output: Annotated[
        Path | None, typer.Option(help="Report file (default ./feedback-report-<period>-<date>.<format>).")
    ] = None,
    until: Annotated[str | None, typer.Option(help=f"End of the period (default now): {_TIME_HELP}")] = None,
    chart_format: Annotated[ImageFormat, typer.Option(help="Chart image format.")] = ImageFormat.png,
) -> None:
    """Satisfaction and success rate against the previous period, with breakdowns and charts.

    By model version, prompt version, tag and source; the worst-rated interactions; a trend
    line and breakdown bars written next to the report (and embedded in the HTML).
    """
    from pipeline.report import build_report, write_report

    end = _time_option(until, "--until") or datetime.now(UTC)
    settings = _settings()
    if output is None:
        output = Path(f"feedback-report-{period.value}-{end:%Y-%m-%d}.{format_.value}")
    elif output.is_dir():
        output = output / f"feedback-report-{period.value}-{end:%Y-%m-%d}.{format_.value}"
    with clickhouse_client(settings) as client, _progress() as progress:
        task = progress.add_task("querying", total=9)
        data = build_report(
            client,
            opinions_table(client, settings.clickhouse_database, settings.clickhouse_cluster),
            period.value,  # type: ignore[arg-type]
            end,
            step=lambda name: progress.update(task, advance=1, description=f"querying ({name})"),
        )
        data.insights, _ = load_insights(client, settings.clickhouse_database, settings.clickhouse_cluster,
                                         data.previous_start, data.start, data.end)  # fmt: skip
        progress.update(task, advance=1, description="querying (insights)")
        progress.update(task, description="charts and report")
        make_private_dirs(output.parent)
        files = write_report(data, output, format_.value, chart_format.value)  # type: ignore[arg-type]
        progress.update(task, advance=1)
    console.print(f"report: {files[0]} ({data.current.events} events this {period.value}); charts: "
                  + ", ".join(str(f) for f in files[1:]))  # fmt: skip


# --- export ----------------------------------------------------------------------------------------
class ExportFormat(StrEnum):
    training = "training"
    promptfoo = "promptfoo"
    jsonl = "jsonl"


_DEFAULT_NAMES = {"training": "feedback-training-{d}.jsonl", "promptfoo": "feedback-promptfoo-{d}.yaml",
                  "jsonl": "feedback-events-{d}.jsonl"}  # fmt: skip


@app.command(
    epilog="Examples: feedback export --format training --since 7d --output data/train.jsonl  |  "
    "feedback export --format promptfoo --output evals/cases.yaml  |  "
    "feedback export --format jsonl --since 2026-11-01 --until 2026-11-08  |  "
    "feedback export --format promptfoo --max-value -0.5 --type thumbs --min-prompt-chars 20 (regression cases)"
)
def export(
    format_: Annotated[ExportFormat, typer.Option("--format", help="What to write.")] = ExportFormat.training,
    output: Annotated[Path | None, typer.Option(help="Output file (a data card is written next to it).")] = None,
    since: Annotated[str, typer.Option(help=f"Events from then on: {_TIME_HELP}")] = "7d",
    until: Annotated[str | None, typer.Option(help=f"Events before then (default now): {_TIME_HELP}")] = None,
    min_value: Annotated[
        float | None,
        typer.Option(min=-1.0, max=1.0, help="Only value >= this (training default 0.7; others: no bound)."),
    ] = None,
    max_value: Annotated[float | None, typer.Option(min=-1.0, max=1.0, help="Only value <= this.")] = None,
    sources: Annotated[list[str] | None, typer.Option("--source", "-s", help="Source; repeat for several.")] = None,
    types: Annotated[list[str] | None, typer.Option("--type", "-t", help="Event type; repeat for several.")] = None,
    min_prompt_chars: Annotated[int, typer.Option(min=0, help="Leave out prompts shorter than this.")] = 0,
    min_response_chars: Annotated[int, typer.Option(min=0, help="Leave out responses shorter than this.")] = 0,
    corrections: Annotated[
        bool, typer.Option(help="Training: also use corrections (their corrected_response as the answer).")
    ] = False,
    dedup_threshold: Annotated[
        float, typer.Option(min=0.01, max=1.0, help="Near-duplicate cut-off (Jaccard of 5-character shingles).")
    ] = 0.85,
) -> None:
    """Training data, promptfoo test cases or plain JSONL, with a data card next to the file.

    training: chat-messages JSONL from positive feedback (value >= --min-value), near-duplicates
    removed, PII checked again. promptfoo: test cases from rated outputs (without a value range:
    value >= 0.7 similar, <= -0.7 not-similar; with --min-value/--max-value: the range selects and
    the sign decides). jsonl: every event of the time range. Opinions from feedback_current.
    """
    from pipeline.export import ExportFilters, export_events

    now = datetime.now(UTC)
    start = _time_option(since, "--since", now)
    end = _time_option(until, "--until", now) or now
    assert start is not None
    if start >= end:
        raise typer.BadParameter(f"{since!r} is not before --until", param_hint="'--since'")
    settings = _settings()
    if output is None:
        output = Path(_DEFAULT_NAMES[format_.value].format(d=f"{now:%Y-%m-%d}"))
    if min_value is not None and max_value is not None and min_value > max_value:
        raise typer.BadParameter(f"{min_value:g} is above --max-value {max_value:g}", param_hint="'--min-value'")
    ranged = min_value is not None or max_value is not None
    filters = ExportFilters(
        start, end, 0.7 if min_value is None and format_ is ExportFormat.training else min_value,
        tuple(sources or ()), corrections, dedup_threshold, types=tuple(types or ()), max_value=max_value,
        min_prompt_chars=min_prompt_chars, min_response_chars=min_response_chars, band=0.0 if ranged else 0.7,
    )  # fmt: skip
    with clickhouse_client(settings) as client, _progress() as progress:
        task = progress.add_task("reading events", total=None)
        result = export_events(
            client,
            opinions_table(client, settings.clickhouse_database, settings.clickhouse_cluster),
            format_.value,  # type: ignore[arg-type]
            output,
            filters,
            started=lambda total: progress.update(task, total=total),
            advance=lambda n: progress.update(task, advance=n),
        )
    dropped = f", {result.duplicates_removed} near-duplicate(s) removed" if format_ is not ExportFormat.jsonl else ""
    console.print(
        f"export: {result.written} of {result.selected} event(s) written to {result.output}{dropped}; "
        f"data card: {result.card}"
    )
