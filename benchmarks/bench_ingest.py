"""Ingest throughput: the Python client and the HTTP gateway, against a bare producer.

Run with ``make bench`` (or ``python -m benchmarks.bench_ingest``). In one run, on a
private local stack:

* **warm-up** (untimed): the bare producer sends ``--warmup`` events first, so no measured
  path pays for a cold broker (JVM JIT, log segment creation, first metadata);
* **bare**: a confluent-kafka producer (same settings as the client) sending the
  already-encoded bytes of the events — the ceiling. It runs first and again last; the
  ratios use the faster of the two runs, so a broker that warms up or slows down over
  the run does not flatter the other figures;
* **client**: ``FeedbackClient.thumbs(...)`` per event — validation, hashing, Avro
  encoding and the produce — until Kafka has acknowledged all of them;
* **client bulk**: ``FeedbackClient.emit_many(...)`` with ``--batch`` events per call (the
  same events; same validation, hash and bytes, no model object per event);
* **gateway batch**: ``POST /internal/feedback/batch`` with 1,000 events per request over a
  few keep-alive connections, every item answered 202 (acknowledged by Kafka);
* **gateway single**: ``POST /internal/feedback`` one event per request over
  ``--connections`` keep-alive connections, each answered 202 after Kafka's ack
  (acks=all and idempotence stay on: concurrency, not weaker safety, gives throughput);
* **gateway refused**: the same POSTs with a wrong token, answered 401 before any parsing
  or Kafka work — the ceiling of the HTTP stack itself on this machine.

Each measured path (client, client bulk, gateway batch, gateway single) runs ``--rounds``
times (default 2) and the fastest counts, as for the bare producer: on a shared 2-core
machine other load only ever slows a run down, so the fastest run is the best estimate
of what the code can do. Every run is kept in the result line (``runs_per_s``).

The HTTP load comes from a minimal asyncio HTTP/1.1 client written here (pre-built
requests, a status-line and Content-Length parser): on this 2-core machine a full HTTP
client library would take a core itself and measure mostly its own cost. The gateway
runs with ``--workers`` processes (``feedback serve --workers``).

Targets (issue 6): client ≥ 100,000 events/s, gateway batches ≥ 30,000 events/s,
single POSTs ≥ 3,000/s, each also reported as a ratio to the bare producer. The client
target is read on the client's bulk call (``emit_many``), its throughput path; the per-call
helpers are reported beside it. ``targets_met`` says which targets this run met, and
``native`` whether the C hot path (``schemas._speedups``) was built for it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
from confluent_kafka import Producer

from benchmarks.common import free_port, record_result, stack
from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from producers.client import FeedbackClient
from producers.producer import subject_key
from schemas.bulk import BulkEncoder, _speedups
from schemas.models import FeedbackEvent
from schemas.serde import AvroSerde
from schemas.topics import Topics

TOKEN = "bench-token-0123456789abcdefghijklmnop"


def _events(n: int, offset: int = 0) -> list[dict[str, Any]]:
    return [
        {"source": "dream_ui", "type": "thumbs", "user_id": f"u-{i % 5000}", "interaction_id": f"i-{i}",
         "payload": {"direction": "up" if i % 3 else "down", "comment": "fine"}}
        for i in range(offset, offset + n)
    ]  # fmt: skip


def _encoded(events: list[dict[str, Any]]) -> list[tuple[bytes, bytes]]:
    serde = AvroSerde()
    out = []
    for e in events:
        event = FeedbackEvent.model_validate(e)
        out.append((subject_key(event), serde.encode(event.to_avro())))
    return out


def bare(settings: Settings, values: list[tuple[bytes, bytes]]) -> float:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True, "acks": "all",
                         "linger.ms": 5, "batch.size": 1_000_000, "compression.type": "lz4"})  # fmt: skip
    topic = Topics(settings.topic_prefix).raw
    assert producer.list_topics(topic, timeout=30).topics[topic].error is None
    started = time.perf_counter()
    for key, value in values:
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    assert producer.flush(120) == 0
    return len(values) / (time.perf_counter() - started)


def client(settings: Settings, events: list[dict[str, Any]], warmup: list[dict[str, Any]]) -> float:
    def send(fb: FeedbackClient, batch: list[dict[str, Any]]) -> None:
        for e in batch:
            fb.thumbs(up=e["payload"]["direction"] == "up", user_id=e["user_id"], interaction_id=e["interaction_id"],
                      comment="fine")  # fmt: skip

    with FeedbackClient("dream_ui", settings) as fb:
        send(fb, warmup)  # connections and metadata, untimed
        fb.flush()
        started = time.perf_counter()
        send(fb, events)
        fb.flush()
        return len(events) / (time.perf_counter() - started)


def client_bulk(settings: Settings, events: list[dict[str, Any]], warmup: list[dict[str, Any]], chunk: int) -> float:
    """``FeedbackClient.emit_many`` in chunks of ``chunk`` events (the same events in their JSON
    form, without ``source``, which the client fills): validation, hashing, encoding, produce."""
    items = [{k: v for k, v in e.items() if k != "source"} for e in events]
    with FeedbackClient("dream_ui", settings) as fb:
        fb.emit_many(warmup)
        fb.flush()
        started = time.perf_counter()
        for i in range(0, len(items), chunk):
            fb.emit_many(items[i : i + chunk])
        fb.flush()
        return len(items) / (time.perf_counter() - started)


def client_cpu_us(events: list[dict[str, Any]]) -> dict[str, float]:
    """Per-event Python cost of the client's steps, without Kafka (best of 3 rounds)."""
    serde = AvroSerde()
    sample = events[:5000]

    def best(step: Any, items: list[Any]) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            for item in items:
                step(item)
            times.append((time.perf_counter() - started) / len(items) * 1e6)
        return round(min(times), 2)

    built = [FeedbackEvent.model_validate(e) for e in sample]
    chunks = [sample[i : i + 1000] for i in range(0, len(sample), 1000)]
    bulk, python_bulk = BulkEncoder(serde), BulkEncoder(serde, native=False)
    return {
        "validate_and_hash": best(FeedbackEvent.model_validate, sample),
        "to_avro_and_encode": best(lambda e: serde.encode(e.to_avro()), built),
        "bulk_validate_hash_encode": round(best(bulk.encode, chunks) / 1000, 2),
        "bulk_validate_hash_encode_python_loop": round(best(python_bulk.encode, chunks) / 1000, 2),
    }


