"""``feedback insights`` and ``feedback suggest``: what works and what doesn't, with confidence.

Exit codes: 0 done; 3 a success rate declined significantly against the previous period (so
cron or alerting can act; the findings are printed as usual); 1 an error; 2 a bad option.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
from rich.console import Console
from rich.table import Table

from pipeline.cli_app import app, console, print_json
from pipeline.cli_app import settings as load_settings
from pipeline.insights import DIMENSIONS, Group, Insights, parse_dimension, t_interval, wilson
from pipeline.insights_query import load_insights
from pipeline.private_files import make_private_dirs
from pipeline.query_cli import clickhouse_client, fail
from pipeline.since import parse_time
from pipeline.suggest import hook_input, load_hook, suggest
from pipeline.term import safe

__all__ = ["DECLINE_EXIT", "Window", "decline_registry", "group_json", "run_insights"]

#: The exit code of a run that found a significant decline of a success rate.
DECLINE_EXIT = 3


@dataclass(frozen=True)
class Window:
    previous_start: datetime
    start: datetime
    end: datetime


def _window(days: int, until: str | None) -> Window:
    now = datetime.now(UTC)
    try:
        end = parse_time(until, now) if until else now
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--until'") from None
    span = timedelta(days=days)
    return Window(end - 2 * span, end - span, end)


def _dimensions(by: list[str] | None) -> tuple[str, ...]:
    if not by:
        return DIMENSIONS
    try:
        return tuple(dict.fromkeys(parse_dimension(b) for b in by))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--by'") from None


def run_insights(days: int, min_samples: int, by: list[str] | None, until: str | None) -> tuple[Insights, Window, str]:
    """Fetch the sums and analyse them; returns the insights, the window and the table read."""
    dims = _dimensions(by)
    window = _window(days, until)
    settings = load_settings()
    with clickhouse_client(settings) as client:
        found, table = load_insights(client, settings.clickhouse_database, settings.clickhouse_cluster,
                                     window.previous_start, window.start, window.end, dimensions=dims,
                                     min_samples=min_samples)  # fmt: skip
    return found, window, table


def decline_registry(insights: Insights) -> CollectorRegistry:
    """A registry with the declines as gauges: ``feedback_insights_declines`` (how many) and
    ``feedback_insights_success_rate_decline{dimension, group}`` (the fall, as a share)."""
    registry = CollectorRegistry()
    count = Gauge("feedback_insights_declines", "Significant success-rate declines against the previous period.",
                  registry=registry)  # fmt: skip
    fall = Gauge("feedback_insights_success_rate_decline", "Fall of the success rate against the previous period.",
                 ["dimension", "group"], registry=registry)  # fmt: skip
    declines = insights.declines
    count.set(len(declines))
    for f in declines:
        fall.labels(f.dimension, f.group).set(-f.effect)
    return registry


def group_json(g: Group) -> dict[str, Any]:
    """A group's figures for ``--json``: n, n_eff, success rate and mean with their 95% intervals."""
    c = g.current
    rate_ci = wilson(c.rate, c.n_eff) if c.rate is not None else None
    mean_ci = t_interval(c)
    return {"dimension": g.dimension, "group": g.name, "n": c.n, "n_eff": round(c.n_eff, 3),
            "success_rate": None if c.rate is None else round(c.rate, 6),
            "success_ci": None if rate_ci is None else [round(x, 6) for x in rate_ci],
            "mean_value": None if c.mean is None else round(c.mean, 6),
            "mean_ci": None if mean_ci is None else [round(x, 6) for x in mean_ci],
            "previous_n": g.previous.n}  # fmt: skip


