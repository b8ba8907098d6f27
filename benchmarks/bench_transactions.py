"""What Kafka transactions would cost the worker: ``python -m benchmarks.bench_transactions``.

Issue 17 asks to choose between a transactional worker (its outputs in Kafka transactions, read
committed downstream) and idempotent sinks by measuring the throughput cost. The project chose
idempotent sinks; this measures the road not taken, on a private stack (Kafka on free ports under
a temporary folder, :func:`benchmarks.common.stack`).

A consume → produce loop in the worker's shape, over one preloaded raw topic of single-event
Avro messages (:mod:`benchmarks.workload`): a confluent-kafka consumer takes a batch of messages,
every message is produced once to one of three output topics (as the gate writes clean,
rejected and outcomes), with the worker's producer settings (idempotent, acks=all, linger 5 ms,
lz4), then per batch:

* ``idempotent`` (the worker today): ``flush()``, then the batch's offsets committed (synchronous
  commit; the worker itself commits less often, through Faust, so this is if anything the dearer
  form of it);
* ``transactional``: ``begin_transaction()``, the produces, ``send_offsets_to_transaction()``,
  ``commit_transaction()``.

After an untimed warm-up run of each (``--warmup`` messages: the broker's first transactions
are much slower), the two alternate, ``--repeats`` times each, at each batch size (``--batches``,
default 1000 and 100 messages per batch, i.e. per transaction), every run on a fresh consumer
group and fresh output topics; events/s from the first batch taken to the last commit. Then
visibility: the loop paced at ``--latency-rate`` events/s, two reader processes on its output
topics, one ``read_committed`` and one ``read_uncommitted``, each noting for every message the
time from the loop's produce() call (stamped in the value) to its own read. The result line is appended to
``benchmarks/results/bench_transactions.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from benchmarks import workload
from benchmarks.common import record_result, stack
from benchmarks.kafka_tools import create_topics
from benchmarks.stats import percentile
from benchmarks.suite import git_commit, machine

__all__ = ["main"]

PRODUCER = {  # the worker's producer (stream_processors.outputs.KafkaOutputs), delivery reports aside
    "enable.idempotence": True,
    "acks": "all",
    "partitioner": "murmur2_random",
    "linger.ms": 5,
    "batch.size": 1_000_000,
    "compression.type": "lz4",
    "queue.buffering.max.messages": 1_000_000,
    "queue.buffering.max.kbytes": 1_048_576,
}
VARIANTS = ("idempotent", "transactional")
OUTPUTS = 3
_STAMP = struct.Struct(">d")  # the loop's produce() time (wall clock), ahead of the value


def _consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                     "auto.offset.reset": "earliest", "fetch.queue.backoff.ms": 20})  # fmt: skip


def _assigned(consumer: Consumer, topic: str, timeout: float = 60.0) -> None:
    consumer.subscribe([topic])
    deadline = time.monotonic() + timeout
    while not consumer.assignment():
        if time.monotonic() > deadline:
            raise SystemExit(f"no partitions of {topic} assigned after {timeout:.0f}s")
        consumer.poll(0.1)  # nothing is read before the assignment: no message is lost here


def loop(bootstrap: str, source: str, outputs: list[str], variant: str, *, batch: int, expect: int,
         rate: float | None = None, max_s: float = 300.0, producer_conf: dict[str, Any] | None = None,
         ) -> dict[str, Any]:  # fmt: skip
    """One run of the consume → produce loop over ``expect`` messages of ``source``; its figures.
    ``rate``: pace the batches at this many messages/s (the visibility runs); None: as fast as it goes."""
    run = uuid.uuid4().hex[:8]
    consumer = _consumer(bootstrap, f"tx-bench-{variant}-{run}")
    conf = dict(PRODUCER, **{"bootstrap.servers": bootstrap}, **(producer_conf or {}))
    if variant == "transactional":
        conf["transactional.id"] = f"tx-bench-{run}"
    producer = Producer(conf)
    try:
        if variant == "transactional":
            producer.init_transactions(30)
        _assigned(consumer, source)
        done = batches = 0
        started = time.perf_counter()
        deadline = time.monotonic() + max_s
        produce, poll = producer.produce, producer.poll
        first: float | None = None
        while done < expect and time.monotonic() < deadline:
            if rate is not None and first is not None:  # batch k starts at k x batch / rate
                time.sleep(max(0.0, first + batches * batch / rate - time.perf_counter()))
            msgs = [m for m in consumer.consume(min(batch, expect - done), 1.0) if m.error() is None]
            if not msgs:
                continue
            if first is None:
                first = started = time.perf_counter()
            if variant == "transactional":
                producer.begin_transaction()
            for i, msg in enumerate(msgs):
                value = _STAMP.pack(time.time()) + msg.value()
                while True:
                    try:
                        produce(outputs[i % OUTPUTS], value, msg.key())
                        break
                    except BufferError:
                        poll(0.05)
            ends: dict[int, int] = {}
            for msg in msgs:
                ends[msg.partition()] = msg.offset() + 1
            offsets = [TopicPartition(source, p, o) for p, o in ends.items()]
            if variant == "transactional":
                producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 30)
                producer.commit_transaction(30)
            else:
                left = producer.flush(30)
                if left:
                    raise SystemExit(f"{left} messages not delivered in 30 s")
                consumer.commit(offsets=offsets, asynchronous=False)
            done += len(msgs)
            batches += 1
        seconds = time.perf_counter() - started
    finally:
        consumer.close()
        producer.flush(30)
    if done < expect:
        raise SystemExit(f"{variant}: {done} of {expect} messages in {max_s:.0f}s")
    return {"variant": variant, "batch": batch, "messages": done, "batches": batches, "seconds": round(seconds, 3),
            "events_per_s": round(done / seconds, 1)}  # fmt: skip


# --- the visibility readers (child processes) ----------------------------------------------------
def reader(bootstrap: str, topics: list[str], isolation: str, expect: int, max_s: float) -> dict[str, Any]:
    """Read ``topics`` from the start as ``isolation`` until ``expect`` messages; the time from each
    message's produce() stamp to its read, in ms."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"tx-reader-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "isolation.level": isolation,
                         "fetch.wait.max.ms": 10, "fetch.queue.backoff.ms": 1})  # fmt: skip
    parts = [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics
             for p in consumer.list_topics(t, timeout=30).topics[t].partitions]  # fmt: skip
    consumer.assign(parts)
    consumer.poll(0.5)  # connected and fetching before the loop starts
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    latencies: list[float] = []
    deadline = time.monotonic() + max_s
    poll, stamp = consumer.poll, _STAMP.unpack_from
    while len(latencies) < expect and time.monotonic() < deadline:
        msg = poll(0.1)  # returns as soon as a message is there (consume(n) would wait for n of them)
        if msg is not None and msg.error() is None:
            latencies.append((time.time() - stamp(msg.value())[0]) * 1000)
    consumer.close()
    return {"isolation": isolation, "messages": len(latencies), **_spread(latencies)}