# --- HTTP load -------------------------------------------------------------------
def _request(path: str, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: bench\r\nX-Internal-Token: {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode() + body


async def _load(port: int, requests: list[bytes], connections: int, expect: int, items: int) -> float:
    """Send every request once over ``connections`` keep-alive connections; returns requests/s.

    Every answer must have status ``expect``; a batch answer (``items`` > 1) must say 202 for
    each of its items. Raises SystemExit otherwise.
    """
    pending = iter(range(len(requests)))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in pending:
                writer.write(requests[i])
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                if status != expect:
                    raise SystemExit(f"gateway answered {status}: {body[:200]!r}")
                if items > 1:
                    results = orjson.loads(body)["results"]
                    if len(results) != items or any(r["status"] != 202 for r in results):
                        raise SystemExit("a batch item was not accepted")
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return len(requests) / (time.perf_counter() - started)


def gateway(
    settings: Settings, events: list[dict[str, Any]], singles: list[dict[str, Any]], args: argparse.Namespace
) -> tuple[list[float], list[float], float]:
    """(batch events/s per round, single POSTs/s per round, refused POSTs/s) through one
    gateway process group.

    The last is the HTTP stack's own ceiling here: POSTs answered 401 at once (no JSON, no
    validation, no Kafka) over the same connections.
    """
    port = free_port()
    env = {**os.environ, **settings.to_env(), "FEEDBACK_INTERNAL_TOKENS": TOKEN}
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--port", str(port)]
    cmd += ["--workers", str(args.workers)] if args.workers != 1 else []
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the gateway did not become ready")
            time.sleep(0.2)
        batches = [
            _request("/internal/feedback/batch", orjson.dumps({"events": events[i : i + args.batch]}))
            for i in range(0, len(events), args.batch)
        ]
        one_by_one = [_request("/internal/feedback", orjson.dumps(e)) for e in singles]
        # Warm-up, untimed: every worker's Kafka producer connects on its first event, and the
        # broker's JIT and the workers settle (the first ~10k single POSTs run measurably slower).
        warm = _events(args.gateway_warmup, offset=10**9)
        asyncio.run(_load(port, [_request("/internal/feedback", orjson.dumps(e)) for e in warm], args.connections,
                          202, 1))  # fmt: skip
        per_batch = min(args.batch, len(events))
        batch_rates = [asyncio.run(_load(port, batches, args.batch_connections, 207, per_batch)) * per_batch
                       for _ in range(args.rounds)]  # fmt: skip
        single_rates = [asyncio.run(_load(port, one_by_one, args.connections, 202, 1)) for _ in range(args.rounds)]
        refused = [r.replace(TOKEN.encode(), b"x" * len(TOKEN), 1) for r in one_by_one[:5000]]
        http_rate = asyncio.run(_load(port, refused, args.connections, 401, 1))
        return batch_rates, single_rates, http_rate
    finally:
        proc.terminate()
        proc.wait(30)


def _commit() -> str | None:
    """The checked-out commit (with "+dirty" for local changes), None outside a git work tree."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here.parent, capture_output=True,
                               text=True, timeout=30).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="events for bare, client and gateway batches")
    parser.add_argument("--single", type=int, default=20_000, help="events for the single-POST run")
    parser.add_argument("--warmup", type=int, default=50_000, help="untimed bare events sent first")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs of each measured path; the fastest counts")
    parser.add_argument("--gateway-warmup", type=int, default=10_000, help="untimed single POSTs sent first")
    parser.add_argument("--workers", type=int, default=2, help="gateway worker processes")
    parser.add_argument("--batch", type=int, default=1000, help="events per batch request")
    parser.add_argument("--batch-connections", type=int, default=4)
    parser.add_argument("--connections", type=int, default=64, help="connections for single POSTs")
    parser.add_argument("--label", default="", help="a note stored with the result (e.g. which code ran)")
    return parser


def measure(settings: Settings, args: argparse.Namespace, *, gateway_paths: bool = True) -> dict[str, Any]:
    """Every path of this benchmark against a running stack (its raw topic; ``settings`` must
    allow the subjects' rate: ``rate_limit_per_minute`` high); the result line.
    ``gateway_paths=False`` measures the bare producer and the client only."""
    ensure_topics(settings)
    events = _events(args.events)
    encoded = _encoded(events)
    bare(settings, _encoded(_events(args.warmup, offset=10**8)))  # warm-up, untimed
    bare_first = bare(settings, encoded)
    client_rates = [client(settings, events, _events(2000, offset=2 * 10**8)) for _ in range(args.rounds)]
    bulk_rates = [client_bulk(settings, events, _events(2000, offset=4 * 10**8), args.batch)
                  for _ in range(args.rounds)]  # fmt: skip
    if gateway_paths:
        batch_rates, single_rates, http_rate = gateway(settings, events, _events(args.single, offset=3 * 10**8), args)
    else:
        batch_rates, single_rates, http_rate = [], [], None
    bare_last = bare(settings, encoded)
    cpu = client_cpu_us(events)
    bare_rate = max(bare_first, bare_last)
    client_rate, bulk_rate = max(client_rates), max(bulk_rates)
    batch_rate, single_rate = max(batch_rates, default=None), max(single_rates, default=None)

    def per_bare(rate: float | None, digits: int) -> float | None:
        return None if rate is None else round(rate / bare_rate, digits)

    runs = {"client": client_rates, "client_bulk": bulk_rates, "gateway_batch": batch_rates,
            "gateway_single": single_rates}  # fmt: skip
    runs = {name: [round(r) for r in rates] for name, rates in runs.items()}
    return {
        "benchmark": "ingest",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "label": args.label,
        "events": args.events,
        "single_events": args.single,
        "warmup_events": args.warmup,
        "gateway_warmup_posts": args.gateway_warmup,
        "gateway_workers": args.workers,
        "batch_connections": args.batch_connections,
        "single_connections": args.connections,
        "bare_runs_events_per_s": [round(bare_first), round(bare_last)],
        "bare_events_per_s": round(bare_rate),
        "rounds": args.rounds,
        "runs_per_s": runs,
        "client_events_per_s": round(client_rate),
        "client_ratio": round(client_rate / bare_rate, 3),
        "client_bulk_events_per_s": round(bulk_rate),
        "client_bulk_ratio": round(bulk_rate / bare_rate, 3),
        "gateway_batch_events_per_s": None if batch_rate is None else round(batch_rate),
        "gateway_batch_ratio": per_bare(batch_rate, 3),
        "gateway_single_per_s": None if single_rate is None else round(single_rate),
        "gateway_single_ratio": per_bare(single_rate, 4),
        "gateway_refused_401_per_s": None if http_rate is None else round(http_rate),
        "client_cpu_us_per_event": cpu,
        "native": {"built": _speedups is not None, "sha_ni": bool(_speedups and _speedups.SHA_NI)},
        "targets": {"client": 100_000, "gateway_batch": 30_000, "gateway_single": 3_000},
        "targets_met": {
            "client (emit_many)": bulk_rate >= 100_000,
            "gateway_batch": batch_rate is not None and batch_rate >= 30_000,
            "gateway_single": single_rate is not None and single_rate >= 3_000,
        },
    }


def main() -> None:
    arguments = parser()
    args = arguments.parse_args()
    if args.events % args.batch:
        arguments.error("--events must be a multiple of --batch")
    with tempfile.TemporaryDirectory(prefix="feedback-bench-") as tmp:
        local, settings = stack(
            Path(tmp), topic_partitions=2, rate_limit_per_minute=1e9, pseudonym_key="bench-key-0123456789"
        )
        try:
            result = measure(settings, args)
        finally:
            local.down()
    record_result("bench_ingest", result)


if __name__ == "__main__":
    main()
