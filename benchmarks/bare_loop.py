"""Baseline: a bare confluent-kafka consume → produce loop, run as its own process.

It reads the raw topic from the start in batches of 1,000 (``Consumer.consume``) and
produces every event's bytes, unchanged, to an output topic (an envelope's events one
by one, as the worker publishes them), with the client's producer settings (acks=all,
idempotence, linger 5 ms, lz4). No decoding, no state: the ceiling of one Python
process moving messages on this machine. It exits once it has forwarded
``BENCH_EXPECT`` events (or after ``BENCH_MAX_S`` seconds) and prints a JSON line.

Configured by environment: ``BENCH_BOOTSTRAP``, ``BENCH_SOURCE``, ``BENCH_TARGET``,
``BENCH_GROUP``, ``BENCH_EXPECT``, ``BENCH_MAX_S``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from confluent_kafka import Consumer, Producer

from benchmarks.naive_faust import splitter

PRODUCER = {"enable.idempotence": True, "acks": "all", "linger.ms": 5, "batch.size": 1_000_000,
            "compression.type": "lz4"}  # fmt: skip


def main() -> None:
    env = os.environ
    bootstrap, source, target = env["BENCH_BOOTSTRAP"], env["BENCH_SOURCE"], env["BENCH_TARGET"]
    expect, max_s = int(env["BENCH_EXPECT"]), float(env.get("BENCH_MAX_S", "600"))
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": env["BENCH_GROUP"],
                         "auto.offset.reset": "earliest", "enable.auto.commit": True,
                         "fetch.queue.backoff.ms": 20})  # fmt: skip
    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER})
    split = splitter()
    consumer.subscribe([source])
    produce, poll = producer.produce, producer.poll
    forwarded = 0
    deadline = time.monotonic() + max_s
    try:
        while forwarded < expect and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is not None:
                    continue
                for value in split(msg.value()):
                    while True:
                        try:
                            produce(target, value)
                            break
                        except BufferError:
                            poll(0.05)
                    forwarded += 1
            poll(0)
        left = producer.flush(60)
    finally:
        consumer.close()
    sys.stdout.write(json.dumps({"forwarded": forwarded, "undelivered": left}) + "\n")


if __name__ == "__main__":
    main()
