"""``feedback report``: satisfaction and success over a week or a month, against the period before.

Satisfaction is the mean ``value`` of the events that carry one (in [-1, 1]); the success
rate is the share of those whose value is above 0 (thumbs up, 4-5 stars, task success,
copy or citation clicks). Periods are rolling: a week is the 7 days before ``until``, the
previous week the 7 days before that (a month is 30 days). Every figure comes from
``feedback_events FINAL``, so a replayed batch is never counted twice.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pipeline.insights import Insights
from pipeline.private_files import make_private_dirs, open_private, write_private
from pipeline.since import to_micros
from pipeline.term import plain

__all__ = [
    "DIMENSIONS",
    "PERIOD_DAYS",
    "Metrics",
    "Report",
    "build_report",
    "format_change",
    "format_rate",
    "format_value",
    "render_html",
    "render_markdown",
    "write_charts",
    "write_report",
]

Period = Literal["week", "month"]
PERIOD_DAYS: dict[str, int] = {"week": 7, "month": 30}

#: Breakdown dimensions and the expression that names a row's group (an event counts once per tag).
DIMENSIONS: dict[str, str] = {
    "model_version": "ifNull(model_version, '(none)')",
    "prompt_version": "ifNull(prompt_version, '(none)')",
    "tag": "arrayJoin(if(empty(tags), ['(none)'], CAST(tags, 'Array(String)')))",
    "source": "toString(source)",
}


@dataclass(frozen=True)
class Metrics:
    """Counts for one group of events; ``rated`` events carry a value."""

    events: int = 0
    rated: int = 0
    value_sum: float = 0.0
    positive: int = 0

    @property
    def mean(self) -> float | None:
        """Satisfaction: the mean value (None without rated events)."""
        return self.value_sum / self.rated if self.rated else None

    @property
    def success(self) -> float | None:
        """Success rate: the share of rated events with a value above 0."""
        return self.positive / self.rated if self.rated else None


@dataclass
class Report:
    period: str
    previous_start: datetime
    start: datetime
    end: datetime
    current: Metrics = field(default_factory=Metrics)
    previous: Metrics = field(default_factory=Metrics)
    breakdowns: dict[str, list[tuple[str, Metrics, Metrics]]] = field(default_factory=dict)
    trend: list[tuple[date, Metrics]] = field(default_factory=list)
    worst: list[dict[str, Any]] = field(default_factory=list)
    insights: Insights | None = None
    table: str = "feedback_current"


# --- formatting (shared by the markdown and HTML renderings) ----------------------------------
def format_value(x: float | None) -> str:
    """A mean value with three decimals, or ``-`` when there is none."""
    return "-" if x is None else f"{x:.3f}"


def format_rate(x: float | None) -> str:
    """A share as a percentage with one decimal, or ``-``."""
    return "-" if x is None else f"{100 * x:.1f}%"


def format_change(current: float | None, previous: float | None, *, rate: bool = False) -> str:
    """The signed change from ``previous`` to ``current``: value points, or percentage points
    (``pp``) for rates; ``n/a`` when either side is missing."""
    if current is None or previous is None:
        return "n/a"
    delta = current - previous
    return f"{100 * delta:+.1f} pp" if rate else f"{delta:+.3f}"


# --- queries ---------------------------------------------------------------------------------
def _grouped(client: Any, table: str, key: str, report: Report, where: str = "") -> dict[tuple[str, bool], Metrics]:
    sql = (
        f"SELECT {key} AS key, ts >= fromUnixTimestamp64Micro({{start:Int64}}) AS is_current, count(), "
        "countIf(value IS NOT NULL), sum(ifNull(value, 0)), countIf(value > 0) "
        f"FROM {table} FINAL "
        "WHERE ts >= fromUnixTimestamp64Micro({prev:Int64}) AND ts < fromUnixTimestamp64Micro({end:Int64})"
        f"{where} GROUP BY key, is_current"
    )
    params = {"prev": to_micros(report.previous_start), "start": to_micros(report.start), "end": to_micros(report.end)}
    out: dict[tuple[str, bool], Metrics] = {}
    for k, is_current, events, rated, value_sum, positive in client.query(sql, parameters=params).result_rows:
        out[(str(k), bool(is_current))] = Metrics(int(events), int(rated), float(value_sum or 0.0), int(positive))
    return out


def build_report(
    client: Any,
    table: str,
    period: Period,
    until: datetime,
    *,
    worst_limit: int = 10,
    step: Callable[[str], None] | None = None,
) -> Report:
    """Query everything the report shows; ``step(name)`` is called after each query (progress).

    The worst-rated interactions are those of the current period with a negative mean value
    (at most ``worst_limit``, lowest first)."""
    days = PERIOD_DAYS[period]
    end = until.astimezone(UTC)
    report = Report(period, end - timedelta(days=2 * days), end - timedelta(days=days), end, table=table)
    done = step or (lambda _name: None)

    totals = _grouped(client, table, "''", report)
    report.current, report.previous = totals.get(("", True), Metrics()), totals.get(("", False), Metrics())
    done("totals")
    for name, expr in DIMENSIONS.items():
        groups = _grouped(client, table, expr, report)
        keys = sorted({k for k, _ in groups}, key=lambda k: (-groups.get((k, True), Metrics()).events, k))
        report.breakdowns[name] = [
            (k, groups.get((k, True), Metrics()), groups.get((k, False), Metrics())) for k in keys
        ]
        done(name)
    daily = _grouped(client, table, "toString(toDate(ts))", report)
    per_day: dict[date, Metrics] = {}
    for (day, _), m in daily.items():  # a day never straddles the boundary unless `until` is mid-day
        d = date.fromisoformat(day)
        old = per_day.get(d, Metrics())
        per_day[d] = Metrics(old.events + m.events, old.rated + m.rated, old.value_sum + m.value_sum,
                             old.positive + m.positive)  # fmt: skip
    report.trend = sorted(per_day.items())
    done("trend")
    worst_sql = (
        "SELECT interaction_id, count() AS n, avg(value) AS mean, argMax(toString(type), ts), "
        "argMax(ifNull(model_version, ''), ts), "
        # The worst comment: a non-empty one first, then the lowest value, then the latest (event_id breaks
        # a tie on ts), so the choice never depends on the order ClickHouse reads the rows in.
        "argMin(ifNull(payload_comment, ''), (ifNull(payload_comment, '') = '', value, "
        "-toUnixTimestamp64Micro(ts), event_id)) "
        f"FROM {table} FINAL "
        "WHERE ts >= fromUnixTimestamp64Micro({start:Int64}) AND ts < fromUnixTimestamp64Micro({end:Int64}) "
        "AND interaction_id IS NOT NULL AND value IS NOT NULL "
        "GROUP BY interaction_id HAVING mean < 0 ORDER BY mean ASC, n DESC, interaction_id LIMIT {limit:UInt32}"
    )
    params = {"start": to_micros(report.start), "end": to_micros(report.end), "limit": worst_limit}
    report.worst = [
        {"interaction_id": i, "feedback": int(n), "mean_value": float(mean), "last_type": t, "model_version": m or None,
         "comment": c or None}
        for i, n, mean, t, m, c in client.query(worst_sql, parameters=params).result_rows
    ]  # fmt: skip
    done("worst")
    return report


# --- charts ----------------------------------------------------------------------------------
def write_charts(report: Report, directory: Path, stem: str, image_format: str = "png") -> dict[str, Path]:
    """A trend line and breakdown bars as image files in ``directory``; returns them by name."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, Agg when saving

    make_private_dirs(directory)
    charts: dict[str, Path] = {}

    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.add_subplot()
    days = [d for d, _ in report.trend]
    nan = float("nan")
    ax.plot(days, [nan if m.mean is None else m.mean for _, m in report.trend], marker="o", label="satisfaction")
    ax.plot(days, [nan if m.success is None else m.success for _, m in report.trend], marker="s",
            label="success rate")  # fmt: skip
    ax.axvline(report.start.date(), color="grey", linestyle="--", linewidth=1, label="period start")  # type: ignore[arg-type]
    ax.set_ylim(-1.05, 1.05)
    ax.set_title(f"Daily satisfaction and success rate, previous and current {report.period}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.autofmt_xdate()
    charts["trend"] = directory / f"{stem}-trend.{image_format}"
    with open_private(charts["trend"], "wb") as fh:
        fig.savefig(fh, format=image_format, dpi=100)

    fig = Figure(figsize=(11, 8), layout="constrained")
    for ax, (name, rows) in zip(fig.subplots(2, 2).flat, report.breakdowns.items(), strict=True):
        top = [r for r in rows if r[1].rated or r[2].rated][:8]
        labels = [plain(k) for k, _, _ in top]  # event text: no control byte reaches a font or a log
        y = list(range(len(top)))
        ax.barh([i + 0.2 for i in y], [m.mean or 0.0 for _, m, _ in top], height=0.4, label="current")
        ax.barh([i - 0.2 for i in y], [m.mean or 0.0 for _, _, m in top], height=0.4, alpha=0.5, label="previous")
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_xlim(-1, 1)
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_title(f"Satisfaction by {name}")
        ax.legend(loc="lower right", fontsize="small")
    charts["breakdown"] = directory / f"{stem}-breakdown.{image_format}"
    with open_private(charts["breakdown"], "wb") as fh:
        fig.savefig(fh, format=image_format, dpi=100)
    return charts


# --- renderings --------------------------------------------------------------------------------
def _headline_rows(r: Report) -> list[tuple[str, str, str, str]]:
    c, p = r.current, r.previous
    events_change = f"{c.events - p.events:+d}"
    return [
        ("events", str(c.events), str(p.events), events_change),
        ("rated events", str(c.rated), str(p.rated), f"{c.rated - p.rated:+d}"),
        ("satisfaction (mean value)", format_value(c.mean), format_value(p.mean), format_change(c.mean, p.mean)),
        (
            "success rate",
            format_rate(c.success),
            format_rate(p.success),
            format_change(c.success, p.success, rate=True),
        ),
    ]


def _breakdown_rows(rows: Sequence[tuple[str, Metrics, Metrics]]) -> list[tuple[str, ...]]:
    return [
        (k, str(c.events), format_value(c.mean), format_rate(c.success), format_value(p.mean),
         format_change(c.mean, p.mean))
        for k, c, p in rows
    ]  # fmt: skip


_BREAKDOWN_HEAD = ("group", "events", "satisfaction", "success", "previous satisfaction", "change")
_WORST_HEAD = ("interaction", "feedback", "mean value", "last type", "model version", "worst comment")


def _worst_rows(r: Report) -> list[tuple[str, ...]]:
    return [
        (w["interaction_id"], str(w["feedback"]), format_value(w["mean_value"]), w["last_type"],
         w["model_version"] or "-", _short(w["comment"]))
        for w in r.worst
    ]  # fmt: skip


def _short(text: str | None, width: int = 80) -> str:
    if not text:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _title(r: Report) -> str:
    return f"Feedback report: {r.period} to {r.end:%Y-%m-%d %H:%M} UTC"


def _window(r: Report) -> str:
    return (
        f"Current {r.period}: {r.start:%Y-%m-%d %H:%M} to {r.end:%Y-%m-%d %H:%M} UTC; "
        f"previous: {r.previous_start:%Y-%m-%d %H:%M} to {r.start:%Y-%m-%d %H:%M} UTC."
    )


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return out if rows else [*out, "| " + " | ".join(["-"] * len(head)) + " |"]


def render_markdown(r: Report, charts: dict[str, Path]) -> str:
    """The report as markdown; charts are linked by file name (they sit next to the report)."""
    lines = [f"# {_title(r)}", "", _window(r), "", "## Summary", ""]
    lines += _md_table(("metric", "current", "previous", "change"), _headline_rows(r))
    if "trend" in charts:
        lines += ["", f"![Daily satisfaction and success rate]({charts['trend'].name})"]
    lines += ["", "## Breakdown", ""]
    if "breakdown" in charts:
        lines += [f"![Satisfaction by group]({charts['breakdown'].name})", ""]
    for name, rows in r.breakdowns.items():
        lines += [f"### By {name}", "", *_md_table(_BREAKDOWN_HEAD, _breakdown_rows(rows)), ""]
    lines += ["## Worst-rated interactions", "", *_md_table(_WORST_HEAD, _worst_rows(r)), ""]
    if r.insights is not None:
        lines += ["## Insights: what works and what doesn't", "", _insights_intro(r.insights), ""]
        lines += [*_md_table(_INSIGHT_HEAD, _insight_rows(r.insights)), ""]
    lines += [_definitions(r), ""]
    return "\n".join(lines)


def _definitions(r: Report) -> str:
    name = r.table.rsplit(".", 1)[-1]
    return (
        "Satisfaction is the mean `value` (in [-1, 1]) of the events that carry one; the success rate is "
        f"the share of them with a value above 0. Figures come from `{name} FINAL`."
    )


_INSIGHT_HEAD = ("dimension", "group", "compared to", "metric", "effect", "n", "interval")


def _insights_intro(ins: Insights) -> str:
    declines = len(ins.declines)
    return (
        f"Significant differences only ({ins.comparisons} comparisons, Benjamini-Hochberg at {ins.fdr:g}; "
        f"weighted by confidence, 1/sample_rate and source reputation; groups of at least {ins.min_samples} "
        f"opinions, {len(ins.insufficient)} smaller group(s) not ranked). Success-rate declines against the "
        f"previous period: {declines}. Details: `feedback insights`."
    )


def _insight_rows(ins: Insights) -> list[tuple[str, ...]]:
    rows = []
    for f in ins.significant:
        scale, digits, unit = (100.0, 1, " pp") if f.metric == "success_rate" else (1.0, 3, "")
        interval = f"{f.ci_low * scale:.{digits}f} to {f.ci_high * scale:.{digits}f} ({f.level * 100:.4g}%)"
        rows.append((f.dimension, f.group, f.compared_to, f.metric, f"{f.effect * scale:+.{digits}f}{unit}",
                     f"{f.n} vs {f.n_compared_to}", interval))  # fmt: skip
    return rows


def _html_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = html.escape
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr></thead><tbody>{body}</tbody></table>"


_MIME = {"png": "image/png", "svg": "image/svg+xml"}


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    mime = _MIME[path.suffix.lstrip(".")]
    return (
        f'<figure><img alt="{html.escape(alt)}" src="data:{mime};base64,{data}"><figcaption>{html.escape(alt)} '
        f'(also <a href="{html.escape(path.name)}">{html.escape(path.name)}</a>)</figcaption></figure>'
    )


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
    "th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}"
)


