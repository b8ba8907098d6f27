"""Stream worker benchmarks: the worker beside naive baselines, its state agents, end-to-end
latency, memory and scale-out, each on the same private stack and the same raw events.

Run with ``feedback bench`` (all stages, a table and a JSON line, appended to
``benchmarks/results/bench.jsonl``) or ``python -m benchmarks.bench_worker`` (the worker
stages only). Every measured process is a child started with the private stack's settings
(``FEEDBACK_*``) and stopped by its PID; ``--worker-src TREE`` runs the worker, the sink and
the publishing client from another source tree (a git worktree of an older commit) with
this venv, so an older worker can be measured in the same way.

Stages:

* **worker** — raw → clean throughput of ``feedback worker``. The raw topic is preloaded
  with N events, in two variants: ``bulk`` (``FeedbackClient.emit_many`` in chunks of 1,000:
  envelopes, many events per message, once the client publishes them) and ``single`` (one
  event per message, encoded first, sent by a bare confluent-kafka producer). Then the
  worker starts; events/s runs from the first event on feedback.clean.v1 to the last, on the
  broker's clock (``LogAppendTime``), so start-up is excluded. Every one of the N events must
  be decided (metrics, and the outcomes, clean and rejected topics read back). Baselines on
  the same raw topic, one after the other: a naive Faust pass-through agent
  (:mod:`benchmarks.naive_faust`) and a bare confluent-kafka consume → produce loop
  (:mod:`benchmarks.bare_loop`); the ratios worker/naive and worker/bare.
* **state** — from the same worker runs: when reputation (one update per outcome) and
  directive bias (one per bad_output/latency/safety/veto event kept) were complete, from the
  worker's metrics (``feedback_state_updates_total``) and from the state topics'
  ``observations`` / ``events`` counts, as seconds after the last clean event.
* **latency** — worker and sink as processes; ``emit_many`` of 500 events every 100 ms for
  60 s (``--latency-rate``/``--latency-duration``); every batch tagged in ``model_version``;
  ClickHouse polled every 50 ms for per-batch counts; a batch's latency is the first poll
  that saw all of it minus its send time; p50/p95/p99/max and whether p99 < 1 s. Then the
  highest rate single-event messages sustain (a bounded doubling/halving ramp of short
  steps) and the same measurement at that rate.
* **memory** — the worker's RSS (``VmRSS``, sampled every second) while ``--memory-events``
  events with distinct user ids (so as many rate-limit subjects and dedup keys) go through
  it; target < 500 MB. Only when asked for (``--stages memory``).
* **scaleout** — a 12-partition raw topic, one worker against two workers of one consumer
  group (the same app id, a state directory each); the workers start first, the events are
  published once both hold partitions; the ratio (target ≥ 1.5).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import free_port
from benchmarks.kafka_tools import Watermarks, create_topics, group_members, log_append_time, read_topic
from benchmarks.procs import Child, cpu_seconds, scrape, tree_env
from benchmarks.stats import batch_latencies, latency_summary, prom_sum, ratio, span_rate, sustained
from benchmarks.workload import BIAS_TYPES
from pipeline.kafka_admin import ensure_topics
from pipeline.settings import PROJECT_ROOT, Settings
from schemas.envelope import is_envelope, unpack
from schemas.topics import Topics

__all__ = ["Context", "stage_latency", "stage_memory", "stage_scaleout", "stage_state", "stage_worker"]

PUBLISH = Path(__file__).resolve().parent / "publish.py"
POLL_S = 0.25
STALL_S = 90.0  # no progress for this long: the run failed


@dataclass
class Context:
    """What every stage shares: the private stack's settings, a scratch folder, the tree to run."""

    settings: Settings
    tmp: Path
    src: Path | None = None  # worker/sink/client tree; None: this one
    timeout_s: float = 900.0
    say: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))

    @property
    def root(self) -> Path:
        return self.src or PROJECT_ROOT

    def scoped(self, prefix: str, **update: Any) -> Settings:
        """Settings for one measurement: its own topics (prefix), state and JSONL folders."""
        return self.settings.model_copy(update={"topic_prefix": prefix, "path": self.tmp / prefix / "jsonl",
                                                **update})  # fmt: skip

    def log(self, name: str) -> Path:
        return self.tmp / "logs" / f"{name}.log"

    services: dict[str, int] = field(default_factory=dict)  # the stack's processes (kafka, clickhouse): name → PID