def _spread(latencies: list[float]) -> dict[str, Any]:
    def q(x: float) -> float | None:
        v = percentile(latencies, x)
        return None if v is None else round(v, 1)

    return {
        "p50_ms": q(50),
        "p90_ms": q(90),
        "p99_ms": q(99),
        "max_ms": round(max(latencies), 1) if latencies else None,
    }


def visibility(bootstrap: str, source: str, variant: str, *, batch: int, rate: float, messages: int,
               partitions: int, tag: str, producer_conf: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    outputs = [f"tx.{tag}.vis.{variant}.{batch}.{i}" for i in range(OUTPUTS)]
    _create(bootstrap, outputs, partitions)
    readers = {}
    for isolation in ("read_committed", "read_uncommitted"):
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_transactions", "--reader", "--bootstrap",
                                 bootstrap, "--topics", ",".join(outputs), "--isolation", isolation,
                                 "--expect", str(messages), "--max-s", str(messages / rate + 120)],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        readers[isolation] = proc
    try:
        for proc in readers.values():
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit("a visibility reader did not start")
        run = loop(bootstrap, source, outputs, variant, batch=batch, expect=messages, rate=rate,
                   producer_conf=producer_conf)  # fmt: skip
        seen = {}
        for isolation, proc in readers.items():
            out, _ = proc.communicate(timeout=messages / rate + 180)
            seen[isolation] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in readers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return {"variant": variant, "batch": batch, "rate": rate, "events_per_s": run["events_per_s"], **seen}


def _create(bootstrap: str, names: list[str], partitions: int) -> None:
    from pipeline.settings import Settings

    create_topics(Settings(bootstrap_servers=bootstrap), names, partitions)


