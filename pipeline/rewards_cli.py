"""``feedback rewards [watch] [--json]``: each arm's reward statistics, for model routers.

Read from the compacted ``feedback.rewards.v1`` (the worker's rewards table, published at
most once per key and publish interval). One record per arm, as published: the posterior
as of ``updated_at`` (the newest event time applied). Registers on :data:`pipeline.cli_app.app`.
"""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli_app import app, print_json
from pipeline.cli_app import settings as load_settings
from pipeline.term import plain, safe
from schemas.reward_records import RewardRecord

__all__ = ["reward_row", "rewards"]

FIELDS = ("model_version", "prompt_version", "tag", "mean", "ci_low", "ci_high", "weight", "events", "updated_at")


def reward_row(record: RewardRecord) -> dict[str, Any]:
    """One arm's line: :data:`FIELDS` (mean and its 95% interval, the decayed evidence weight)."""
    full = record.to_json()
    return {name: full[name] for name in FIELDS}


@app.command()
def rewards(
    mode: Annotated[str | None, typer.Argument(help="`watch`: print the current values, then each update.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON lines with watch).")] = False,
    max_seconds: Annotated[float | None, typer.Option(help="Stop watching after this long.")] = None,
) -> None:
    """Reward statistics per arm (model version x prompt version, optionally x a context tag)."""
    from producers.subscriber import RewardSubscriber

    if mode not in (None, "watch"):
        raise typer.BadParameter(f"unknown mode {mode!r}; the only mode is `watch`", param_hint="MODE")
    with RewardSubscriber(load_settings()) as subscriber:
        records = [r for _, r in sorted(subscriber.snapshot().items())]
        if mode is None:
            rows = [reward_row(r) for r in records]
            if as_json:
                print_json(rows)
                return
            table = Table(*FIELDS, title="Rewards per arm")
            for r in rows:
                table.add_row(
                    safe(r["model_version"]), safe(r["prompt_version"] or "-"), safe(r["tag"] or "-"),
                    f"{r['mean']:.4f}", f"{r['ci_low']:.4f}", f"{r['ci_high']:.4f}", f"{r['weight']:.3f}",
                    str(r["events"]), safe(r["updated_at"]),
                )  # fmt: skip
            Console().print(table)
            return
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        pending = records
        try:
            while deadline is None or time.monotonic() < deadline:
                for record in pending or subscriber.poll(0.5):
                    line = reward_row(record)
                    if as_json:
                        sys.stdout.write(orjson.dumps(line).decode() + "\n")
                    else:
                        ci = f"[{line['ci_low']:.4f}, {line['ci_high']:.4f}]"
                        sys.stdout.write(f"{plain(record.key)}  {line['mean']:.4f} {ci}  weight {line['weight']:.3f}\n")
                    sys.stdout.flush()
                pending = []
        except KeyboardInterrupt:  # Ctrl-C ends a watch; not an error
            return
