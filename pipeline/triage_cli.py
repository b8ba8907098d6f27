"""The triage commands of ``feedback``: ``triage`` (the queue), ``label`` and ``resolve``.

The queue is read from the compacted ``feedback.triage.v1`` (the worker's state, current
as soon as it applied a command). ``label`` and ``resolve`` publish a command to
``feedback.triage-commands.v1`` (the audit log) with Kafka's Java partitioner, so it
lands in the partition of the item's other commands, and wait until the worker has
applied it. They register on :data:`pipeline.cli_app.app`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli_app import app, console, print_json
from pipeline.cli_app import settings as load_settings
from pipeline.errors import StackError
from pipeline.query_cli import fail
from pipeline.settings import Settings
from pipeline.term import safe
from schemas.triage_records import TriageCommand, TriageItem

__all__ = ["queue", "send_command"]

APPLY_WAIT_S = 15.0

Show = Literal["open", "labeled", "resolved", "pending", "all"]


def queue(items: dict[str, TriageItem], show: Show = "pending") -> list[TriageItem]:
    """Items in arrival order (oldest first); ``pending`` is open and labeled, not resolved."""
    keep = {"pending": ("open", "labeled"), "all": ("open", "labeled", "resolved")}.get(show, (show,))
    return sorted((i for i in items.values() if i.status in keep), key=lambda i: (i.created_s, i.triage_id))


def _read(settings: Settings) -> dict[str, TriageItem]:
    from producers.subscriber import read_triage

    try:
        return read_triage(settings)
    except StackError as exc:
        fail(str(exc))


def send_command(settings: Settings, command: TriageCommand) -> None:
    """Publish ``command`` and wait for Kafka's acknowledgement."""
    from producers.producer import FeedbackProducer
    from schemas.topics import Topics

    producer = FeedbackProducer(
        settings,
        topic=Topics(settings.topic_prefix).triage_commands,
        config={"partitioner": "murmur2_random", "client.id": "feedback-triage-cli", "message.timeout.ms": 15_000},
    )
    try:
        producer.send_raw(command.to_bytes(), key=command.triage_id.encode(), label=command.triage_id)
        producer.flush(20)
    finally:
        producer.close(5)


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


@app.command("triage")
def triage_queue(
    show: Annotated[str, typer.Option("--show", help="pending (open and labeled), open, labeled, resolved, all.")] = (
        "pending"
    ),
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="At most this many items.")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The triage queue, oldest first: events that need a human.

    Vetoes, safety, bad output and corrections, and anything of severity warn or worse
    (FEEDBACK_TRIAGE_TYPES, FEEDBACK_TRIAGE_MIN_SEVERITY).

    Example: feedback triage --show open --limit 20
    """
    if show not in ("open", "labeled", "resolved", "pending", "all"):
        raise typer.BadParameter("must be pending, open, labeled, resolved or all", param_hint="'--show'")
    settings = load_settings()
    items = queue(_read(settings), show)[:limit]  # type: ignore[arg-type]
    if as_json:
        from dataclasses import asdict

        print_json([asdict(i) for i in items])
        return
    table = Table("id", "arrived (UTC)", "source", "type", "severity", "why", "status", "label", "note")
    for i in items:
        table.add_row(
            safe(i.triage_id), _when(i.created_s), safe(i.source), safe(i.type), safe(i.severity), safe(i.reason),
            safe(i.status), safe(i.label), safe(i.note[:60]),
        )  # fmt: skip
    Console().print(table)
    console.print(f"{len(items)} item(s)")


def _change(triage_id: str, command: TriageCommand, wait: bool) -> None:
    settings = load_settings()
    items = _read(settings)
    known = items.get(triage_id)
    if known is None:
        raise typer.BadParameter(f"no triage item {triage_id!r} (see `feedback triage --show all`)")
    try:
        send_command(settings, command)
    except Exception as exc:  # DeliveryError, KafkaException: one line, no traceback
        fail(f"the command was not acknowledged by Kafka at {settings.kafka_bootstrap}: {type(exc).__name__}")
    if not wait:
        console.print(f"sent: {command.op} {safe(triage_id)}")
        return
    deadline = time.monotonic() + APPLY_WAIT_S
    while time.monotonic() < deadline:
        now = _read(settings).get(triage_id)
        if now is not None and now.version > known.version:
            console.print(f"[green]{safe(now.status)}[/green]: {safe(triage_id)} (version {now.version})")
            return
        time.sleep(0.5)
    console.print(
        f"sent: {command.op} {safe(triage_id)}; the worker has not applied it yet "
        f"(it will when it runs: the command is in Kafka)"
    )


def _command(op: Literal["label", "resolve"], triage_id: str, **fields: str) -> TriageCommand:
    try:
        return TriageCommand(op=op, triage_id=triage_id, at_s=time.time(), **fields)
    except ValueError as exc:
        field, _, rule = str(exc).partition(": ")
        raise typer.BadParameter(rule or str(exc), param_hint=f"'{field}'") from None


@app.command()
def label(
    triage_id: Annotated[str, typer.Argument(help="The item's id (the event id).")],
    tag: Annotated[str, typer.Argument(help="A label: noise, bug, model_error, ... (a-z, 0-9, _ . -).")],
    note: Annotated[str, typer.Option(help="A short note (redacted like payloads).")] = "",
    by: Annotated[str, typer.Option(help="Who labels it (an operator handle).")] = "cli",
    wait: Annotated[bool, typer.Option(help="Wait until the worker has applied it.")] = True,
) -> None:
    """Label a triage item; a noise label counts against the source's reputation.

    The labels that do are FEEDBACK_TRIAGE_NOISE_LABELS (default: noise).

    Example: feedback label 6f1c2a0e-0d5b-4a8e-9d47-3f3f1b7f8a11 noise --note "bot traffic"
    """
    _change(triage_id, _command("label", triage_id, tag=tag, note=note, by=by), wait)


@app.command()
def resolve(
    triage_id: Annotated[str, typer.Argument(help="The item's id (the event id).")],
    note: Annotated[str, typer.Option(help="A short note (redacted like payloads).")] = "",
    by: Annotated[str, typer.Option(help="Who resolves it (an operator handle).")] = "cli",
    wait: Annotated[bool, typer.Option(help="Wait until the worker has applied it.")] = True,
) -> None:
    """Resolve a triage item (it leaves the queue; its history stays in Kafka and ClickHouse).

    Example: feedback resolve 6f1c2a0e-0d5b-4a8e-9d47-3f3f1b7f8a11 --note "fixed in m-2026.12"
    """
    _change(triage_id, _command("resolve", triage_id, note=note, by=by), wait)
