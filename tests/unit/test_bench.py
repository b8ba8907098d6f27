"""The pure parts of ``feedback bench``: percentiles, rates, batch latencies, the summary."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.append(str(ROOT))

from benchmarks.stats import (  # noqa: E402
    batch_latencies,
    latency_summary,
    parse_prometheus,
    percentile,
    prom_sum,
    ratio,
    span_rate,
    sustained,
)
from benchmarks.suite import ALL_STAGES, DEFAULT_STAGES, parse_stages  # noqa: E402
from benchmarks.summary import summarize, table_rows  # noqa: E402
from benchmarks.workload import events  # noqa: E402


# --- percentiles -------------------------------------------------------------------
def test_percentile_interpolates_like_numpy() -> None:
    np = pytest.importorskip("numpy")
    values = [0.3, 0.1, 0.7, 0.2, 1.5, 0.9, 0.4]
    for q in (0, 1, 25, 50, 90, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges() -> None:
    assert percentile([], 50) is None
    assert percentile([4.0], 99) == 4.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_a_batch_never_seen_counts_against_the_high_percentiles() -> None:
    values = [0.1] * 99 + [math.inf]
    assert percentile(values, 50) == pytest.approx(0.1)
    assert math.isinf(percentile(values, 100))  # type: ignore[arg-type]
    # Between a finite value and inf the percentile is inf, never a NaN from inf - x.
    assert math.isinf(percentile([0.1, math.inf], 75))  # type: ignore[arg-type]


# --- rates ----------------------------------------------------------------------------
def test_span_rate_does_not_count_the_first_instant() -> None:
    # 1,000 events at t=0 (one envelope), then 10 messages of 100 over one second.
    stamps = [(1_000, 1000)] + [(1_000 + 100 * (i + 1), 100) for i in range(10)]
    rate = span_rate(stamps)
    assert rate["events"] == 2000
    assert rate["seconds"] == 1.0
    assert rate["events_per_s"] == 1000.0  # not 2000: the first message arrived "at time zero"


def test_span_rate_order_and_empty_messages_do_not_matter() -> None:
    stamps = [(3_000, 10), (1_000, 10), (2_000, 0), (2_000, 10)]
    assert span_rate(stamps)["events_per_s"] == 10.0
    assert span_rate(reversed(stamps))["events_per_s"] == 10.0


def test_span_rate_without_a_span_gives_no_rate() -> None:
    assert span_rate([])["events_per_s"] is None
    assert span_rate([(5, 100), (5, 100)])["events_per_s"] is None  # all in one millisecond


def test_ratio_unknowns() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(3.0, 0) is None


# --- latency -------------------------------------------------------------------------
def test_batch_latencies_from_send_and_first_complete_poll() -> None:
    sends = [("b-0", 10.0, 500), ("b-1", 10.1, 500), ("b-2", 10.2, 500)]
    seen = {"b-0": 10.35, "b-1": 10.05}  # b-1 "seen" before its send: clocks of two processes
    out = batch_latencies(sends, seen)
    assert out[0] == pytest.approx(0.35)
    assert out[1] == 0.0
    assert math.isinf(out[2])  # never complete: it stays in the distribution


def test_latency_summary_in_ms_and_target() -> None:
    fast = latency_summary([0.2] * 100)
    assert fast["p50_ms"] == 200.0 and fast["p99_ms"] == 200.0 and fast["p99_under_target"]
    assert fast["missing"] == 0
    slow = latency_summary([0.2] * 98 + [1.2, 1.5])
    assert not slow["p99_under_target"] and slow["max_ms"] == 1500.0
    lost = latency_summary([0.2] * 98 + [math.inf, math.inf])
    assert lost["missing"] == 2 and lost["p99_ms"] is None and lost["max_ms"] is None
    assert not lost["p99_under_target"]


def test_sustained_needs_every_batch_a_flat_tail_and_the_planned_rate() -> None:
    ok = [0.5] * 40
    assert sustained(ok, rate_sent=1000, rate_planned=1000)
    growing = [0.3 + 0.1 * i for i in range(40)]  # a backlog: the second half exceeds 2 s
    assert not sustained(growing, rate_sent=1000, rate_planned=1000)
    assert not sustained([*ok[:-1], math.inf], rate_sent=1000, rate_planned=1000)
    assert not sustained(ok, rate_sent=800, rate_planned=1000)  # the publisher fell behind
    assert not sustained([], rate_sent=1000, rate_planned=1000)
    # A slow start (the first half) is allowed, a slow end is not.
    assert sustained([3.0] + [0.4] * 39, rate_sent=1000, rate_planned=1000)


# --- metrics -------------------------------------------------------------------------
PROM = """\
# HELP feedback_total Events accepted onto feedback.clean.v1.
# TYPE feedback_total counter
feedback_total{source="oracle",type="thumbs"} 10.0
feedback_total{source="mesh",type="veto"} 2.0
feedback_created{source="mesh",type="veto"} 1.7e9
feedback_state_updates_total{table="reputation"} 12.0
feedback_state_updates_total{table="directive-bias"} 2.0
feedback_rejected_total{reason="invalid, really"} 1.0
feedback_veto_total 2.0
garbage line
"""


def test_parse_prometheus_and_sum_by_labels() -> None:
    samples = parse_prometheus(PROM)
    assert prom_sum(samples, "feedback_total") == 12.0
    assert prom_sum(samples, "feedback_total", type="veto") == 2.0
    assert prom_sum(samples, "feedback_state_updates_total", table="directive-bias") == 2.0
    assert prom_sum(samples, "feedback_rejected_total", reason="invalid, really") == 1.0  # comma inside quotes
    assert prom_sum(samples, "feedback_veto_total") == 2.0
    assert prom_sum(samples, "feedback_missing_total") == 0.0


# --- summary ----------------------------------------------------------------------------
def _result() -> dict:
    return {
        "stages": {
            "worker": {
                "events": 1000,
                "bulk": {
                    "preload": {"raw_messages": 12},
                    "worker": {"events_per_s": 9000.0, "all_decided": True},
                    "naive": {"events_per_s": 6000.0},
                    "bare": {"events_per_s": None, "error": "x"},
                },
            },
            "state": {
                "bulk": {
                    "metrics_reputation_after_last_clean_s": None,
                    "topic_reputation_after_last_clean_s": 0.6,
                    "metrics_bias_after_last_clean_s": 0.4,
                }
            },
            "latency": {
                "bulk": {
                    "rate": 5000,
                    "p50_ms": 300.0,
                    "p95_ms": 600.0,
                    "p99_ms": 999.9,
                    "max_ms": 1200.0,
                    "missing": 0,
                },
                "single": {
                    "rate": 2000,
                    "p50_ms": 400.0,
                    "p95_ms": 900.0,
                    "p99_ms": 1000.0,
                    "max_ms": 1500.0,
                    "missing": 0,
                },
                "ramp": {"best_rate": 2000},
            },
            "memory": {"events": 1_000_000, "rss_mb": {"peak": 512.0}},
            "scaleout": {"workers_1": {"events_per_s": 1000.0}, "workers_2": {"events_per_s": 1500.0}, "ratio": 1.5},
        }
    }


def test_summary_figures_and_targets() -> None:
    s = summarize(_result())
    assert s["worker_bulk_events_per_s"] == 9000.0
    assert s["worker_over_naive_bulk"] == 1.5
    assert s["bare_bulk_events_per_s"] is None and s["worker_over_bare_bulk"] is None  # failed baseline: no ratio
    assert "worker_single_events_per_s" not in s  # a variant that did not run is absent
    assert s["state_reputation_bulk_after_last_clean_s"] == 0.6  # the topics' figure when metrics have none
    assert s["state_bias_bulk_after_last_clean_s"] == 0.4
    assert s["targets_met"] == {
        "latency_bulk_p99_under_1s": True,
        "latency_single_p99_under_1s": False,  # 1000 ms is not under 1 s
        "memory_under_500mb": False,
        "scaleout_1_5x": True,  # 1.5 meets "at least 1.5"
    }
    rows = table_rows(s)
    assert any(r[0] == "scaleout" for r in rows) and any(r[0] == "memory" for r in rows)


def test_summary_of_nothing_claims_nothing() -> None:
    s = summarize({"stages": {}})
    assert s == {"targets_met": {}}
    missing = summarize({"stages": {"latency": {"bulk": {"p99_ms": None, "missing": 3}}, "scaleout": {"ratio": None},
                                    "memory": {"rss_mb": {}}}})  # fmt: skip
    assert missing["targets_met"] == {"latency_bulk_p99_under_1s": False, "memory_under_500mb": False,
                                      "scaleout_1_5x": False}  # fmt: skip


# --- options and workload ----------------------------------------------------------------
def test_parse_stages() -> None:
    assert parse_stages(None) == DEFAULT_STAGES
    assert "memory" not in DEFAULT_STAGES  # long: only when asked for
    assert parse_stages("latency, worker") == ("worker", "latency")  # in running order
    assert parse_stages("all") == ALL_STAGES
    with pytest.raises(ValueError, match="nope"):
        parse_stages("worker,nope")


def test_workload_is_deterministic_distinct_and_valid() -> None:
    from schemas.bulk import Accepted, BulkEncoder
    from schemas.serde import AvroSerde

    a = list(events(2000, seed=3, duplicate_share=0.05))
    b = list(events(2000, seed=3, duplicate_share=0.05))
    strip = [{k: v for k, v in e.items() if k != "ts"} for e in a]
    assert strip == [{k: v for k, v in e.items() if k != "ts"} for e in b]
    assert len({e["event_id"] for e in a}) == 2000
    users = [e["user_id"] for e in a if "user_id" in e]
    duplicates = [e for e in a if (e.get("interaction_id"), e["type"]) in {(o.get("interaction_id"), o["type"])
                  for o in a if o is not e and o.get("interaction_id")}]  # fmt: skip
    assert len(set(users)) > 0.9 * len(users) - len(duplicates)  # distinct subjects but for the repeats
    results = BulkEncoder(AvroSerde()).encode(a, defaults={"source": "bench"})
    assert all(isinstance(r, Accepted) for r in results)
    unique = list(events(2000, seed=4, duplicate_share=0))
    hashes = {r.hash for r in BulkEncoder(AvroSerde()).encode(unique, defaults={"source": "bench"})}
    assert len(hashes) == 2000  # no accidental duplicates by content


def test_a_stack_that_fails_to_start_stops_what_it_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.common as common

    calls: list[str] = []

    class Failing:
        def __init__(self, _settings: object) -> None:
            pass

        def up(self) -> None:
            calls.append("up")  # Kafka started, then the embedded ClickHouse failed
            raise RuntimeError("embedded ClickHouse exited during start-up")

        def down(self) -> None:
            calls.append("down")

    monkeypatch.setattr(common, "LocalStack", Failing)
    with pytest.raises(RuntimeError, match="embedded ClickHouse"):
        common.stack(tmp_path / "stack")
    assert calls == ["up", "down"]