# --- children ------------------------------------------------------------------------
def publish(ctx: Context, settings: Settings, *args: Any, name: str = "publish") -> dict[str, Any]:
    """Run benchmarks/publish.py with the worker tree's client; its JSON line."""
    env = tree_env(settings, ctx.src)
    argv = [sys.executable, str(PUBLISH), *map(str, args)]
    result = subprocess.run(argv, env=env, cwd=ctx.root, capture_output=True, text=True, timeout=ctx.timeout_s)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def start_publisher(ctx: Context, settings: Settings, *args: Any, name: str) -> tuple[Child, Path]:
    """publish.py as a background child; its JSON line goes to the returned file."""
    out = ctx.tmp / "logs" / f"{name}.out"
    child = Child.python(name, [str(PUBLISH), *map(str, args)], tree_env(settings, ctx.src), ctx.log(name),
                         cwd=ctx.root, stdout=out)  # fmt: skip
    return child.start(), out


def start_worker(ctx: Context, settings: Settings, name: str, **env: Any) -> Child:
    return Child.python(name, ["-m", "pipeline.cli", "worker"], tree_env(settings, ctx.src, **env), ctx.log(name),
                        cwd=ctx.root).start()  # fmt: skip


def start_sink(ctx: Context, settings: Settings, name: str) -> Child:
    return Child.python(name, ["-m", "pipeline.cli", "sink"], tree_env(settings, ctx.src), ctx.log(name),
                        cwd=ctx.root).start()  # fmt: skip


def prepare(settings: Settings, *outputs: str) -> Topics:
    """The pipeline topics (and ``outputs`` for the baselines), timed by the broker's clock."""
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings)
    log_append_time(settings, [topics.clean, topics.rejected, topics.outcomes, topics.reputation,
                               topics.directive_bias])  # fmt: skip
    if outputs:
        create_topics(settings, outputs)
    return topics


# --- waiting on a worker ------------------------------------------------------------------
@dataclass
class Progress:
    """What a wait loop saw: counts from the metrics and when each target was reached."""

    decided: float = 0
    accepted: float = 0
    reputation: float = 0
    bias: float = 0
    metrics_seen: bool = False
    decided_at: float | None = None
    decided_mono: float | None = None
    reputation_at: float | None = None
    bias_at: float | None = None
    rss_mb: list[tuple[float, float, int]] = field(default_factory=list)  # (s, MB, events decided)


def _metrics(ports: list[int]) -> dict[str, float] | None:
    total: dict[str, float] = {}
    seen = False
    for port in ports:
        samples = scrape(port)
        if samples is None:
            continue
        seen = True
        gate_dlq = prom_sum(samples, "feedback_dlq_total", stage="gate") + prom_sum(
            samples, "feedback_dlq_total", stage="decode"
        )
        accepted = prom_sum(samples, "feedback_total")
        values = {
            "accepted": accepted,
            "accepted_bias": sum(prom_sum(samples, "feedback_total", type=t) for t in BIAS_TYPES),
            "decided": accepted + prom_sum(samples, "feedback_rejected_total")
            + prom_sum(samples, "feedback_sampled_out_total") + gate_dlq,
            "reputation": prom_sum(samples, "feedback_state_updates_total", table="reputation"),
            "bias": prom_sum(samples, "feedback_state_updates_total", table="directive-bias"),
        }  # fmt: skip
        for k, v in values.items():
            total[k] = total.get(k, 0.0) + v
    return total if seen else None


