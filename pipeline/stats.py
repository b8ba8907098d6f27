"""What landed where: counts per Kafka topic, ClickHouse table and JSONL file; with ``detail``
also totals by source and type, rejection reasons, sampling, and the current source reputation
and directive bias (read from their compacted topics)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.errors import StackError
from pipeline.kafka_admin import topic_message_counts
from pipeline.settings import Settings
from pipeline.term import safe
from schemas.topics import Topics

__all__ = ["analyst_counts", "clickhouse_counts", "collect_stats", "jsonl_counts", "print_stats", "state_snapshot"]


def _tables(client: Any, db: str) -> set[str]:
    """The tables of database ``db`` (a missing table means "nothing yet", not an error)."""
    rows = client.query("SELECT name FROM system.tables WHERE database = {db:String}", parameters={"db": db})
    return {row[0] for row in rows.result_rows}


def jsonl_counts(directory: Path) -> dict[str, int]:
    """Lines per daily file (gzipped closed days are counted too)."""
    import gzip

    counts: dict[str, int] = {}
    for path in sorted(Path(directory).glob("feedback-*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            counts[path.name] = sum(1 for _ in fh)
    return counts


def clickhouse_counts(settings: Settings) -> dict[str, Any]:
    """Row counts per table; ``feedback_events`` also after FINAL (deduplicated).

    ``dlq_events`` and ``rejected_events`` are counted after FINAL; ``rejected_by_reason``
    breaks the latter down by the gate's reason.
    """
    from sinks.clickhouse import connect

    client = connect(settings)
    db = settings.clickhouse_database
    exists = _tables(client, db)
    out: dict[str, Any] = {}
    if "feedback_events" in exists:
        out["feedback_events"] = int(client.command(f"SELECT count() FROM `{db}`.feedback_events"))
        out["feedback_events_final"] = int(client.command(f"SELECT count() FROM `{db}`.feedback_events FINAL"))
    if "feedback_current" in exists:  # opinions: the latest revision of each
        out["feedback_current_final"] = int(client.command(f"SELECT count() FROM `{db}`.feedback_current FINAL"))
    if "dlq_events" in exists:
        out["dlq_events"] = int(client.command(f"SELECT count() FROM `{db}`.dlq_events FINAL"))
    if "rejected_events" in exists:
        out["rejected_events"] = int(client.command(f"SELECT count() FROM `{db}`.rejected_events FINAL"))
        reasons = client.query(
            f"SELECT reason, count() FROM `{db}`.rejected_events FINAL GROUP BY reason ORDER BY reason"
        ).result_rows
        out["rejected_by_reason"] = {str(reason): int(n) for reason, n in reasons}
    return out


def _rejected_summary(stats: dict[str, Any], topic: str) -> dict[str, Any]:
    """The gate's refusals in one place: messages on the rejected topic, rows (FINAL), per reason."""
    kafka, ch = stats.get("kafka", {}), stats.get("clickhouse", {})
    return {
        "topic": topic,
        "kafka": kafka.get(topic),
        "clickhouse_final": ch.get("rejected_events"),
        "by_reason": ch.get("rejected_by_reason", {}),
    }


def analyst_counts(settings: Settings) -> dict[str, Any]:
    """What the analyst's ``stats`` adds, from ClickHouse (FINAL): ``totals`` per source and type
    (kept, estimated before sampling, mean value; opinions from ``feedback_current``, the latest
    revision of each, where that table exists), ``rejections`` per reason and field, and
    ``sampling`` per type (kept, sampled, lowest rate, estimated: every event the gate let through,
    from ``feedback_events``). Missing tables give empty lists."""
    from sinks.clickhouse import connect

    client = connect(settings)
    db = settings.clickhouse_database
    exists = _tables(client, db)
    out: dict[str, Any] = {"totals": [], "rejections": [], "sampling": []}
    if "feedback_events" in exists:
        opinions = "feedback_current" if "feedback_current" in exists else "feedback_events"
        rows = client.query(
            "SELECT source, type, count(), sum(1 / ifNull(sample_rate, 1)), countIf(value IS NOT NULL), "
            f"sum(ifNull(value, 0)) FROM `{db}`.{opinions} FINAL GROUP BY source, type ORDER BY source, type"
        ).result_rows
        out["totals"] = [
            {"source": src, "type": typ, "events": int(n), "estimated": round(float(est), 1), "rated": int(rated),
             "mean_value": round(float(vsum) / rated, 4) if rated else None}
            for src, typ, n, est, rated, vsum in rows
        ]  # fmt: skip
        rows = client.query(
            "SELECT type, count(), countIf(ifNull(sample_rate, 1) < 1), min(ifNull(sample_rate, 1)), "
            f"sum(1 / ifNull(sample_rate, 1)) FROM `{db}`.feedback_events FINAL GROUP BY type ORDER BY type"
        ).result_rows
        configured = settings.sample_rates
        out["sampling"] = [
            {"type": typ, "kept": int(n), "sampled": int(sampled), "lowest_rate": float(low),
             "configured_rate": configured.get(typ, 1.0), "estimated": round(float(est), 1)}
            for typ, n, sampled, low, est in rows
        ]  # fmt: skip
    if "rejected_events" in exists:
        rows = client.query(
            f"SELECT reason, field, count() AS n FROM `{db}`.rejected_events FINAL GROUP BY reason, field "
            "ORDER BY n DESC, reason, field"
        ).result_rows
        out["rejections"] = [{"reason": str(r), "field": str(f), "count": int(n)} for r, f, n in rows]
    return out


