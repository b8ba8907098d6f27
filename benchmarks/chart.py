"""Charts of a ``feedback bench`` result line: stage throughputs and the latency distribution.

    python -m benchmarks.chart                      # the last line of benchmarks/results/bench.jsonl
    python -m benchmarks.chart --line -2 --out docs --stem performance-before
    python -m benchmarks.chart --file other.jsonl --line 0

Writes ``<out>/<stem>-throughput.png`` (events/s per stage and its baselines, bars on a log
scale) and ``<out>/<stem>-latency.png`` (per-batch produce → visible latencies: the
distribution of each latency run, and the latency over the run's time). matplotlib's
object API (``Figure``, as ``pipeline/report.py`` uses it): no pyplot state, nothing shown.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import RESULTS

__all__ = ["latency_chart", "load_line", "throughput_bars", "throughput_chart", "write_charts"]

DOCS = Path(__file__).resolve().parent.parent / "docs"


def load_line(path: Path, index: int = -1) -> dict[str, Any]:
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"{path} holds no results")
    return dict(orjson.loads(lines[index]))


def throughput_bars(result: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(group, bar label, events/s) for every throughput the result has, in reading order."""
    stages = result.get("stages", {})
    bars: list[tuple[str, str, float]] = []

    def add(group: str, label: str, value: Any) -> None:
        if isinstance(value, int | float) and value > 0:
            bars.append((group, label, float(value)))

    for variant in ("bulk", "single"):
        run = (stages.get("worker") or {}).get(variant) or {}
        for name in ("worker", "naive", "bare"):
            add(f"worker ({variant})", name, (run.get(name) or {}).get("events_per_s"))
    scale = stages.get("scaleout") or {}
    for count in (1, 2):
        add("scale-out (12 partitions)", f"{count} worker{'s' if count > 1 else ''}",
            (scale.get(f"workers_{count}") or {}).get("events_per_s"))  # fmt: skip
    memory = stages.get("memory") or {}
    add("memory run", "worker", memory.get("events_per_s"))
    ingest = stages.get("ingest") or {}
    add("client", "emit_many", ingest.get("client_bulk_events_per_s"))
    add("client", "thumbs()", ingest.get("client_events_per_s"))
    add("client", "bare producer", ingest.get("bare_events_per_s"))
    add("gateway", "batches", ingest.get("gateway_batch_events_per_s"))
    add("gateway", "single POSTs", ingest.get("gateway_single_per_s"))
    sink = stages.get("sink") or {}
    add("sink (rows/s)", "EventSink", sink.get("sink_rows_per_s"))
    add("sink (rows/s)", "bare insert", sink.get("bare_rows_per_s"))
    return bars


def _title(result: dict[str, Any]) -> str:
    worker = (result.get("worker_src") or {}).get("commit") or result.get("commit")
    load = result.get("load_before")
    return f"feedback bench {result.get('at', '')} — worker {worker}, load {load}"


def throughput_chart(result: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure  # the object API: no pyplot state, Agg when saving

    bars = throughput_bars(result)
    fig = Figure(figsize=(10, max(3.0, 0.32 * len(bars) + 1.2)), layout="constrained")
    ax = fig.add_subplot()
    if not bars:
        ax.text(0.5, 0.5, "no throughput in this result", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    groups = list(dict.fromkeys(g for g, _, _ in bars))
    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
    colour = {g: palette[i % len(palette)] for i, g in enumerate(groups)}
    labels = [f"{g}: {label}" for g, label, _ in bars]
    values = [v for _, _, v in bars]
    y = list(range(len(bars)))[::-1]
    ax.barh(y, values, color=[colour[g] for g, _, _ in bars])
    ax.set_yticks(y, labels)
    ax.set_xscale("log")
    ax.set_xlabel("events/s (log scale)")
    for yi, v in zip(y, values, strict=True):
        ax.text(v, yi, f" {v:,.0f}", va="center", fontsize=8)
    ax.set_xlim(min(values) / 2, max(values) * 6)
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.set_title(_title(result), fontsize=9)
    return fig


def _latency_runs(result: dict[str, Any]) -> list[tuple[str, list[float | None]]]:
    latency = (result.get("stages") or {}).get("latency") or {}
    runs = []
    for variant, what in (("bulk", "emit_many"), ("single", "single-event messages")):
        run = latency.get(variant)
        if run and run.get("latencies_ms"):
            runs.append((f"{what} at {run.get('rate', 0):,.0f}/s", run["latencies_ms"]))
    return runs


def latency_chart(result: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    runs = _latency_runs(result)
    fig = Figure(figsize=(10, 4), layout="constrained")
    if not runs:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no latency run in this result", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    dist, over_time = fig.subplots(1, 2)
    for label, values in runs:
        seen = sorted(v for v in values if v is not None)
        missing = len(values) - len(seen)
        if seen:
            share = [(i + 1) / len(values) for i in range(len(seen))]
            dist.step(seen, share, where="post", label=f"{label}" + (f" ({missing} never seen)" if missing else ""))
        over_time.plot(range(len(values)), [v if v is not None else float("nan") for v in values], lw=0.8,
                       label=label)  # fmt: skip
    dist.axvline(1000, color="grey", ls="--", lw=0.8)
    dist.text(1000, 0.95, " 1 s", color="grey", fontsize=8)
    dist.set_xscale("log")
    dist.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    dist.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    dist.xaxis.set_minor_formatter(NullFormatter())
    dist.set_xlabel("batch latency, produce → visible in ClickHouse (ms, log)")
    dist.set_ylabel("share of batches")
    dist.set_ylim(0, 1.02)
    dist.grid(alpha=0.3)
    dist.legend(fontsize=8, loc="lower right")
    over_time.set_xlabel("batch (every 100 ms)")
    over_time.set_ylabel("latency (ms)")
    over_time.grid(alpha=0.3)
    fig.suptitle(_title(result), fontsize=9)
    return fig


def write_charts(result: dict[str, Any], out: Path = DOCS, stem: str = "performance") -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"throughput": out / f"{stem}-throughput.png", "latency": out / f"{stem}-latency.png"}
    throughput_chart(result).savefig(paths["throughput"], format="png", dpi=100)
    latency_chart(result).savefig(paths["latency"], format="png", dpi=100)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=RESULTS / "bench.jsonl")
    parser.add_argument("--line", type=int, default=-1, help="which result line (Python index; -1: the last)")
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--stem", default="performance")
    args = parser.parse_args()
    for name, path in write_charts(load_line(args.file, args.line), args.out, args.stem).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