def wait_worker(
    ctx: Context,
    settings: Settings,
    workers: list[tuple[Child, int]],
    n: int,
    *,
    sample_rss_s: float | None = None,
    state_grace_s: float = 30.0,
) -> Progress:
    """Until the workers decided ``n`` events and their state caught up (bounded), polling
    metrics and watermarks; raises SystemExit if a worker dies or nothing moves for STALL_S."""
    topics = Topics(settings.topic_prefix)
    marks = Watermarks(settings)
    progress = Progress()
    started = time.monotonic()
    last_move, last_key = started, None
    stable_since: float | None = None
    next_rss = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            for child, _ in workers:
                if not child.alive():
                    raise SystemExit(f"{child.name} exited ({child.proc.returncode if child.proc else '?'}):\n"
                                     f"{child.tail()}")  # fmt: skip
            if sample_rss_s is not None and now >= next_rss:
                total = sum(child.rss_mb() or 0 for child, _ in workers)
                progress.rss_mb.append((round(now - started, 2), round(total, 1), round(progress.decided)))
                next_rss = now + sample_rss_s
            m = _metrics([port for _, port in workers])
            wall = time.time()
            if m is not None:
                progress.metrics_seen = True
                progress.decided, progress.accepted = m["decided"], m["accepted"]
                progress.reputation, progress.bias = m["reputation"], m["bias"]
                if progress.decided_at is None and progress.decided >= n:
                    progress.decided_at, progress.decided_mono = wall, now
                if progress.reputation_at is None and progress.reputation >= n:
                    progress.reputation_at = wall
                # Bias hears of every kept event of a directive's type: the target is known once all are decided.
                bias_target = m["accepted_bias"] if progress.decided >= n else math.inf
                if progress.bias_at is None and progress.bias >= bias_target:
                    progress.bias_at = wall
            outputs = (topics.clean, topics.rejected, topics.outcomes, topics.reputation, topics.directive_bias)
            key = (tuple(marks.high(t) for t in outputs), m and (m["decided"], m["reputation"], m["bias"]))
            if key != last_key:
                last_key, last_move, stable_since = key, now, now
            state_done = progress.reputation_at is not None and progress.bias_at is not None
            if (
                progress.decided_mono is not None
                and stable_since is not None
                and now - stable_since >= 1.0
                and (state_done or now - progress.decided_mono > state_grace_s)
            ):
                return progress
            if not progress.metrics_seen and now - started > 60 and key[0][0] > 0 and now - last_move >= 5.0:
                return progress  # no metrics from this worker: the outputs stopped growing
            if now - last_move > STALL_S:
                raise SystemExit(f"worker stalled: decided {progress.decided:.0f} of {n}, no progress in "
                                 f"{STALL_S:.0f} s\n{workers[0][0].tail()}")  # fmt: skip
            if now - started > ctx.timeout_s:
                raise SystemExit(f"worker run timed out after {ctx.timeout_s:.0f} s: decided {progress.decided:.0f}"
                                 f" of {n}")  # fmt: skip
            time.sleep(POLL_S)
    finally:
        marks.close()


def _complete_at(records: list[tuple[int, int, Any]], field_name: str, target: int) -> float | None:
    """Broker time (s) of the first state record after which the latest ``field_name`` per
    key adds up to ``target``; None if it never does."""
    latest: dict[bytes, int] = {}
    for ts, _, (key, value) in sorted(records, key=lambda r: r[0]):
        if value is None:
            latest.pop(key, None)
            continue
        try:
            latest[key] = int(orjson.loads(value)[field_name])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if sum(latest.values()) >= target:
            return ts / 1000
    return None


def measure_worker_outputs(settings: Settings, n: int, progress: Progress, started_at: float | None) -> dict[str, Any]:
    """Read back clean, rejected, outcomes and the state topics; the figures of one worker run."""
    topics = Topics(settings.topic_prefix)
    keyval = lambda msg: (msg.key(), msg.value())  # noqa: E731
    clean = read_topic(settings, topics.clean)
    rejected = read_topic(settings, topics.rejected, keep=_rejection_reasons)
    outcomes = read_topic(settings, topics.outcomes, keep=_kept_bias)
    reputation = read_topic(settings, topics.reputation, keep=keyval)
    bias_records = read_topic(settings, topics.directive_bias, keep=keyval)
    rate = span_rate((t, c) for t, c, _ in clean)
    out_rate = span_rate((t, c) for t, c, _ in outcomes)
    rejected_n = sum(c for _, c, _ in rejected)
    outcomes_n = sum(c for _, c, _ in outcomes)
    reasons: Counter[str] = Counter()
    for _, _, counted in rejected:
        reasons.update(counted)
    bias = sum(k for _, _, k in outcomes)  # kept events of a directive's type, as the gate decided them
    last_clean = rate["last_ms"] / 1000 if rate["last_ms"] else None
    rep_done = _complete_at(reputation, "observations", n)
    bias_done = _complete_at(bias_records, "events", bias) if bias else None

    def after(t: float | None) -> float | None:
        return None if t is None or last_clean is None else round(t - last_clean, 3)

    return {
        "events_per_s": rate["events_per_s"],
        "clean": rate,
        "clean_messages": len(clean),
        "rejected_events": rejected_n,
        "rejected_reasons": dict(reasons.most_common(10)),
        "outcomes_events": outcomes_n,
        "outcomes_last_after_clean_s": after(out_rate["last_ms"] / 1000 if out_rate["last_ms"] else None),
        "decided_metric": round(progress.decided) if progress.metrics_seen else None,
        "all_decided": outcomes_n >= n and rate["events"] + rejected_n >= n
        and (not progress.metrics_seen or progress.decided >= n),
        "startup_s": None if started_at is None or rate["first_ms"] is None
        else round(rate["first_ms"] / 1000 - started_at, 2),
        "state": {
            "reputation_updates": round(progress.reputation) if progress.metrics_seen else None,
            "reputation_expected": n,
            "bias_updates": round(progress.bias) if progress.metrics_seen else None,
            "bias_expected": bias,
            "metrics_reputation_after_last_clean_s": after(progress.reputation_at),
            "metrics_bias_after_last_clean_s": after(progress.bias_at),
            "topic_reputation_after_last_clean_s": after(rep_done),
            "topic_bias_after_last_clean_s": after(bias_done),
            "publish_interval_s": settings.bias_publish_interval_s,
        },
    }  # fmt: skip


