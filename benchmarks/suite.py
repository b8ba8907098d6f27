"""``feedback bench``: every stage beside its baseline, in one run, on one private stack.

Starts Kafka and the embedded ClickHouse on free ports under a temporary folder
(:func:`benchmarks.common.stack`), runs the chosen stages (``--stages``, default all but
``memory``), prints a table and one JSON summary line, and appends the whole result (with
the machine's facts: cores, load average before and after, Python and library versions,
the git commit of this tree and of ``--worker-src``) to ``benchmarks/results/bench.jsonl``.

Stages: ``worker``, ``state``, ``latency``, ``memory``, ``scaleout`` (:mod:`benchmarks.bench_worker`);
``client`` and ``gateway`` (:mod:`benchmarks.bench_ingest`, one run recorded as ``ingest``: the
bare producer, ``thumbs()`` and ``emit_many``, and the gateway's paths when ``gateway`` is
asked for), ``sink`` (:mod:`benchmarks.bench_sink`). These three always run this tree's code;
``--server-src TREE`` also runs the sink stage through ``TREE``'s embedded ClickHouse server
started beside the stack's, the two alternating (``measure_beside``: a server change before
and after in one run).
A stage that fails is recorded with its error; the others still run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import RESULTS, stack
from benchmarks.summary import summarize, table_rows

__all__ = ["ALL_STAGES", "DEFAULT_STAGES", "Options", "main", "run", "run_and_report"]

ALL_STAGES = ("worker", "state", "scaleout", "memory", "latency", "client", "gateway", "sink")
DEFAULT_STAGES = tuple(s for s in ALL_STAGES if s != "memory")
PSEUDONYM_KEY = "bench-key-0123456789"


@dataclass
class Options:
    stages: tuple[str, ...] = DEFAULT_STAGES
    events: int = 50_000
    worker_src: Path | None = None
    server_src: Path | None = None  # sink stage: also measure through this tree's embedded ClickHouse server
    partitions: int = 6
    latency_rate: float = 5000.0
    latency_duration: float = 60.0
    latency_ramp: bool = True
    latency_warm: float = 30.0  # seconds at the measured rate before the measured run (JIT, caches, merges)
    latency_poll: float = 0.1  # seconds between the visibility probe's ClickHouse queries (each ~7 ms of its CPU)
    memory_events: int = 1_000_000
    scaleout_events: int | None = None
    client_events: int = 50_000
    sink_rows: int = 200_000
    timeout_s: float = 900.0
    label: str = ""
    keep_tmp: bool = False
    record: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def parse_stages(text: str | None, default: tuple[str, ...] = DEFAULT_STAGES) -> tuple[str, ...]:
    """``"worker,latency"`` → the stages in the order they run; an unknown name is a ValueError."""
    if not text:
        return default
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    if "all" in wanted:
        return ALL_STAGES
    unknown = [s for s in wanted if s not in ALL_STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(ALL_STAGES)}")
    return tuple(s for s in ALL_STAGES if s in wanted)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(tree: Path) -> str | None:
    """The tree's commit, "+dirty" when its code differs from it (``benchmarks/`` and results aside)."""
    try:
        rev = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no", "--",
                                "pipeline", "producers", "schemas", "sinks", "stream_processors"],
                               capture_output=True, text=True, timeout=30).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    from schemas.serde import _speedups

    return {
        "cores": os.cpu_count(),
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "faust": _version("faust-streaming"),
        "aiokafka": _version("aiokafka"),
        "confluent_kafka": _version("confluent-kafka"),
        "native_speedups": _speedups is not None,
    }


