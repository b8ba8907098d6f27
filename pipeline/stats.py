"""What landed where: counts per Kafka topic, ClickHouse table and JSONL file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import StackError
from pipeline.kafka_admin import topic_message_counts
from pipeline.settings import Settings
from schemas.topics import Topics

__all__ = ["clickhouse_counts", "collect_stats", "jsonl_counts"]


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
    exists = {
        row[0]
        for row in client.query(
            "SELECT name FROM system.tables WHERE database = {db:String}", parameters={"db": db}
        ).result_rows
    }
    out: dict[str, Any] = {}
    if "feedback_events" in exists:
        out["feedback_events"] = int(client.command(f"SELECT count() FROM `{db}`.feedback_events"))
        out["feedback_events_final"] = int(client.command(f"SELECT count() FROM `{db}`.feedback_events FINAL"))
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


def collect_stats(settings: Settings) -> dict[str, Any]:
    """Counts for every store; a store that cannot be reached reports ``{"error": ...}``."""
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
    return stats