_REJECTED = None


def _rejection_reasons(msg: Any) -> Counter[str]:
    """reason (and field for invalid) of the rejections a message carries."""
    global _REJECTED
    from schemas.serde import AvroSerde

    if _REJECTED is None:
        _REJECTED = AvroSerde("rejected_v1")
    value = msg.value()
    counts: Counter[str] = Counter()
    for item in unpack(value) if is_envelope(value) else [value]:
        try:
            row = _REJECTED.decode(item)
        except Exception:
            counts["undecodable"] += 1
            continue
        counts[row["reason"] + (f" {row['field']}: {row['rule']}" if row["reason"] == "invalid" else "")] += 1
    return counts


def _kept_bias(msg: Any) -> int:
    """How many kept events of a directive's type an outcomes message reports."""
    try:
        data = orjson.loads(msg.value())
    except orjson.JSONDecodeError:
        return 0
    items = data if isinstance(data, list) else [data]
    return sum(1 for o in items if isinstance(o, dict) and o.get("kept") and o.get("type") in BIAS_TYPES)


def run_worker(ctx: Context, settings: Settings, name: str, n: int, **wait: Any) -> dict[str, Any]:
    """One worker over the preloaded raw topic until every event is decided; its figures."""
    port = free_port()
    worker = start_worker(ctx, settings, name, FEEDBACK_WORKER_METRICS_PORT=port)
    try:
        progress = wait_worker(ctx, settings, [(worker, port)], n, **wait)
    finally:
        code = worker.stop()
    result = measure_worker_outputs(settings, n, progress, worker.started_at)
    result["exit_code"] = code
    if progress.rss_mb:
        result["rss_mb"] = _rss_summary(progress.rss_mb)
    return result