def run(opts: Options, say: Any = None) -> dict[str, Any]:
    """Run the stages; the result (not yet recorded)."""
    from benchmarks.bench_worker import Context, stage_latency, stage_memory, stage_scaleout, stage_state, stage_worker
    from pipeline.settings import PROJECT_ROOT

    say = say or (lambda msg: print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True))
    src = opts.worker_src.resolve() if opts.worker_src else None
    if src is not None and not (src / "stream_processors" / "app.py").is_file():
        raise SystemExit(f"--worker-src {src}: not a source tree of this project (no stream_processors/app.py)")
    started = time.monotonic()
    result: dict[str, Any] = {
        "benchmark": "bench",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "label": opts.label,
        "commit": git_commit(PROJECT_ROOT),
        "worker_src": None if src is None else {"path": str(src), "commit": git_commit(src)},
        "machine": machine(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "stages": {},
        "errors": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="feedback-bench-"))
    say(f"private stack under {tmp}")
    local = None
    try:
        local, settings = stack(tmp / "stack", topic_partitions=opts.partitions, rate_limit_per_minute=1e9,
                                pseudonym_key=PSEUDONYM_KEY)  # fmt: skip
        ctx = Context(settings, tmp, src, timeout_s=opts.timeout_s, say=say,
                      services={s.name: s.pid for s in local.status() if s.pid is not None})  # fmt: skip
        stages = result["stages"]

        def attempt(name: str, fn: Any, *args: Any, **kwargs: Any) -> None:
            say(f"stage {name}")
            began = time.monotonic()
            try:
                stages[name] = fn(*args, **kwargs)
                stages[name]["seconds"] = round(time.monotonic() - began, 1)
            except (SystemExit, Exception) as exc:  # one failed stage must not cost the others
                result["errors"][name] = f"{type(exc).__name__}: {exc}"[:4000]
                say(f"stage {name} failed: {result['errors'][name][:500]}")

        for name in opts.stages:
            if name == "worker":
                attempt("worker", stage_worker, ctx, opts.events)
                if "worker" in stages:  # the state agents' figures come with every worker run
                    stages["state"] = stage_state(stages["worker"])
            elif name == "state":
                if "worker" not in stages and "worker" not in result["errors"]:
                    attempt("worker", stage_worker, ctx, opts.events, variants=("bulk",), baselines=False)
                if "worker" in stages:
                    stages["state"] = stage_state(stages["worker"])
            elif name == "scaleout":
                attempt("scaleout", stage_scaleout, ctx, opts.scaleout_events or opts.events)
            elif name == "memory":
                attempt("memory", stage_memory, ctx, opts.memory_events)
            elif name == "latency":
                attempt("latency", stage_latency, ctx, rate=opts.latency_rate, duration=opts.latency_duration,
                        ramp=opts.latency_ramp, warm_s=opts.latency_warm, poll_s=opts.latency_poll)  # fmt: skip
            elif name in ("client", "gateway"):
                if "ingest" not in stages and "ingest" not in result["errors"]:  # one run measures both
                    attempt("ingest", _ingest, ctx, opts, gateway="gateway" in opts.stages)
            elif name == "sink":
                from benchmarks.bench_sink import measure as sink_measure

                if opts.server_src is None:
                    attempt("sink", sink_measure, ctx.scoped("sink.", clickhouse_database="bench_sink"), opts.sink_rows)
                else:
                    from benchmarks.bench_sink import measure_beside

                    attempt("sink", measure_beside, ctx.scoped("sink."), opts.sink_rows, opts.server_src.resolve(),
                            tmp / "clickhouse-before")  # fmt: skip
    finally:
        from benchmarks.procs import stop_all

        left = stop_all()  # a stage that failed half-way may have left a child running
        if left:
            say(f"stopped children left running: {', '.join(left)}")
        if local is not None:
            local.down()
        if opts.keep_tmp or result["errors"]:
            (tmp / "result.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
            say(f"logs and result.json kept under {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.monotonic() - started, 1)
    result["summary"] = summarize(result)
    return result


def _ingest(ctx: Any, opts: Options, gateway: bool) -> dict[str, Any]:
    from benchmarks.bench_ingest import measure, parser

    n = max(1000, opts.client_events // 1000 * 1000)
    args = parser().parse_args(["--events", str(n), "--single", str(max(1000, n // 5)), "--warmup", str(n // 2),
                                "--gateway-warmup", str(max(1000, n // 10))])  # fmt: skip
    return measure(ctx.scoped("ingest."), args, gateway_paths=gateway)


def record(result: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "bench.jsonl"
    with path.open("ab") as fh:
        fh.write(orjson.dumps(result) + b"\n")
    return path


def summary_line(result: dict[str, Any], path: Path | None) -> dict[str, Any]:
    return {"benchmark": "bench", "at": result["at"], "commit": result["commit"],
            "worker_commit": (result.get("worker_src") or {}).get("commit") or result["commit"],
            "label": result["label"], "events": result["options"]["events"], "cores": result["machine"]["cores"],
            "load_before": result["load_before"], "load_after": result["load_after"],
            "seconds": result["seconds"], **result["summary"], "errors": sorted(result["errors"]),
            "result_file": None if path is None else str(path)}  # fmt: skip


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    worker = result.get("worker_src") or {}
    title = (f"feedback bench {result['at']} — worker {worker.get('commit') or result['commit']}, "
             f"{result['machine']['cores']} cores, load {result['load_before']} → {result['load_after']}")  # fmt: skip
    table = Table("stage", "measured", "value", "beside it", "ratio / target", title=title)
    for row in table_rows(result["summary"]):
        table.add_row(*row)
    for name, error in result["errors"].items():
        table.add_row(name, "[red]failed[/red]", error.splitlines()[0][:120], "", "")
    Console().print(table)


def run_and_report(opts: Options, *, as_json: bool = False) -> int:
    """Run, record, print (a table unless ``as_json``; always the JSON summary line last);
    the exit code: 1 if a stage failed."""
    _exit_on_sigterm()
    result = run(opts)
    path = record(result) if opts.record else None
    if not as_json:
        print_table(result)
    sys.stdout.write(orjson.dumps(summary_line(result, path)).decode() + "\n")
    sys.stdout.flush()
    return 1 if result["errors"] else 0


def parser(default_stages: tuple[str, ...] = DEFAULT_STAGES) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default=",".join(default_stages), help=f"comma-separated, of {','.join(ALL_STAGES)}")
    p.add_argument("--events", type=int, default=50_000, help="events for the worker and scale-out stages")
    p.add_argument("--worker-src", type=Path, default=None, help="run worker, sink and client from this tree")
    p.add_argument("--server-src", type=Path, default=None,
                   help="sink stage: also run it through this tree's embedded ClickHouse server, alternately")
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--latency-rate", type=float, default=5000.0)
    p.add_argument("--latency-duration", type=float, default=60.0)
    p.add_argument("--no-ramp", action="store_true", help="latency: skip the single-event ramp")
    p.add_argument("--latency-warm", type=float, default=30.0,
                   help="latency: seconds of bulk load at the measured rate before the measured run")
    p.add_argument("--latency-poll", type=float, default=0.1, help="latency: seconds between visibility probes")
    p.add_argument("--memory-events", type=int, default=1_000_000)
    p.add_argument("--scaleout-events", type=int, default=None)
    p.add_argument("--client-events", type=int, default=50_000)
    p.add_argument("--sink-rows", type=int, default=200_000)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per measured process run")
    p.add_argument("--label", default="")
    p.add_argument("--keep-tmp", action="store_true", help="keep the scratch folder (logs) after the run")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results/bench.jsonl")
    p.add_argument("--json", action="store_true", help="no table; only the JSON summary line")
    return p


def _exit_on_sigterm() -> None:
    """SIGTERM ends the run through its ``finally`` blocks, which stop every process it started
    (the broker, the embedded ClickHouse, workers and baselines): none outlives the benchmark."""
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))


def main(argv: list[str] | None = None, default_stages: tuple[str, ...] = DEFAULT_STAGES) -> None:
    args = parser(default_stages).parse_args(argv)
    try:
        stages = parse_stages(args.stages, default_stages)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    opts = Options(stages=stages, events=args.events, worker_src=args.worker_src, server_src=args.server_src,
                   partitions=args.partitions,
                   latency_rate=args.latency_rate, latency_duration=args.latency_duration,
                   latency_ramp=not args.no_ramp, latency_warm=args.latency_warm, latency_poll=args.latency_poll,
                   memory_events=args.memory_events,
                   scaleout_events=args.scaleout_events, client_events=args.client_events, sink_rows=args.sink_rows,
                   timeout_s=args.timeout, label=args.label, keep_tmp=args.keep_tmp,
                   record=not args.no_record)  # fmt: skip
    raise SystemExit(run_and_report(opts, as_json=args.json))


if __name__ == "__main__":
    main()
