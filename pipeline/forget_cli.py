"""``feedback forget``: the erasure command (the steps are in :mod:`pipeline.forget`).

It registers on :data:`pipeline.cli_app.app` (``pipeline/cli.py`` imports this module).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli_app import app, console, print_json
from pipeline.cli_app import settings as load_settings
from pipeline.errors import StackError
from pipeline.query_cli import fail
from pipeline.term import safe

__all__ = ["forget_command"]


@app.command("forget")
def forget_command(
    user_id: Annotated[
        str | None, typer.Option("--user-id", help="The user's id as your services send it (pseudonym derived).")
    ] = None,
    pseudonym: Annotated[
        str | None, typer.Option("--pseudonym", help="Or the pseudonymized id, as stored (e.g. from ClickHouse).")
    ] = None,
    wait_s: Annotated[
        float, typer.Option("--wait", min=0, max=3600, help="Seconds to wait for the pipeline to catch up.")
    ] = 120.0,
    drain: Annotated[
        bool, typer.Option(help="Wait for events in flight to land before erasing (--no-drain: erase what has).")
    ] = True,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Erase a user (GDPR): their events in ClickHouse and the JSONL files, their triage items,
    their interaction contexts and rate-limit entry (tombstoned in the compacted topics).

    Prints what was erased, then checks by query and by scanning the files that nothing is
    left. Exits 1 if a step is still pending (a stopped worker or sink); running it again is
    harmless. Topics with time retention keep the user's events until they age out.

    Example: feedback forget --user-id u-1234 --yes
    """
    from pipeline.forget import forget, user_ids

    if (user_id is None) == (pseudonym is None):
        raise typer.BadParameter("give exactly one of --user-id and --pseudonym", param_hint="'--user-id'")
    given = (user_id or pseudonym or "").strip()
    if not given or len(given) > 256:
        raise typer.BadParameter("must be 1-256 characters", param_hint="'--user-id' / '--pseudonym'")
    if not yes:
        if not sys.stdin.isatty():
            raise typer.BadParameter("erasure cannot be undone: confirm with --yes", param_hint="'--yes'")
        typer.confirm("Erase this user from every store? This cannot be undone", abort=True)
    settings = load_settings()
    try:
        ids = user_ids(settings, user_id, pseudonym)
        with console.status("erasing") as status:
            report = forget(
                settings, given, ids, wait_s=wait_s, drain=drain, step=lambda text: status.update(f"erasing: {text}")
            )
    except StackError as exc:
        fail(str(exc))
    except Exception as exc:  # Kafka or ClickHouse unreachable mid-way: one line; running again is harmless
        fail(f"erasure stopped ({type(exc).__name__}: {str(exc)[:200]}); nothing is half-written: run it again")
    if as_json:
        print_json(
            {"erased": report.erased, "remaining": report.remaining, "pending": report.pending,
             "ageing_days": report.ageing, "complete": report.complete}
        )  # fmt: skip
    else:
        table = Table("store", "erased", "left (checked)")
        left = dict(report.remaining)
        for store, count in report.erased.items():
            table.add_row(safe(store), str(count), "")
        for store, count in left.items():
            table.add_row(safe(store), "", f"[{'red' if count else 'green'}]{count}[/]")
        console.print(table)
        for topic, days in report.ageing.items():
            console.print(f"{safe(topic)}: the user's events age out within {days:g} day(s) (time retention)")
        for line in report.pending:
            console.print(f"[yellow]pending[/yellow]: {safe(line)}")
        console.print("[green]erased[/green]" if report.complete else "[yellow]not complete[/yellow]: run it again")
    if not report.complete:
        raise typer.Exit(1)