def _rss_summary(samples: list[tuple[float, float, int]]) -> dict[str, Any]:
    """Peak and last RSS, and the RSS when the first events had been decided (start-up done,
    tables still empty); the series thinned to at most ~200 points."""
    values = [v for _, v, _ in samples if v > 0]
    started = [v for _, v, decided in samples if decided > 0]
    return {"samples": len(values), "at_first_events": started[0] if started else None,
            "peak": max(values, default=None), "last": values[-1] if values else None,
            "series": samples[:: max(1, len(samples) // 200)]}  # fmt: skip


def run_baseline(ctx: Context, settings: Settings, kind: str, n: int) -> dict[str, Any]:
    """The naive Faust agent or the bare loop over the same raw topic, to ``n`` forwarded events."""
    topics = Topics(settings.topic_prefix)
    target = f"{settings.topic_prefix}bench.{kind}.out"
    env = tree_env(None, None, BENCH_BOOTSTRAP=settings.kafka_bootstrap, BENCH_SOURCE=topics.raw,
                   BENCH_TARGET=target, BENCH_APP_ID=f"{settings.topic_prefix}bench-naive",
                   BENCH_GROUP=f"{settings.topic_prefix}bench-bare", BENCH_EXPECT=n, BENCH_MAX_S=ctx.timeout_s,
                   BENCH_DATADIR=ctx.tmp / settings.topic_prefix / "naive",
                   BENCH_PARTITIONS=settings.topic_partitions)  # fmt: skip
    module = "benchmarks.naive_faust" if kind == "naive" else "benchmarks.bare_loop"
    name = f"{settings.topic_prefix}{kind}"
    child = Child.python(name, ["-m", module], env, ctx.log(name),
                         cwd=PROJECT_ROOT).start()  # fmt: skip
    marks = Watermarks(settings)
    started = time.monotonic()
    last, last_move = -1, started
    try:
        while True:
            high = marks.high(target)
            now = time.monotonic()
            if high != last:
                last, last_move = high, now
            if high >= n:
                break
            if not child.alive() and kind == "naive":
                raise SystemExit(f"{kind} baseline exited:\n{child.tail()}")
            if now - last_move > STALL_S or now - started > ctx.timeout_s:
                raise SystemExit(f"{kind} baseline stalled at {high} of {n}:\n{child.tail()}")
            time.sleep(POLL_S)
    finally:
        marks.close()
        child.stop()
    rate = span_rate((t, c) for t, c, _ in read_topic(settings, target))
    return {"events_per_s": rate["events_per_s"], "out": rate,
            "startup_s": None if rate["first_ms"] is None or child.started_at is None
            else round(rate["first_ms"] / 1000 - child.started_at, 2)}  # fmt: skip


# --- stage 1 and 2: worker against baselines, state agents -----------------------------------
def stage_worker(
    ctx: Context, n: int, *, variants: tuple[str, ...] = ("bulk", "single"), baselines: bool = True
) -> dict[str, Any]:
    out: dict[str, Any] = {"events": n}
    for variant in variants:
        settings = ctx.scoped(f"w{variant}.")
        topics = prepare(settings, f"{settings.topic_prefix}bench.naive.out", f"{settings.topic_prefix}bench.bare.out")
        ctx.say(f"worker/{variant}: preloading {n:,} events")
        load = publish(ctx, settings, "preload", "--mode", variant, "--events", n, name=f"preload-{variant}")
        marks = Watermarks(settings)
        try:
            load["raw_messages"] = marks.high(topics.raw)
        finally:
            marks.close()
        res: dict[str, Any] = {"preload": load, "load_before": _load()}
        ctx.say(f"worker/{variant}: {load['raw_messages']:,} raw messages; running the worker")
        res["worker"] = run_worker(ctx, settings, f"worker-{variant}", n)
        ctx.say(f"worker/{variant}: worker {res['worker']['events_per_s']} events/s")
        if baselines:
            for kind in ("naive", "bare"):
                ctx.say(f"worker/{variant}: {kind} baseline")
                try:
                    res[kind] = run_baseline(ctx, settings, kind, n)
                except SystemExit as exc:  # the worker's figure stands without it
                    res[kind] = {"events_per_s": None, "error": str(exc)[:2000]}
                ctx.say(f"worker/{variant}: {kind} {res[kind]['events_per_s']} events/s")
                res[f"worker_over_{kind}"] = ratio(res["worker"]["events_per_s"], res[kind]["events_per_s"])
        res["load_after"] = _load()
        out[variant] = res
    return out


def stage_state(worker_stage: dict[str, Any]) -> dict[str, Any]:
    """The state agents' figures, taken from the worker stage's runs."""
    return {v: r["worker"]["state"] for v, r in worker_stage.items() if isinstance(r, dict) and "worker" in r}


# --- stage 5: memory --------------------------------------------------------------------------
def stage_memory(ctx: Context, n: int) -> dict[str, Any]:
    settings = ctx.scoped("mem.")
    prepare(settings)
    ctx.say(f"memory: preloading {n:,} events with distinct user ids")
    load = publish(ctx, settings, "preload", "--mode", "bulk", "--events", n, "--duplicate-share", 0,
                   name="preload-memory")  # fmt: skip
    ctx.say("memory: running the worker")
    res = run_worker(ctx, settings, "worker-memory", n, sample_rss_s=1.0)
    rss = res.get("rss_mb", {})
    return {"events": n, "preload": load, "events_per_s": res["events_per_s"], "all_decided": res["all_decided"],
            "rss_mb": rss, "target_mb": 500,
            "under_target": rss.get("peak") is not None and rss["peak"] < 500}  # fmt: skip


# --- stage 6: scale-out -----------------------------------------------------------------------
def stage_scaleout(ctx: Context, n: int, partitions: int = 12) -> dict[str, Any]:
    out: dict[str, Any] = {"events": n, "partitions": partitions}
    for count in (1, 2):
        settings = ctx.scoped(f"so{count}.", topic_partitions=partitions)
        topics = prepare(settings)
        group = f"{settings.topic_prefix}{settings.worker_id}"  # the Faust app id: one group
        workers = []
        for i in range(count):
            port = free_port()
            # Same app id (one consumer group), a state directory each (RocksDB is per process).
            state = ctx.tmp / settings.topic_prefix / f"worker-{i}"
            workers.append((start_worker(ctx, settings, f"scaleout{count}-{i}", FEEDBACK_WORKER_METRICS_PORT=port,
                                         FEEDBACK_STATE_DIR=state), port))  # fmt: skip
        try:
            ctx.say(f"scaleout: {count} worker(s) joining {group}")
            _wait_group(ctx, settings, group, count, workers)
            load = publish(ctx, settings, "preload", "--mode", "bulk", "--events", n, name=f"preload-so{count}")
            ctx.say(f"scaleout: {count} worker(s) on {n:,} events")
            progress = wait_worker(ctx, settings, workers, n)
        finally:
            codes = [w.stop() for w, _ in workers]
        res = measure_worker_outputs(settings, n, progress, None)
        res["exit_codes"] = codes
        res["preload"] = load
        res["raw_messages"] = _high(settings, topics.raw)
        out[f"workers_{count}"] = res
        ctx.say(f"scaleout: {count} worker(s) {res['events_per_s']} events/s")
    out["ratio"] = ratio(out["workers_2"]["events_per_s"], out["workers_1"]["events_per_s"])
    out["target_ratio"] = 1.5
    out["target_met"] = out["ratio"] is not None and out["ratio"] >= 1.5
    return out


def _wait_group(ctx: Context, settings: Settings, group: str, members: int, workers: list[tuple[Child, int]]) -> None:
    """Until the group is Stable with ``members`` members and every worker serves metrics
    (bounded; a rebalance in the measured run would be counted)."""
    deadline = time.monotonic() + 180
    stable_since = None
    while time.monotonic() < deadline:
        for child, _ in workers:
            if not child.alive():
                raise SystemExit(f"{child.name} exited:\n{child.tail()}")
        state, count = group_members(settings, group)
        ready = state.upper() == "STABLE" and count == members and all(scrape(p) is not None for _, p in workers)
        if ready:
            stable_since = stable_since or time.monotonic()
            if time.monotonic() - stable_since >= 3.0:  # recovery of the (empty) tables after assignment
                return
        else:
            stable_since = None
        time.sleep(0.5)
    raise SystemExit(f"group {group} did not settle with {members} members")


def _high(settings: Settings, topic: str) -> int:
    marks = Watermarks(settings)
    try:
        return marks.high(topic)
    finally:
        marks.close()


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- stage 4: latency -------------------------------------------------------------------------
class Poller(threading.Thread):
    """Polls ClickHouse for per-batch counts (batches tagged in model_version) every ``every_s``;
    remembers when each batch was first seen complete (the poll's start, wall clock)."""

    def __init__(self, settings: Settings, every_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        from sinks.clickhouse import connect

        self.client = connect(settings)
        self.table = f"`{settings.clickhouse_database}`.feedback_events"
        self.every_s = every_s
        self.expect: dict[str, int] = {}  # tag → events
        self.seen: dict[str, float] = {}
        self.prefix = ""
        self.polls = 0
        self.errors = 0
        self.last_error = ""
        self.lock = threading.Lock()
        self._halt = threading.Event()

    def watch(self, prefix: str, tags: dict[str, int]) -> None:
        with self.lock:
            self.prefix = prefix
            self.expect.update(tags)

    def pending(self) -> int:
        with self.lock:
            return sum(1 for t in self.expect if t not in self.seen and t.startswith(self.prefix))

    def run(self) -> None:
        while not self._halt.is_set():
            with self.lock:
                prefix = self.prefix
            if prefix:
                started = time.time()
                try:
                    rows = self.client.query(
                        f"SELECT model_version, count() FROM {self.table} "
                        f"WHERE startsWith(model_version, '{prefix}') GROUP BY model_version"
                    ).result_rows
                    self.polls += 1
                    with self.lock:
                        for tag, count in rows:
                            if tag not in self.seen and count >= self.expect.get(tag, math.inf):
                                self.seen[tag] = started
                except Exception as exc:  # the table is not there yet (the sink migrates on start), or a hiccup
                    self.errors += 1
                    self.last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
            self._halt.wait(self.every_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def _paced(
    ctx: Context, settings: Settings, poller: Poller, *, mode: str, rate: float, duration: float, interval: float,
    tag_prefix: str, drain_s: float, seed: int, children: Sequence[Child] = (),
) -> dict[str, Any]:  # fmt: skip
    """One paced publishing run, its batches watched until visible or ``drain_s`` after the last send;
    with the CPU each process (``children``, the stack's services, the publisher) spent per event."""
    per_batch = max(1, round(rate * interval))
    batches = max(1, round(duration / interval))
    poller.watch(tag_prefix, {f"{tag_prefix}{k:06d}": per_batch for k in range(batches)})
    sends_file = ctx.tmp / "logs" / f"sends-{tag_prefix.rstrip('-')}.json"
    child, out = start_publisher(ctx, settings, "paced", "--mode", mode, "--rate", rate, "--duration", duration,
                                 "--interval", interval, "--tag-prefix", tag_prefix, "--sends-file", sends_file,
                                 "--seed", seed, name=f"paced-{tag_prefix.rstrip('-')}")  # fmt: skip
    watched = {**ctx.services, **{c.name.rsplit(".", 1)[-1]: c.pid for c in children}}
    cpu_before = {name: cpu_seconds(pid) for name, pid in watched.items()}
    child.wait(duration + 120)
    if child.proc is not None and child.proc.returncode != 0:
        raise SystemExit(f"the publisher failed:\n{child.tail()}")
    published = json.loads(out.read_text().strip().splitlines()[-1])
    deadline = time.monotonic() + drain_s
    while poller.pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    cpu = cpu_per_event(cpu_before, {name: cpu_seconds(pid) for name, pid in watched.items()},
                        per_batch * batches, publisher=published.get("cpu_s"))  # fmt: skip
    sends = [tuple(s) for s in json.loads(sends_file.read_text())]
    with poller.lock:
        seen = dict(poller.seen)
    latencies = batch_latencies(sends, seen)  # type: ignore[arg-type]
    summary = latency_summary(latencies)
    return {"publisher": published, **summary, "drained": poller.pending() == 0, "cpu_us_per_event": cpu,
            "latencies_ms": [None if math.isinf(v) else round(v * 1000, 1) for v in latencies]}  # fmt: skip


def cpu_per_event(
    before: dict[str, float | None], after: dict[str, float | None], events: int, *, publisher: float | None
) -> dict[str, float | None]:
    """CPU µs per published event of each process over one paced run (the publisher's from its
    own account: it has exited by the time the others are read); None where a process is gone."""
    spent = {name: (after[name] - b) if b is not None and after.get(name) is not None else None  # type: ignore[operator]
             for name, b in before.items()}  # fmt: skip
    spent["publisher"] = publisher
    out = {name: None if s is None else round(s * 1e6 / max(1, events), 1) for name, s in spent.items()}
    out["total"] = round(sum(v for v in out.values() if v is not None), 1)
    return out


def _per_event(settings: Settings, prefix: str) -> dict[str, Any]:
    """ingested_at - ts per event (the insert's start against the client's clock at encoding):
    a lower bound of the visibility latency, per event rather than per batch."""
    from sinks.clickhouse import connect

    row = (
        connect(settings)
        .query(
            "SELECT count(), quantiles(0.5, 0.95, 0.99)(d), max(d) FROM (SELECT "
            "toUnixTimestamp64Milli(ingested_at) - toUnixTimestamp64Milli(toDateTime64(ts, 3)) AS d "
            f"FROM `{settings.clickhouse_database}`.feedback_events WHERE startsWith(model_version, '{prefix}') "
            f"AND model_version != '{prefix}warm')"  # the publisher's untimed first events
        )
        .result_rows[0]
    )
    count, (p50, p95, p99), top = row
    return {"events": count, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": top}


def _stop(*things: Any) -> None:
    """Stop each (poller thread, children), even when stopping one of them fails."""
    for thing in things:
        try:
            thing.stop()
        except Exception as exc:
            print(f"bench: stopping {thing!r} failed: {exc}", file=sys.stderr)


def _pipeline(ctx: Context, prefix: str, poll_s: float = 0.05) -> tuple[Settings, Child, Child, Poller]:
    settings = ctx.scoped(prefix, clickhouse_database=f"bench_{prefix.rstrip('.')}", sink_group=f"{prefix}sink")
    ensure_topics(settings)
    worker = start_worker(ctx, settings, f"{prefix}worker", FEEDBACK_WORKER_METRICS_PORT=free_port())
    sink = start_sink(ctx, settings, f"{prefix}sink")
    poller = Poller(settings, poll_s)
    poller.start()
    return settings, worker, sink, poller


def _warm(ctx: Context, settings: Settings, poller: Poller, mode: str, children: list[Child]) -> None:
    """Publish a second of events and wait until ClickHouse has them: both processes are up."""
    deadline = time.monotonic() + 240
    per_batch, batches = 100, 10
    poller.watch("warm-", {f"warm-{k:06d}": per_batch for k in range(batches)})
    publish(ctx, settings, "paced", "--mode", mode, "--rate", per_batch * 10, "--duration", 1, "--interval", 0.1,
            "--tag-prefix", "warm-", "--sends-file", ctx.tmp / "logs" / f"warm-{settings.topic_prefix}json",
            name="warm-up")  # fmt: skip
    while poller.pending():
        for child in children:
            if not child.alive():
                raise SystemExit(f"{child.name} exited:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise SystemExit(
                f"the pipeline did not deliver the warm-up events ({poller.pending()} batches "
                f"incomplete; poller: {poller.polls} polls, {poller.errors} errors, last "
                f"{poller.last_error!r})\n{children[0].tail()}\n{children[1].tail()}"
            )
        time.sleep(0.2)


def stage_latency(
    ctx: Context,
    *,
    rate: float = 5000.0,
    duration: float = 60.0,
    interval: float = 0.1,
    drain_s: float = 30.0,
    ramp: bool = True,
    ramp_start: float = 1000.0,
    ramp_step_s: float = 8.0,
    ramp_steps: int = 6,
    sustain_limit_s: float = 2.0,
    warm_s: float = 0.0,
    poll_s: float = 0.05,
) -> dict[str, Any]:
    out: dict[str, Any] = {"interval_s": interval, "poll_s": poll_s, "warm_s": warm_s}
    # Bulk: emit_many batches at the given rate.
    settings, worker, sink, poller = _pipeline(ctx, "lat1.", poll_s)
    try:
        ctx.say("latency/bulk: starting worker and sink")
        _warm(ctx, settings, poller, "bulk", [worker, sink])
        if warm_s > 0:  # the stack at the measured load first: a fresh broker spends its first minute in the JIT
            ctx.say(f"latency/bulk: {warm_s:.0f} s at {rate:.0f}/s before the measured run")
            out["warm"] = _paced(ctx, settings, poller, mode="bulk", rate=rate, duration=warm_s, interval=interval,
                                 tag_prefix="w-", drain_s=drain_s, seed=7, children=(worker, sink))  # fmt: skip
            out["warm"].pop("latencies_ms", None)
        ctx.say(
            f"latency/bulk: emit_many of {round(rate * interval)} every {interval * 1000:.0f} ms for {duration:.0f} s"
        )
        bulk = _paced(ctx, settings, poller, mode="bulk", rate=rate, duration=duration, interval=interval,
                      tag_prefix="b-", drain_s=drain_s, seed=11, children=(worker, sink))  # fmt: skip
        bulk["per_event"] = _per_event(settings, "b-")
        bulk["rate"] = rate
        out["bulk"] = bulk
        ctx.say(f"latency/bulk: p50 {bulk['p50_ms']} p99 {bulk['p99_ms']} max {bulk['max_ms']} ms")
    finally:
        _stop(poller, sink, worker)
    if not ramp:
        return out
    # Single-event messages: the highest rate they sustain, then the same measurement there.
    settings, worker, sink, poller = _pipeline(ctx, "lat2.", poll_s)
    try:
        ctx.say("latency/single: starting worker and sink")
        _warm(ctx, settings, poller, "single", [worker, sink])
        steps: list[dict[str, Any]] = []
        best, r = None, ramp_start
        tried: set[float] = set()
        for i in range(ramp_steps):
            if r in tried or r < 100 or r > 64_000:
                break
            tried.add(r)
            step = _paced(ctx, settings, poller, mode="single", rate=r, duration=ramp_step_s, interval=interval,
                          tag_prefix=f"r{i}-", drain_s=drain_s, seed=100 + i, children=(worker, sink))  # fmt: skip
            ok = sustained([math.inf if v is None else v / 1000 for v in step["latencies_ms"]],
                           rate_sent=step["publisher"].get("rate_sent"), rate_planned=r,
                           limit_s=sustain_limit_s)  # fmt: skip
            steps.append({"rate": r, "sustained": ok, "p50_ms": step["p50_ms"], "p99_ms": step["p99_ms"],
                          "max_ms": step["max_ms"], "missing": step["missing"],
                          "rate_sent": step["publisher"].get("rate_sent")})  # fmt: skip
            ctx.say(f"latency/ramp: {r:.0f}/s {'sustained' if ok else 'not sustained'} (p99 {step['p99_ms']} ms)")
            if ok:
                best = r if best is None else max(best, r)
                if any(s["rate"] > r and not s["sustained"] for s in steps):
                    break  # the next rate up already failed
                r = r * 2
            else:
                if best is not None:
                    break
                r = r / 2
        out["ramp"] = {"steps": steps, "step_s": ramp_step_s, "limit_s": sustain_limit_s, "best_rate": best}
        if best is not None:
            ctx.say(f"latency/single: {best:.0f} single-event messages/s for {duration:.0f} s")
            single = _paced(ctx, settings, poller, mode="single", rate=best, duration=duration, interval=interval,
                            tag_prefix="s-", drain_s=drain_s, seed=21, children=(worker, sink))  # fmt: skip
            single["per_event"] = _per_event(settings, "s-")
            single["rate"] = best
            out["single"] = single
            ctx.say(f"latency/single: p50 {single['p50_ms']} p99 {single['p99_ms']} max {single['max_ms']} ms")
    finally:
        _stop(poller, sink, worker)
    return out


# --- python -m benchmarks.bench_worker ------------------------------------------------------
def main() -> None:
    from benchmarks.suite import main as suite_main

    suite_main(sys.argv[1:], default_stages=("worker", "state", "latency", "scaleout"))


if __name__ == "__main__":
    main()
