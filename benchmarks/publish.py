"""Publish the benchmark's events to feedback.raw.v1, as a client of one source tree.

Run by path, never as ``-m benchmarks.publish``: ``feedback bench --worker-src TREE``
runs it with ``PYTHONPATH=TREE``, so ``producers``, ``schemas`` and ``pipeline`` are that
tree's (the "before" client publishes what the "before" worker reads: single-event
messages; the current one publishes envelopes). Only :mod:`workload` is taken from beside
this file. Settings come from the ``FEEDBACK_*`` environment, as for every process.

Modes (``--mode``):

* ``bulk``: ``FeedbackClient.emit_many`` with ``--chunk`` events per call, what the
  client's bulk path publishes;
* ``single``: one event per Kafka message, values encoded first (``BulkEncoder``, the
  same bytes as the model path), then sent with a bare confluent-kafka producer.

``preload``: ``--events`` events as fast as possible. ``paced``: a batch of ``--rate`` times
``--interval`` events every ``--interval`` seconds for ``--duration`` seconds, each
batch tagged in ``model_version`` (``<tag-prefix><k>``) and encoded just before it is
sent; every batch's send time goes to ``--sends-file``. Both print one JSON line of
figures on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload

from pipeline.settings import Settings
from schemas.topics import Topics

PRODUCER = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "batch.size": 1_000_000,
    "compression.type": "lz4",
}  # fmt: skip  (the client's own producer settings)


class Bulk:
    def __init__(self, settings: Settings, chunk: int) -> None:
        from producers.client import FeedbackClient

        self.client = FeedbackClient("bench", settings)
        self.chunk = chunk

    def send(self, events: list[dict[str, Any]]) -> None:
        for i in range(0, len(events), self.chunk):
            self.client.emit_many(events[i : i + self.chunk])

    def close(self) -> None:
        self.client.flush()
        self.client.close()


class Single:
    def __init__(self, settings: Settings) -> None:
        from confluent_kafka import Producer

        from schemas.bulk import BulkEncoder
        from schemas.serde import AvroSerde

        self.encoder = BulkEncoder(AvroSerde.from_url(settings.schema_registry_url))
        self.producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, **PRODUCER})
        self.topic = Topics(settings.topic_prefix).raw
        self.failed = 0

    def encode(self, events: list[dict[str, Any]]) -> list[tuple[bytes, bytes]]:
        out = []
        for i in range(0, len(events), 1000):
            for result in self.encoder.encode(events[i : i + 1000], defaults={"source": "bench"}):
                if not hasattr(result, "value"):
                    raise SystemExit(f"the bulk encoder refused a benchmark event: {result}")
                out.append((result.key, result.value))
        return out

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.failed += 1

    def produce(self, values: list[tuple[bytes, bytes]]) -> None:
        produce, poll = self.producer.produce, self.producer.poll
        for key, value in values:
            while True:
                try:
                    produce(self.topic, value, key, on_delivery=self._delivered)
                    break
                except BufferError:
                    poll(0.05)
        poll(0)

    def send(self, events: list[dict[str, Any]]) -> None:
        self.produce(self.encode(events))

    def close(self) -> None:
        left = self.producer.flush(120)
        if left or self.failed:
            raise SystemExit(f"{left} messages not delivered, {self.failed} failed")


def _counts(events: list[dict[str, Any]], counts: Counter[str]) -> None:
    for e in events:
        counts[e["type"]] += 1


def preload(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    duplicates = 0
    stream = workload.events(args.events, seed=args.seed, duplicate_share=args.duplicate_share,
                             users=args.users or None)  # fmt: skip
    if args.mode == "single":
        single = Single(settings)
        values: list[tuple[bytes, bytes]] = []
        encode_started = time.perf_counter()
        seen_ids: set[tuple[str, str]] = set()
        while True:
            chunk = [e for _, e in zip(range(10_000), stream, strict=False)]
            if not chunk:
                break
            _counts(chunk, counts)
            duplicates += _duplicates(chunk, seen_ids)
            values += single.encode(chunk)
        encode_s = time.perf_counter() - encode_started
        started = time.perf_counter()
        single.produce(values)
        single.close()
        return {"mode": "single", "events": len(values), "messages": len(values), "encode_s": round(encode_s, 2),
                "seconds": round(time.perf_counter() - started, 3), "types": dict(counts),
                "duplicates": duplicates}  # fmt: skip
    bulk = Bulk(settings, args.chunk)
    seen_ids = set()
    started = time.perf_counter()
    sent = 0
    while True:  # generated and sent in slices: a million events never sit in memory at once
        chunk = [e for _, e in zip(range(50_000), stream, strict=False)]
        if not chunk:
            break
        _counts(chunk, counts)
        duplicates += _duplicates(chunk, seen_ids)
        bulk.send(chunk)
        sent += len(chunk)
    bulk.close()
    return {"mode": "bulk", "events": sent, "chunk": args.chunk, "seconds": round(time.perf_counter() - started, 3),
            "types": dict(counts), "duplicates": duplicates}  # fmt: skip


def _duplicates(events: list[dict[str, Any]], seen: set[tuple[str, str]]) -> int:
    """How many events repeat an earlier thumbs on the same interaction (the gate's
    dedup key for explicit signals): those are refused as duplicates."""
    n = 0
    for e in events:
        if e["type"] == "thumbs" and "interaction_id" in e:
            key = (e["interaction_id"], e["type"])
            if key in seen:
                n += 1
            else:
                seen.add(key)
    return n


def paced(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    per_batch = max(1, round(args.rate * args.interval))
    batches = max(1, round(args.duration / args.interval))
    sender: Bulk | Single = Bulk(settings, args.chunk) if args.mode == "bulk" else Single(settings)
    # Untimed: connections and metadata, so the first tagged batch does not pay for them.
    sender.send(list(workload.events(10, seed=args.seed * 1_000_003, tag=f"{args.tag_prefix}warm",
                                     duplicate_share=0)))  # fmt: skip
    if isinstance(sender, Bulk):
        sender.client.flush()
    else:
        sender.producer.flush(30)
    sends: list[tuple[str, float, int]] = []
    late = 0
    started = time.perf_counter()
    for k in range(batches):
        due = started + k * args.interval
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        elif wait < -args.interval:
            late += 1
        tag = f"{args.tag_prefix}{k:06d}"
        events = list(workload.events(per_batch, seed=args.seed * 100_000 + k, tag=tag, duplicate_share=0))
        sends.append((tag, time.time(), per_batch))  # wall clock: compared with the poller's
        sender.send(events)
    elapsed = time.perf_counter() - started
    sender.close()
    Path(args.sends_file).write_text(json.dumps(sends))
    return {"mode": args.mode, "rate_planned": args.rate, "events": per_batch * batches, "batches": batches,
            "per_batch": per_batch, "seconds": round(elapsed, 3),
            "rate_sent": round(per_batch * batches / elapsed, 1) if elapsed > 0 else None,
            "batches_late": late}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("preload", "paced"))
    parser.add_argument("--mode", choices=("bulk", "single"), default="bulk")
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=1000, help="events per emit_many call")
    parser.add_argument("--users", type=int, default=0, help="cycle through this many user ids (0: all distinct)")
    parser.add_argument("--duplicate-share", type=float, default=0.02)
    parser.add_argument("--rate", type=float, default=5000.0, help="paced: events per second")
    parser.add_argument("--duration", type=float, default=60.0, help="paced: seconds")
    parser.add_argument("--interval", type=float, default=0.1, help="paced: seconds between batches")
    parser.add_argument("--tag-prefix", default="lat-")
    parser.add_argument("--sends-file", default="sends.json")
    args = parser.parse_args()
    settings = Settings()
    result = preload(args, settings) if args.what == "preload" else paced(args, settings)
    result["cpu_s"] = round(time.process_time(), 3)  # this process's CPU, for the bench's per-process account
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
