"""Ingest throughput: the Python client and the HTTP gateway, against a bare producer.

Run with ``make bench`` (or ``python -m benchmarks.bench_ingest``). In one run, on a
private local stack:

* **bare**: a confluent-kafka producer (same settings as the client) sending the
  already-encoded bytes of the events — the ceiling;
* **client**: ``FeedbackClient.thumbs(...)`` per event — validation, hashing, Avro
  encoding and the produce — until Kafka has acknowledged all of them;
* **gateway single**: ``POST /internal/feedback`` one event per request (keep-alive,
  a few concurrent connections), each answered after Kafka's acknowledgement;
* **gateway batch**: ``POST /internal/feedback/batch`` with 1,000 events per request.

Targets (issue 6): client ≥ 100,000 events/s, gateway batches ≥ 30,000 events/s,
single POSTs ≥ 3,000/s, each also reported as a ratio to the bare producer.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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
from schemas.models import FeedbackEvent
from schemas.serde import AvroSerde
from schemas.topics import Topics

TOKEN = "bench-token-0123456789"


def _events(n: int) -> list[dict[str, Any]]:
    return [
        {"source": "dream_ui", "type": "thumbs", "user_id": f"u-{i % 5000}", "interaction_id": f"i-{i}",
         "payload": {"direction": "up" if i % 3 else "down", "comment": "fine"}}
        for i in range(n)
    ]  # fmt: skip


def bare(settings: Settings, values: list[tuple[bytes, bytes]]) -> float:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True, "acks": "all",
                         "linger.ms": 5, "batch.size": 1_000_000, "compression.type": "lz4"})  # fmt: skip
    topic = Topics(settings.topic_prefix).raw
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


def client(settings: Settings, events: list[dict[str, Any]]) -> float:
    started = time.perf_counter()
    with FeedbackClient("dream_ui", settings) as fb:
        for e in events:
            fb.thumbs(up=e["payload"]["direction"] == "up", user_id=e["user_id"], interaction_id=e["interaction_id"],
                      comment="fine")  # fmt: skip
    return len(events) / (time.perf_counter() - started)


def gateway(settings: Settings, events: list[dict[str, Any]], batch: int, workers: int) -> float:
    port = free_port()
    env = {**os.environ, **settings.to_env(), "FEEDBACK_INTERNAL_TOKENS": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        headers = {"X-Internal-Token": TOKEN, "Content-Type": "application/json"}
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the gateway did not become ready")
            time.sleep(0.2)
        chunks = [events[i : i + batch] for i in range(0, len(events), batch)]
        path, expect = ("/internal/feedback/batch", 207) if batch > 1 else ("/internal/feedback", 202)

        def send(part: list[list[dict[str, Any]]]) -> None:
            with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
                for chunk in part:
                    body = orjson.dumps({"events": chunk} if batch > 1 else chunk[0])
                    resp = http.post(path, content=body)
                    if resp.status_code != expect:
                        raise SystemExit(f"gateway answered {resp.status_code}")

        parts = [chunks[i::workers] for i in range(workers)]
        started = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(send, parts))
        return len(events) / (time.perf_counter() - started)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--single", type=int, default=5_000, help="events for the single-POST run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="feedback-bench-") as tmp:
        local, settings = stack(
            Path(tmp), topic_partitions=2, rate_limit_per_minute=1e9, pseudonym_key="bench-key-0123456789"
        )
        try:
            ensure_topics(settings)
            events = _events(args.events)
            serde = AvroSerde()
            encoded = []
            for e in events:
                event = FeedbackEvent.model_validate(e)
                encoded.append((subject_key(event), serde.encode(event.to_avro())))
            bare_rate = bare(settings, encoded)
            client_rate = client(settings, events)
            batch_rate = gateway(settings, events, batch=1000, workers=2)
            single_rate = gateway(settings, events[: args.single], batch=1, workers=4)
        finally:
            local.down()
    result = {
        "benchmark": "ingest",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "events": args.events,
        "bare_events_per_s": round(bare_rate),
        "client_events_per_s": round(client_rate),
        "client_ratio": round(client_rate / bare_rate, 3),
        "gateway_batch_events_per_s": round(batch_rate),
        "gateway_batch_ratio": round(batch_rate / bare_rate, 3),
        "gateway_single_per_s": round(single_rate),
        "gateway_single_ratio": round(single_rate / bare_rate, 4),
        "targets": {"client": 100_000, "gateway_batch": 30_000, "gateway_single": 3_000},
    }
    record_result("bench_ingest", result)


if __name__ == "__main__":
    main()