def run(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    from pipeline.kafka_admin import ensure_topics
    from schemas.topics import Topics

    tmp = Path(tempfile.mkdtemp(prefix="feedback-bench-tx-"))
    local = None
    result: dict[str, Any] = {
        "benchmark": "bench_transactions", "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(Path(__file__).resolve().parents[1]), "machine": machine(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "options": {k: v for k, v in vars(args).items() if k not in ("reader", "bootstrap", "topics", "isolation",
                                                                      "expect", "max_s")},
    }  # fmt: skip
    try:
        say(f"private stack under {tmp}")
        local, settings = stack(tmp / "stack", topic_partitions=args.partitions)
        ensure_topics(settings)
        bootstrap, source = settings.kafka_bootstrap, Topics(settings.topic_prefix).raw
        from benchmarks.publish import Single

        n = max(args.events, args.latency_events)
        say(f"preloading {n} single-event messages on {source}")
        single = Single(settings)
        for i in range(0, n, 50_000):
            single.send(list(workload.events(min(50_000, n - i), seed=7 + i, duplicate_share=0)))
        single.close()
        tag = uuid.uuid4().hex[:6]
        extra: dict[str, Any] = {} if args.retry_backoff_ms is None else {"retry.backoff.ms": args.retry_backoff_ms}
        runs: list[dict[str, Any]] = []
        for batch in args.batches:
            expect = args.events if batch >= 1000 else max(batch * 100, args.events * batch // 1000 * 3)
            for variant in VARIANTS if args.warmup else ():  # untimed: the broker's first transactions are slow
                outputs = [f"tx.{tag}.warm.{variant}.{batch}.{i}" for i in range(OUTPUTS)]
                _create(bootstrap, outputs, args.partitions)
                warm = loop(bootstrap, source, outputs, variant, batch=batch, expect=min(args.warmup, n),
                            producer_conf=extra)  # fmt: skip
                say(f"batch {batch} {variant} warm-up: {warm['events_per_s']:.0f} events/s (not counted)")
            for rep in range(args.repeats):
                for variant in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
                    outputs = [f"tx.{tag}.{variant}.{batch}.{rep}.{i}" for i in range(OUTPUTS)]
                    _create(bootstrap, outputs, args.partitions)
                    one = loop(
                        bootstrap, source, outputs, variant, batch=batch, expect=min(expect, n), producer_conf=extra
                    )
                    one["repeat"] = rep
                    say(f"batch {batch} {variant} #{rep}: {one['events_per_s']:.0f} events/s")
                    runs.append(one)
        result["runs"] = runs
        summary: dict[str, Any] = {}
        for batch in args.batches:
            rates = {v: sorted(r["events_per_s"] for r in runs if r["variant"] == v and r["batch"] == batch)
                     for v in VARIANTS}  # fmt: skip
            med = {v: rates[v][len(rates[v]) // 2] for v in VARIANTS}
            best = {v: rates[v][-1] for v in VARIANTS}
            summary[str(batch)] = {
                "idempotent_median": med["idempotent"], "transactional_median": med["transactional"],
                "ratio_median": round(med["transactional"] / med["idempotent"], 3),
                "idempotent_best": best["idempotent"], "transactional_best": best["transactional"],
                "ratio_best": round(best["transactional"] / best["idempotent"], 3),
            }  # fmt: skip
        result["throughput"] = summary
        vis = []
        for batch in args.latency_batches:
            for variant in VARIANTS:
                one = visibility(bootstrap, source, variant, batch=batch, rate=args.latency_rate,
                                 messages=args.latency_events, partitions=args.partitions, tag=tag,
                                 producer_conf=extra)  # fmt: skip
                say(f"visibility batch {batch} {variant}: committed p50 {one['read_committed']['p50_ms']} ms, "
                    f"uncommitted p50 {one['read_uncommitted']['p50_ms']} ms")  # fmt: skip
                vis.append(one)
        result["visibility"] = vis
    finally:
        if local is not None:
            local.down()
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=200_000, help="messages per run at 1,000 a batch")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 100],
                   help="messages per batch (per transaction), comma-separated")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5, help="runs of each variant per batch size, alternated")
    p.add_argument("--warmup", type=int, default=20_000, help="messages of an untimed run of each variant first")
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--latency-rate", type=float, default=5000.0, help="visibility: messages/s through the loop")
    p.add_argument("--latency-events", type=int, default=75_000, help="visibility: messages per run")
    p.add_argument("--latency-batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[1000, 100],
                   help="visibility: messages per batch, comma-separated (empty: no visibility runs)")  # fmt: skip
    p.add_argument("--retry-backoff-ms", type=int, default=None,
                   help="the producers' retry.backoff.ms (librdkafka's default: 100); a transaction's first "
                   "AddPartitionsToTxn is retried while the previous one's markers are written")  # fmt: skip
    p.add_argument("--no-record", action="store_true")
    # the visibility reader (a child process of the benchmark)
    p.add_argument("--reader", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bootstrap", help=argparse.SUPPRESS)
    p.add_argument("--topics", help=argparse.SUPPRESS)
    p.add_argument("--isolation", help=argparse.SUPPRESS)
    p.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-s", type=float, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.reader:
        out = reader(args.bootstrap, args.topics.split(","), args.isolation, args.expect, args.max_s)
        sys.stdout.write(json.dumps(out) + "\n")
        return
    import signal

    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))  # the stack stops in run()'s finally

    def say(msg: str) -> None:
        print(f"[bench-tx {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    result = run(args, say)
    if args.no_record:
        print(json.dumps(result, indent=2))
    else:
        record_result("bench_transactions", result)


if __name__ == "__main__":
    main()
