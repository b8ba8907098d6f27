"""The operator commands of ``feedback``: ``dlq list`` and ``dlq replay`` (read the DLQ topic).

They register on :data:`pipeline.cli_app.app` (``pipeline/cli.py`` imports this module), so
``feedback --help`` lists them.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.cli_app import app, console
from pipeline.dlq import (
    DlqRead,
    Letter,
    erased_filter,
    newest_first,
    plan_replay,
    read_erasures,
    read_letters,
    replay,
    select_letters,
)
from pipeline.errors import StackError
from pipeline.logs import configure_logging
from pipeline.query_cli import fail
from pipeline.settings import Settings, get_settings
from pipeline.since import parse_time
from pipeline.term import safe
from schemas.topics import Topics

__all__ = ["dlq_app", "letter_cells", "parse_stages"]

dlq_app = typer.Typer(
    no_args_is_help=True,
    help="Dead letters (feedback.dlq.v1): list them, and replay them through the gate after a fix.",
)
app.add_typer(dlq_app, name="dlq")

_TIME_HELP = "30m, 1h, 7d, 2w, or an ISO date/time (2026-11-01, 2026-11-01T08:30Z)."
_STAGE = re.compile(r"[a-z][a-z0-9_-]{0,39}")


def _settings() -> Settings:
    settings = get_settings()
    configure_logging(settings)
    return settings


def _since(value: str, now: datetime) -> datetime:
    try:
        return parse_time(value, now)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--since'") from None


def parse_stages(values: list[str] | None) -> tuple[str, ...]:
    """The ``--stage`` values, checked (a stage is a lower-case name such as ``decode``).

    Raises ``typer.BadParameter`` (exit 2) for anything else.
    """
    stages = tuple(v.strip() for v in values or ())
    for stage in stages:
        if not _STAGE.fullmatch(stage):
            raise typer.BadParameter(
                f"{stage!r} is not a stage name (lower-case, e.g. decode, gate, sink)", param_hint="'--stage'"
            )
    return stages


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def letter_cells(letter: Letter, raw_topic: str) -> list[str]:
    """One letter as table cells: time (UTC, seconds), stage, error (clipped to 80), origin
    topic, partition, offset, size, and whether replay sends it. Never key or payload."""
    return [
        f"{letter.ts.astimezone(UTC):%Y-%m-%d %H:%M:%S}",
        letter.stage,
        _clip(letter.safe_error, 80),
        letter.topic,
        str(letter.partition),
        str(letter.offset),
        _size(letter.size),
        "yes" if letter.topic == raw_topic and letter.raw else "no",
    ]


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB"


def _read(settings: Settings, since: datetime) -> DlqRead:
    progress = Progress(
        TextColumn("reading the DLQ"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    )  # fmt: skip
    try:
        with progress:
            task = progress.add_task("read", total=None)
            return read_letters(
                settings, since, progress=lambda done, total: progress.update(task, completed=done, total=total)
            )
    except StackError as exc:
        fail(str(exc))


def _table(letters: list[Letter], raw_topic: str, title: str) -> Table:
    table = Table("time (UTC)", "stage", "error", "origin topic", "partition", "offset", "size", "replay", title=title)
    for letter in letters:
        table.add_row(*(safe(cell) for cell in letter_cells(letter, raw_topic)))
    return table


@dlq_app.command(
    "list",
    epilog="Example: feedback dlq list --since 1d --stage decode --limit 20  |  feedback dlq list --json",
)
def dlq_list(
    since: Annotated[str, typer.Option(help=f"Letters dead-lettered from then on: {_TIME_HELP}")] = "1d",
    stages: Annotated[
        list[str] | None, typer.Option("--stage", help="Stage that failed (decode, gate, sink, …); repeatable.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many letters.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Dead letters from the DLQ topic, newest first: when, which stage, why, and where from.

    Reads feedback.dlq.v1 itself (the bytes a replay would send are there; ClickHouse
    dlq_events keeps only metadata). Never prints payload bytes or keys.
    """
    now = datetime.now(UTC)
    start = _since(since, now)
    wanted = parse_stages(stages)
    settings = _settings()
    raw_topic = Topics(settings.topic_prefix).raw
    read = _read(settings, start)
    in_range = select_letters(read.letters, since=start)
    chosen = select_letters(in_range, stages=wanted)
    shown = newest_first(chosen, limit)
    if as_json:
        import json
        import sys

        sys.stdout.write(json.dumps([letter.to_json() for letter in shown], indent=2) + "\n")
    else:
        Console().print(_table(shown, raw_topic, f"Dead letters since {start:%Y-%m-%d %H:%M} UTC (newest first)"))
    note = f"{len(shown)} of {len(chosen)} letter(s)" if len(chosen) > len(shown) else f"{len(shown)} letter(s)"
    if len(chosen) > len(shown):
        note += " (raise --limit for more)"
    if read.unreadable:
        note += f"; {read.unreadable} unreadable letter(s) skipped (see the log)"
    if wanted and not chosen and in_range:
        note += f"; stages present: {', '.join(sorted({lt.stage for lt in in_range}))}"
    console.print(safe(note), soft_wrap=True)