def state_snapshot(settings: Settings, timeout_s: float = 10.0) -> dict[str, Any]:
    """Current ``reputation`` per source and directive ``bias`` (decayed to now) from the compacted
    topics; a topic that cannot be read gives ``{"error": ...}`` in its place."""
    from producers.subscriber import read_bias, read_reputation

    out: dict[str, Any] = {}
    try:
        out["reputation"] = [r.to_json() for _, r in sorted(read_reputation(settings, timeout_s).items())]
    except Exception as exc:  # report, don't crash: stats is a diagnostic
        out["reputation"] = {"error": str(exc)}
    now = datetime.now(UTC)
    try:
        out["bias"] = [
            {**r.to_json(), "value_now": round(r.at(now), 6)} for _, r in sorted(read_bias(settings, timeout_s).items())
        ]
    except Exception as exc:
        out["bias"] = {"error": str(exc)}
    return out


def collect_stats(settings: Settings, *, detail: bool = False) -> dict[str, Any]:
    """Counts for every store; a store that cannot be reached reports ``{"error": ...}``.

    With ``detail``, also :func:`analyst_counts` (under ``analytics``) and :func:`state_snapshot`
    (``reputation``, ``bias``)."""
    topics = Topics(settings.topic_prefix)
    stats: dict[str, Any] = {}
    try:
        stats["kafka"] = topic_message_counts(settings, list(topics.specs()))
    except Exception as exc:  # report, don't crash: stats is a diagnostic
        stats["kafka"] = {"error": str(exc)}
    try:
        stats["clickhouse"] = clickhouse_counts(settings)
    except StackError as exc:
        stats["clickhouse"] = {"error": str(exc)}
    stats["rejected"] = _rejected_summary(stats, topics.rejected)
    files = jsonl_counts(settings.path)
    stats["jsonl"] = {"path": str(settings.path), "files": files, "lines": sum(files.values())}
    if detail:
        if "error" in stats["clickhouse"]:
            stats["analytics"] = {"error": stats["clickhouse"]["error"]}
        else:
            try:
                stats["analytics"] = analyst_counts(settings)
            except Exception as exc:  # e.g. the server went away between the two reads
                stats["analytics"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        stats.update(state_snapshot(settings, timeout_s=5.0))
    return stats


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_stats(data: dict[str, Any], console: Console | None = None) -> None:
    """``collect_stats(..., detail=True)`` as readable tables (on stdout unless ``console`` says)."""
    out = console or Console()
    landed = Table("where", "what", "count", title="What landed")
    for name, count in data.get("kafka", {}).items():
        landed.add_row("kafka", safe(name), str(count))
    for name, count in data.get("clickhouse", {}).items():
        if isinstance(count, dict):
            for part, n in count.items():
                landed.add_row("clickhouse", safe(f"{name.removesuffix('_by_reason')}: {part}"), str(n))
        else:
            landed.add_row("clickhouse", safe(name), str(count))
    for name, count in data.get("jsonl", {}).get("files", {}).items():
        landed.add_row("jsonl", safe(name), str(count))
    out.print(landed)

    analytics = data.get("analytics", {})
    if "error" not in analytics:  # else the caller says it, once
        totals = Table("source", "type", "events", "estimated", "rated", "mean value",
                       title="Totals by source and type (estimated: re-weighted by 1/sample_rate)")  # fmt: skip
        for t in analytics.get("totals", []):
            totals.add_row(safe(t["source"]), safe(t["type"]), str(t["events"]), f"{t['estimated']:g}", str(t["rated"]),
                           _fmt(t["mean_value"]))  # fmt: skip
        out.print(totals)
        rejections = Table("reason", "field", "count", title="Rejection reasons")
        for r in analytics.get("rejections", []):
            rejections.add_row(safe(r["reason"]), safe(r["field"] or "-"), str(r["count"]))
        out.print(rejections)
        sampling = Table("type", "kept", "sampled", "lowest rate", "configured rate", "estimated", title="Sampling")
        for s in analytics.get("sampling", []):
            sampling.add_row(safe(s["type"]), str(s["kept"]), str(s["sampled"]), f"{s['lowest_rate']:g}",
                             f"{s['configured_rate']:g}", f"{s['estimated']:g}")  # fmt: skip
        out.print(sampling)

    reputation = data.get("reputation", [])
    if isinstance(reputation, dict):
        out.print(f"[yellow]reputation[/yellow]: {safe(reputation.get('error'))}")
    else:
        table = Table("source", "score", "observations", "down-weighted", "weight", title="Source reputation (now)")
        for r in reputation:
            down = "yes" if r["downweighted"] else "no"
            table.add_row(safe(r["source"]), f"{r['score']:.4f}", str(r["observations"]), down, f"{r['weight']:.3f}")
        out.print(table)
    bias = data.get("bias", [])
    if isinstance(bias, dict):
        out.print(f"[yellow]directive bias[/yellow]: {safe(bias.get('error'))}")
    else:
        table = Table("directive", "model version", "value", "now", "updated at", "events", title="Directive bias")
        for b in bias:
            table.add_row(safe(b["directive"]), safe(b["model_version"] or "-"), f"{b['value']:.4f}",
                          f"{b['value_now']:.4f}", safe(b["updated_at"]), str(b["events"]))  # fmt: skip
        out.print(table)
