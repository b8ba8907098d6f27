"""Two workers in one group on a 12-partition raw topic: one joins mid-stream, one leaves with
SIGTERM, one dies with SIGKILL. Nothing accepted is lost and no table counts anything twice."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from producers.client import FeedbackClient
from producers.producer import FeedbackProducer
from schemas import FeedbackEvent
from schemas.serde import AvroSerde
from schemas.state_records import decode_bias, decode_reputation
from schemas.topics import Topics
from tests.integration.kafka_read import latest_by_key, read_topic
from tests.integration.pipeline_procs import pipeline_process, wait_for

pytestmark = pytest.mark.integration

N_BULK = 24_000  # through emit_many: envelopes
N_SINGLE = 1_200  # one event per message
DIRECTIVE_TYPES = {"bad_output", "latency", "veto"}


def _items(start: int, n: int) -> list[dict[str, Any]]:
    kinds = ("thumbs", "rating", "implicit", "bad_output", "thumbs", "latency", "veto", "thumbs")
    out = []
    for i in range(start, start + n):
        kind = kinds[i % len(kinds)]
        payload = {"thumbs": {"direction": "up"}, "rating": {"stars": 4}, "implicit": {"signal": "copy"}}.get(kind, {})
        out.append({"type": kind, "user_id": f"user-{i % 3000}", "idempotency_key": f"k-{i}", "payload": payload,
                    "interaction_id": f"i-{i}" if i % 4 == 0 else None})  # fmt: skip
    return out


def _outcome_records(settings: Settings, topics: Topics) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for _, value in read_topic(settings, topics.outcomes):
        items = orjson.loads(value or b"[]")
        records.extend(items if isinstance(items, list) else [items])
    return records


def test_workers_joining_and_leaving_lose_nothing_and_count_nothing_twice(isolated: Settings, tmp_path: Path) -> None:
    settings = isolated.model_copy(
        update={
            "topic_partitions": 12,
            "kafka_session_timeout_s": 6.0,
            "bias_publish_interval_s": 0.2,
            "worker_metrics_port": 0,
            "rate_limit_per_minute": 1_000_000,
            "pseudonym_key": "rebalance-test-key-0123",
        }
    )
    ensure_topics(settings)
    topics = Topics(settings.topic_prefix)
    # Two processes of one group (one app id), each with its own local state.
    worker_a = settings.model_copy(update={"state_dir": tmp_path / "a"})
    worker_b = settings.model_copy(update={"state_dir": tmp_path / "b"})
    total = N_BULK + N_SINGLE

    def produce() -> None:  # ~4,000 events/s for ~6 s: the membership changes happen mid-stream
        with FeedbackClient("rebalance", settings) as fb, FeedbackProducer(settings) as single:
            for start in range(0, N_BULK, 1_000):
                fb.emit_many(_items(start, 1_000))
                fb.flush()
                for item in _items(N_BULK + start // 20, 50):  # 50 single-event messages per round
                    single.send(FeedbackEvent.model_validate({"source": "single", **item}))
                single.flush()
                time.sleep(0.25)

    def decided() -> int:
        return len({(o["partition"], o["offset"]) for o in _outcome_records(settings, topics)})

    producer = threading.Thread(target=produce)
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(pipeline_process(worker_a, "worker", tmp_path / "a-1.log"))
        producer.start()
        wait_for(lambda: decided() >= total // 6, 120, "the first worker deciding", [a])
        b = stack.enter_context(pipeline_process(worker_b, "worker", tmp_path / "b.log"))  # joins
        wait_for(lambda: decided() >= total // 3, 120, "both workers deciding", [a, b])
        a.send_signal(signal.SIGTERM)  # leaves cleanly: its partitions move to b
        a.wait(60)
        wait_for(lambda: decided() >= total // 2, 120, "the second worker alone", [b])
        a = stack.enter_context(pipeline_process(worker_a, "worker", tmp_path / "a-2.log"))  # comes back
        wait_for(lambda: decided() >= 2 * total // 3, 120, "both again", [a, b])
        b.kill()  # dies: no commit, no flush
        b.wait(10)
        producer.join(120)
        assert decided() < total, "the stream was over before the last change: the test proves nothing"
        wait_for(lambda: decided() == total, 240, "every event decided", [a])

        # Tables: each event observed once by reputation, each directive event once by the bias.
        def observations() -> int:
            return sum(decode_reputation(v).observations for v in latest_by_key(settings, topics.reputation).values())

        wait_for(lambda: observations() == total, 240, f"{total} observations", [a])
        serde = AvroSerde()
        clean: dict[str, dict[str, Any]] = {}

        def all_clean() -> bool:  # feedback naming an interaction lands after its outcome (the enrich hop)
            clean.update({(e := serde.decode(v))["event_id"]: e for _, v in read_topic(settings, topics.clean)})
            return len(clean) >= total

        wait_for(all_clean, 120, f"{total} events on the clean topic", [a])
        feeding = sum(1 for e in clean.values() if e["type"] in DIRECTIVE_TYPES)

        def bias_events() -> int:
            return sum(decode_bias(v).events for v in latest_by_key(settings, topics.directive_bias).values())

        wait_for(lambda: bias_events() == feeding, 120, f"{feeding} bias increments", [a])

    # Nothing lost: every event accepted (distinct idempotency keys, no limit) is on the clean topic,
    # once per id whatever was replayed; nothing was refused or dead-lettered.
    assert len(clean) == total
    assert not read_topic(settings, topics.rejected) and not read_topic(settings, topics.dlq)
    assert {e["source"] for e in clean.values()} == {"rebalance", "single"}
    rep = {k: decode_reputation(v) for k, v in latest_by_key(settings, topics.reputation).items()}
    assert rep["rebalance"].observations == N_BULK and rep["single"].observations == N_SINGLE
    assert sum(1 for log in tmp_path.glob("*.log") if b"batch_failed" in log.read_bytes()) == 0