@dlq_app.command(
    "replay",
    epilog="Example: feedback dlq replay --since 2d --stage decode --dry-run  |  feedback dlq replay --since 2d",
)
def dlq_replay(
    since: Annotated[str, typer.Option(help=f"Letters dead-lettered from then on: {_TIME_HELP}")] = "1d",
    stages: Annotated[
        list[str] | None, typer.Option("--stage", help="Only letters of this stage; repeatable (default: all).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be sent; send nothing.")] = False,
) -> None:
    """Send dead-lettered messages back through the gate after a fix.

    Each letter whose origin is feedback.raw.v1 is re-published with its original bytes and
    key to the partition it came from; letters from other topics are skipped (and counted).
    Only letters dead-lettered before the replay started are read, so a message that fails
    again becomes a new letter and is not replayed by the same run. Letters holding events of
    a user erased with `feedback forget` are skipped. Running it twice is safe: the gate drops
    an event it already accepted (dedup window FEEDBACK_DEDUP_WINDOW_S).
    """
    started = datetime.now(UTC)
    start = _since(since, started)
    wanted = parse_stages(stages)
    settings = _settings()
    raw_topic = Topics(settings.topic_prefix).raw
    read = _read(settings, start)
    chosen = select_letters(read.letters, since=start, before=started, stages=wanted)
    from stream_processors.config import hash_key

    try:
        erased = erased_filter(read_erasures(settings), hash_key(settings))
    except StackError as exc:
        fail(str(exc))
    plan = plan_replay(chosen, raw_topic, erased)
    scope = f" of stage {', '.join(wanted)}" if wanted else ""
    console.print(
        safe(f"{len(chosen)} letter(s){scope} dead-lettered since {start:%Y-%m-%d %H:%M} UTC "
               f"and before the replay started ({started:%H:%M:%S} UTC)"),
        soft_wrap=True,
    )  # fmt: skip
    for reason, count in sorted(plan.skipped.items()):
        console.print(safe(f"skipped {count}: {reason}"), soft_wrap=True)
    if plan.duplicates:
        console.print(f"skipped {plan.duplicates}: the same message as another letter (sent once)")
    if read.unreadable:
        console.print(f"skipped {read.unreadable}: unreadable letter(s) (see the log)")
    burst = int(settings.rate_limit_burst or settings.rate_limit_per_minute)
    if plan.busiest_key_count() > burst:
        console.print(
            f"warning: {plan.busiest_key_count()} messages share one key; the gate allows a subject {burst} at once "
            "(FEEDBACK_RATE_LIMIT_BURST), so some may be refused as rate_limited",
            soft_wrap=True,
        )
    if dry_run:
        if plan.send:
            Console().print(_table(plan.send, raw_topic, "Would replay (oldest first)"))
        console.print(f"dry run: would replay {len(plan.send)} message(s) to {raw_topic}; nothing sent")
        return
    try:
        sent = replay(settings, plan.send)
    except StackError as exc:
        fail(str(exc))
    console.print(f"replayed {sent} message(s) to {raw_topic}", soft_wrap=True)
    if sent:
        console.print(
            "a replayed message that fails again becomes a new letter; replay it after the next fix", soft_wrap=True
        )