def render_html(r: Report, charts: dict[str, Path]) -> str:
    """The report as one HTML page; charts are embedded (data URIs), so the page stands alone."""
    esc = html.escape
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(_title(r))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{esc(_title(r))}</h1><p>{esc(_window(r))}</p>",
        "<h2>Summary</h2>",
        _html_table(("metric", "current", "previous", "change"), _headline_rows(r)),
    ]
    if "trend" in charts:
        parts.append(_img(charts["trend"], "Daily satisfaction and success rate"))
    parts.append("<h2>Breakdown</h2>")
    if "breakdown" in charts:
        parts.append(_img(charts["breakdown"], "Satisfaction by group, current and previous period"))
    for name, rows in r.breakdowns.items():
        parts += [f"<h3>By {esc(name)}</h3>", _html_table(_BREAKDOWN_HEAD, _breakdown_rows(rows))]
    parts += ["<h2>Worst-rated interactions</h2>", _html_table(_WORST_HEAD, _worst_rows(r))]
    if r.insights is not None:
        parts += ["<h2>Insights: what works and what doesn't</h2>",
                  f"<p>{esc(_insights_intro(r.insights)).replace('`', '')}</p>",
                  _html_table(_INSIGHT_HEAD, _insight_rows(r.insights))]  # fmt: skip
    parts += [f"<p>{esc(_definitions(r)).replace('`', '')}</p>", "</body></html>"]
    return "\n".join(parts) + "\n"


def write_report(r: Report, output: Path, fmt: Literal["md", "html"], image_format: str = "png") -> list[Path]:
    """The report at ``output`` and its charts next to it (``<stem>-trend.<fmt>``, ``<stem>-breakdown.<fmt>``);
    returns every file written, the report first."""
    charts = write_charts(r, output.parent, output.stem, image_format)
    text = render_markdown(r, charts) if fmt == "md" else render_html(r, charts)
    # Event text shows its control characters as escapes: `cat report.md` cannot drive the terminal.
    write_private(output, plain(text, newlines=True))
    return [output, *charts.values()]
