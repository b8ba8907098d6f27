"""The pure arithmetic of ``feedback bench``: rates, percentiles, batch latencies, summaries.

Nothing here touches Kafka, ClickHouse or a clock; ``tests/unit/test_bench.py`` checks it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "batch_latencies",
    "latency_summary",
    "parse_prometheus",
    "percentile",
    "prom_sum",
    "ratio",
    "span_rate",
    "sustained",
]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values`` by linear interpolation between the two
    nearest ranks (numpy's default); None for no values. An infinite value (a batch that
    never became visible) sorts last, so it is the percentile once ``q`` reaches its rank."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], not {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    a, b = ordered[low], ordered[high]
    if a == b or rank == low:  # also keeps inf - inf out of the interpolation
        return a
    if math.isinf(b):
        return b
    return a + (b - a) * (rank - low)


def span_rate(stamps: Iterable[tuple[int, int]]) -> dict[str, Any]:
    """Throughput from (timestamp in ms, events in that message) pairs, in any order.

    The clock runs from the first message to the last, so the events of the first
    millisecond are not counted: they arrived "at time zero" and count for nothing
    (without this, one message carrying many events would make a zero-length run
    infinitely fast). Fewer than two distinct timestamps give no rate (None)."""
    pairs = [(int(t), int(n)) for t, n in stamps if n > 0]
    events = sum(n for _, n in pairs)
    if not pairs:
        return {"events": 0, "first_ms": None, "last_ms": None, "seconds": None, "events_per_s": None}
    first = min(t for t, _ in pairs)
    last = max(t for t, _ in pairs)
    seconds = (last - first) / 1000
    counted = events - sum(n for t, n in pairs if t == first)
    rate = counted / seconds if seconds > 0 else None
    return {"events": events, "first_ms": first, "last_ms": last, "seconds": round(seconds, 3),
            "events_per_s": None if rate is None else round(rate, 1)}  # fmt: skip


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    """a / b rounded, None when either is unknown or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


def batch_latencies(sends: Sequence[tuple[str, float, int]], seen: Mapping[str, float | None]) -> list[float]:
    """Seconds from each batch's send to the moment all its events were visible.

    ``sends``: (tag, send time, events) per batch; ``seen``: tag → the first poll at which
    ClickHouse held all of that batch's events, None or absent if it never did. A batch never
    seen complete has latency ``inf``: it must count against the percentiles, not vanish
    from them. Visibility cannot precede the send; a poll clock a little ahead of the
    sender's (the same host, two processes) is clamped to 0."""
    out = []
    for tag, sent, _ in sends:
        visible = seen.get(tag)
        out.append(math.inf if visible is None else max(0.0, visible - sent))
    return out


def latency_summary(latencies: Sequence[float], *, target_s: float = 1.0) -> dict[str, Any]:
    """p50/p95/p99/max in milliseconds (None where the value is infinite), how many batches
    never became visible, and whether p99 is under ``target_s``."""

    def ms(value: float | None) -> float | None:
        return None if value is None or math.isinf(value) else round(value * 1000, 1)

    p99 = percentile(latencies, 99)
    return {
        "batches": len(latencies),
        "missing": sum(1 for v in latencies if math.isinf(v)),
        "p50_ms": ms(percentile(latencies, 50)),
        "p95_ms": ms(percentile(latencies, 95)),
        "p99_ms": ms(p99),
        "max_ms": ms(max(latencies)) if latencies else None,
        "p99_under_target": p99 is not None and p99 < target_s,
        "target_ms": target_s * 1000,
    }


def sustained(
    latencies: Sequence[float],
    *,
    rate_sent: float | None,
    rate_planned: float,
    limit_s: float = 2.0,
    min_share: float = 0.9,
) -> bool:
    """Did a ramp step keep up? Every batch visible, each batch of the step's second half
    within ``limit_s`` (a backlog that grows shows there first), and the publisher itself
    sent at least ``min_share`` of the planned rate (else the step measured the publisher)."""
    if not latencies or rate_planned <= 0 or rate_sent is None or rate_sent < min_share * rate_planned:
        return False
    if any(math.isinf(v) for v in latencies):
        return False
    return max(latencies[len(latencies) // 2 :]) <= limit_s


# --- Prometheus text ------------------------------------------------------------------
def parse_prometheus(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of a Prometheus text exposition: (name, sorted labels) → value. Comments and
    malformed lines are skipped (a scrape must never fail the benchmark)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            if "{" in line:
                name, rest = line.split("{", 1)
                body, value = rest.rsplit("}", 1)
                labels = []
                for part in _split_labels(body):
                    key, _, raw = part.partition("=")
                    labels.append((key.strip(), raw.strip().strip('"')))
                key_labels = tuple(sorted(labels))
            else:
                name, value = line.split(None, 1)
                key_labels = ()
            out[(name.strip(), key_labels)] = float(value.split()[0])
        except (ValueError, IndexError):
            continue
    return out


def _split_labels(body: str) -> list[str]:
    parts, current, quoted, escaped = [], [], False, False
    for ch in body:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if "".join(current).strip():
        parts.append("".join(current))
    return parts


def prom_sum(samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """Sum of ``name`` over every label set that includes ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))