def _fmt_ci(ci: tuple[float, float] | list[float] | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if ci is None else f"{ci[0] * scale:.{digits}f} to {ci[1] * scale:.{digits}f}"


def _print(insights: Insights, window: Window, table: str, dims: tuple[str, ...]) -> None:
    out = Console()
    out.print(f"Insights: {window.start:%Y-%m-%d %H:%M} to {window.end:%Y-%m-%d %H:%M} UTC against the "
              f"{(window.start - window.previous_start).days} days before; opinions from {safe(table)} FINAL; "
              f"{insights.comparisons} comparison(s), Benjamini-Hochberg at {insights.fdr:g}.")  # fmt: skip
    sig = insights.significant
    for title, rows in (("What works and what doesn't", [f for f in sig if not f.is_change]),
                        ("Against the previous period", [f for f in sig if f.is_change])):  # fmt: skip
        t = Table("dimension", "group", "compared to", "metric", "effect", "n", "interval", "level", title=title)
        for f in rows:
            scale, digits = (100.0, 1) if f.metric == "success_rate" else (1.0, 3)
            unit = " pp" if f.metric == "success_rate" else ""
            mark = " (decline)" if f in insights.declines else ""
            t.add_row(safe(f.dimension), safe(f.group), safe(f.compared_to), f.metric + mark,
                      f"{f.effect * scale:+.{digits}f}{unit}", f"{f.n} vs {f.n_compared_to}",
                      _fmt_ci((f.ci_low, f.ci_high), scale, digits), f"{f.level * 100:.4g}%")  # fmt: skip
        out.print(t if rows else f"{title}: no significant difference.")
    groups = Table("dimension", "group", "n", "n_eff", "success rate (95% Wilson)", "mean value (95% t)",
                   title=f"Groups with at least {insights.min_samples} opinions")  # fmt: skip
    for g in insights.groups:
        if g.dimension in dims and g.current.n >= insights.min_samples:
            j = group_json(g)
            groups.add_row(safe(g.dimension), safe(g.name), str(j["n"]), f"{j['n_eff']:.1f}",
                           f"{j['success_rate'] * 100:.1f}% ({_fmt_ci(j['success_ci'], 100, 1)})",
                           f"{j['mean_value']:+.3f} ({_fmt_ci(j['mean_ci'])})")  # fmt: skip
    out.print(groups)
    if insights.insufficient:
        listed = ", ".join(f"{g.dimension} {g.name} ({g.current.n})" for g in insights.insufficient[:40])
        more = f" and {len(insights.insufficient) - 40} more" if len(insights.insufficient) > 40 else ""
        out.print(f"Insufficient (under {insights.min_samples} opinions, not ranked): {safe(listed)}{more}")


_DAYS = typer.Option(min=1, max=365, help="Length of the current period; the previous is as long, just before.")
_MIN = typer.Option(min=2, help="Groups with fewer opinions are listed as insufficient, not compared.")
_BY = typer.Option("--by", help="A dimension or a pair (prompt_version/tag); repeat for several (default: all).")
_UNTIL = typer.Option(help="End of the current period (default now): 7d, an ISO date/time.")


@app.command(epilog="Example: feedback insights --days 7 --by prompt_version/tag --json  (exit 3: a decline)")
def insights(
    days: Annotated[int, _DAYS] = 7,
    min_samples: Annotated[int, _MIN] = 30,
    by: Annotated[list[str] | None, _BY] = None,
    until: Annotated[str | None, _UNTIL] = None,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"findings": [...], ...}.')] = False,
    prom_file: Annotated[Path | None, typer.Option(help="Also write the decline gauges to this textfile.")] = None,
) -> None:
    """Success rate and mean value per group, what differs significantly, and changes against the
    previous period. Exit code 3 when a success rate declined significantly."""
    result, window, table = run_insights(days, min_samples, by, until)
    if prom_file is not None:
        make_private_dirs(prom_file.parent)
        write_to_textfile(str(prom_file), decline_registry(result))
    if as_json:
        print_json({"findings": [f.to_json() for f in result.findings],
                    "groups": [group_json(g) for g in result.groups],
                    "insufficient": [{"dimension": g.dimension, "group": g.name, "n": g.current.n}
                                     for g in result.insufficient],
                    "declines": [f.to_json() for f in result.declines],
                    "window": {"previous_start": window.previous_start.isoformat(), "start": window.start.isoformat(),
                               "end": window.end.isoformat()},
                    "table": table, "comparisons": result.comparisons, "fdr": result.fdr,
                    "min_samples": result.min_samples})  # fmt: skip
    else:
        _print(result, window, table, _dimensions(by))
    if result.declines:
        console.print(
            f"[yellow]{len(result.declines)} significant success-rate decline(s)[/yellow]; exit {DECLINE_EXIT}"
        )
        raise typer.Exit(DECLINE_EXIT)


@app.command("suggest", epilog="Example: feedback suggest --days 7 --json")
def suggest_command(
    days: Annotated[int, _DAYS] = 7,
    min_samples: Annotated[int, _MIN] = 30,
    by: Annotated[list[str] | None, _BY] = None,
    until: Annotated[str | None, _UNTIL] = None,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"suggestions": [...]}.')] = False,
) -> None:
    """Recommendations from the significant findings, highest impact first, each citing its numbers."""
    settings = load_settings()
    hook = None
    if settings.suggest_text_hook:
        try:
            hook = load_hook(settings.suggest_text_hook)
        except ValueError as exc:
            fail(str(exc))
    result, _, _ = run_insights(days, min_samples, by, until)
    found = suggest(result)
    summary = hook(hook_input(found)) if hook is not None and found else None
    if as_json:
        print_json({"suggestions": [s.to_json() for s in found], "summary": summary})
        return
    out = Console()
    if not found:
        out.print("No suggestion: no significant difference in this period.")
    for i, s in enumerate(found, start=1):
        out.print(f"{i}. {safe(s.text)}", soft_wrap=True)
    if summary:
        out.print(f"\nSummary: {safe(summary)}", soft_wrap=True)
