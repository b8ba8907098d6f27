"""A ``feedback bench`` result in a few figures: the summary line and the table's rows.

Pure functions over the result dict (``tests/unit/test_bench.py``); a stage that did not
run, or a figure that could not be measured, is simply absent or None, never a guess.
"""

from __future__ import annotations

from typing import Any

from benchmarks.stats import ratio

__all__ = ["TARGETS", "summarize", "table_rows"]

TARGETS = {"latency_p99_ms": 1000.0, "memory_peak_mb": 500.0, "scaleout_ratio": 1.5}


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of every stage that ran, flat, with ``targets_met`` for those with a target."""
    stages = result.get("stages", {})
    out: dict[str, Any] = {}
    worker = stages.get("worker") or {}
    for variant in ("bulk", "single"):
        run = worker.get(variant)
        if not run:
            continue
        w = _get(run, "worker", "events_per_s")
        out[f"worker_{variant}_events_per_s"] = w
        out[f"worker_{variant}_all_decided"] = _get(run, "worker", "all_decided")
        out[f"worker_{variant}_raw_messages"] = _get(run, "preload", "raw_messages")
        for base in ("naive", "bare"):
            b = _get(run, base, "events_per_s")
            if b is not None or base in run:
                out[f"{base}_{variant}_events_per_s"] = b
                out[f"worker_over_{base}_{variant}"] = ratio(w, b)
    state = stages.get("state") or {}
    for variant, figures in state.items():
        for what in ("reputation", "bias"):
            metric = figures.get(f"metrics_{what}_after_last_clean_s")
            topic = figures.get(f"topic_{what}_after_last_clean_s")
            out[f"state_{what}_{variant}_after_last_clean_s"] = metric if metric is not None else topic
    latency = stages.get("latency") or {}
    for variant in ("bulk", "single"):
        run = latency.get(variant)
        if not run:
            continue
        out[f"latency_{variant}_rate"] = run.get("rate")
        for q in ("p50_ms", "p95_ms", "p99_ms", "max_ms"):
            out[f"latency_{variant}_{q}"] = run.get(q)
        out[f"latency_{variant}_missing"] = run.get("missing")
        if run.get("cpu_us_per_event"):
            out[f"latency_{variant}_cpu_us_per_event"] = run["cpu_us_per_event"]
    if latency.get("ramp"):
        out["single_sustained_rate"] = latency["ramp"].get("best_rate")
    memory = stages.get("memory")
    if memory:
        out["memory_events"] = memory.get("events")
        out["memory_peak_mb"] = _get(memory, "rss_mb", "peak")
    scale = stages.get("scaleout")
    if scale:
        out["scaleout_1_events_per_s"] = _get(scale, "workers_1", "events_per_s")
        out["scaleout_2_events_per_s"] = _get(scale, "workers_2", "events_per_s")
        out["scaleout_ratio"] = scale.get("ratio")
    ingest = stages.get("ingest")
    if ingest:
        out["bare_producer_events_per_s"] = ingest.get("bare_events_per_s")
        out["client_bulk_events_per_s"] = ingest.get("client_bulk_events_per_s")
        out["client_thumbs_events_per_s"] = ingest.get("client_events_per_s")
        if ingest.get("gateway_batch_events_per_s") is not None:
            out["gateway_batch_events_per_s"] = ingest.get("gateway_batch_events_per_s")
            out["gateway_single_per_s"] = ingest.get("gateway_single_per_s")
    sink = stages.get("sink")
    if sink:
        out["sink_rows_per_s"] = sink.get("sink_rows_per_s")
        out["sink_bare_rows_per_s"] = sink.get("bare_rows_per_s")
        out["sink_ratio"] = sink.get("ratio")
        if "before_sink_rows_per_s" in sink:  # --server-src: the same through another tree's server
            out["sink_before_rows_per_s"] = sink["before_sink_rows_per_s"]
            out["sink_over_before"] = sink["sink_over_before"]
    out["targets_met"] = _targets(out)
    return out


def _targets(out: dict[str, Any]) -> dict[str, bool]:
    met: dict[str, bool] = {}
    for variant in ("bulk", "single"):
        if f"latency_{variant}_p99_ms" in out:
            p99 = out[f"latency_{variant}_p99_ms"]
            met[f"latency_{variant}_p99_under_1s"] = p99 is not None and p99 < TARGETS["latency_p99_ms"]
    if "memory_peak_mb" in out:
        peak = out["memory_peak_mb"]
        met["memory_under_500mb"] = peak is not None and peak < TARGETS["memory_peak_mb"]
    if "scaleout_ratio" in out:
        r = out["scaleout_ratio"]
        met["scaleout_1_5x"] = r is not None and r >= TARGETS["scaleout_ratio"]
    return met


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and abs(value) < 100:
        return f"{value:.3g}{unit}"
    if isinstance(value, int | float):
        return f"{value:,.0f}{unit}"
    return f"{value}{unit}"


def table_rows(summary: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(stage, what, value, beside it, ratio or target) per figure, for the rich table."""
    rows: list[tuple[str, str, str, str, str]] = []
    s = summary
    for variant in ("bulk", "single"):
        if f"worker_{variant}_events_per_s" not in s:
            continue
        decided = "all decided" if s.get(f"worker_{variant}_all_decided") else "NOT all decided"
        rows.append(("worker", f"{variant}: events/s ({_fmt(s.get(f'worker_{variant}_raw_messages'))} raw msgs, "
                     f"{decided})", _fmt(s[f"worker_{variant}_events_per_s"]), "", ""))  # fmt: skip
        for base in ("naive", "bare"):
            if f"{base}_{variant}_events_per_s" in s:
                rate = _fmt(s[f"{base}_{variant}_events_per_s"])
                over = _fmt(s[f"worker_over_{base}_{variant}"])
                rows.append(("worker", f"{variant}: {base} baseline events/s", rate, "", f"worker/{base} {over}"))
    for key, value in s.items():
        if key.startswith("state_"):
            rows.append(("state", key.removeprefix("state_").replace("_", " "), _fmt(value, " s"), "", ""))
    for variant in ("bulk", "single"):
        if f"latency_{variant}_p99_ms" in s:
            rows.append(("latency", f"{variant} at {_fmt(s.get(f'latency_{variant}_rate'))}/s: p50 / p95 / p99 / max",
                         " / ".join(_fmt(s.get(f"latency_{variant}_{q}")) for q in ("p50_ms", "p95_ms", "p99_ms",
                                                                                     "max_ms")) + " ms",
                         f"{_fmt(s.get(f'latency_{variant}_missing'))} batches missing",
                         f"p99 < 1 s: {_fmt(s['targets_met'].get(f'latency_{variant}_p99_under_1s'))}"))  # fmt: skip
        if s.get(f"latency_{variant}_cpu_us_per_event"):
            cpu = s[f"latency_{variant}_cpu_us_per_event"]
            rows.append(("latency", f"{variant}: CPU µs per event by process", _fmt(cpu.get("total")),
                         ", ".join(f"{k} {_fmt(v)}" for k, v in cpu.items() if k != "total"), ""))  # fmt: skip
    if "single_sustained_rate" in s:
        rows.append(("latency", "single-event messages sustained, events/s", _fmt(s["single_sustained_rate"]), "", ""))
    if "memory_peak_mb" in s:
        met = _fmt(s["targets_met"].get("memory_under_500mb"))
        rows.append(("memory", f"worker peak RSS after {_fmt(s.get('memory_events'))} events",
                     _fmt(s["memory_peak_mb"], " MB"), "", f"< 500 MB: {met}"))  # fmt: skip
    if "scaleout_ratio" in s:
        met = _fmt(s["targets_met"].get("scaleout_1_5x"))
        two, one = _fmt(s.get("scaleout_2_events_per_s")), _fmt(s.get("scaleout_1_events_per_s"))
        rows.append(
            ("scaleout", "2 workers / 1 worker, events/s", two, one, f"{_fmt(s['scaleout_ratio'])} (>= 1.5: {met})")
        )
    for key, label in (("client_bulk_events_per_s", "client emit_many events/s"),
                       ("client_thumbs_events_per_s", "client thumbs() events/s"),
                       ("gateway_batch_events_per_s", "gateway batch events/s"),
                       ("gateway_single_per_s", "gateway single POSTs/s")):  # fmt: skip
        if key in s:
            stage = "client" if key.startswith("client") else "gateway"
            rows.append((stage, label, _fmt(s[key]), f"bare producer {_fmt(s.get('bare_producer_events_per_s'))}",
                         f"{_fmt(ratio(s[key], s.get('bare_producer_events_per_s')))}"))  # fmt: skip
    if "sink_rows_per_s" in s:
        rows.append(("sink", "rows/s into ClickHouse", _fmt(s["sink_rows_per_s"]),
                     f"bare insert {_fmt(s.get('sink_bare_rows_per_s'))}", _fmt(s.get("sink_ratio"))))  # fmt: skip
    if "sink_before_rows_per_s" in s:
        rows.append(("sink", "rows/s, the --server-src server", _fmt(s["sink_before_rows_per_s"]),
                     f"this tree's server {_fmt(s.get('sink_rows_per_s'))}", _fmt(s.get("sink_over_before"))))  # fmt: skip
    return rows
