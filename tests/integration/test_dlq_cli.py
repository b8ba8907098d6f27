"""``feedback dlq list`` and ``feedback dlq replay`` on the real broker and the real worker.

The scenario an operator meets: a producer switched to Schema Registry framing before the
worker was given the registry, so its events are dead-lettered (stage ``decode``). The fix is
to restart the worker with ``FEEDBACK_SCHEMA_REGISTRY_URL``; the replay then sends the letters
back through the gate and the event lands in ``feedback.clean.v1``. Garbage fails again (a new
letter, not a loop); a second replay lands nothing twice (the gate reports a duplicate).

The registry is a small HTTP server speaking the two calls the client makes (register, get by
id): Kafka and the worker are real, and nothing of either is mocked.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from producers.synthetic import generate_events
from schemas.models import FeedbackEvent
from schemas.serde import AvroSerde
from schemas.topics import Topics
from tests.conftest import _free_port
from tests.integration.kafka_read import read_partitions, read_topic
from tests.integration.pipeline_procs import pipeline_process, run_cli, run_cli_ok, wait_for

pytestmark = pytest.mark.integration

COMMENT = "call me at +1 415 555 0100 about order 77"  # must never be printed by the CLI
GARBAGE = b"not avro at all, and never will be"


class _Registry(BaseHTTPRequestHandler):
    """Schema Registry's register and get-by-id calls, schemas kept in memory."""

    schemas: ClassVar[dict[int, str]] = {}  # a fresh dict per server (see the fixture)

    def _answer(self, body: dict[str, Any], status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["schema"]
        found = next((i for i, s in self.schemas.items() if json.loads(s) == json.loads(text)), None)
        if found is None:
            found = 100 + len(self.schemas)
            self.schemas[found] = text
        self._answer({"id": found})

    def do_GET(self) -> None:
        match = re.fullmatch(r"/schemas/ids/(\d+)(\?.*)?", self.path)
        if match and int(match.group(1)) in self.schemas:
            self._answer({"schema": self.schemas[int(match.group(1))], "schemaType": "AVRO"})
        else:
            self._answer({"error_code": 40403, "message": "Schema not found"}, 404)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def registry() -> Iterator[str]:
    handler = type("Registry", (_Registry,), {"schemas": {}})
    server = ThreadingHTTPServer(("127.0.0.1", _free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli(settings, *args, env=env)


_ok = run_cli_ok


def _count(settings: Settings, topic: str) -> int:
    return len(read_topic(settings, topic))


def _committed_to_end(settings: Settings, topics: list[str]) -> bool:
    """Whether the worker's group has committed every partition of ``topics`` up to its end."""
    group = f"{settings.topic_prefix}{settings.worker_id}"
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        for topic in topics:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            tps = [TopicPartition(topic, p) for p in meta.partitions]
            for tp in consumer.committed(tps, timeout=10):
                high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)[1]
                if high and tp.offset < high:
                    return False
        return True
    finally:
        consumer.close()


def _clean_ids(settings: Settings, registry_url: str) -> list[str]:
    serde = AvroSerde.from_url(registry_url)  # reads both framings
    return [serde.decode(v)["event_id"] for _, v in read_topic(settings, Topics(settings.topic_prefix).clean)]


def _rejected(settings: Settings) -> list[dict[str, Any]]:
    serde = AvroSerde("rejected_v1")
    return [serde.decode(v) for _, v in read_topic(settings, Topics(settings.topic_prefix).rejected)]


def test_list_then_replay_after_the_fix_lands_once(isolated: Settings, registry: str, tmp_path: Path) -> None:
    settings = isolated.model_copy(update={"table_store": "memory"})
    ensure_topics(settings)
    topics = Topics(settings.topic_prefix)
    framed_event = FeedbackEvent.model_validate(
        {"source": "dream_ui", "type": "thumbs", "user_id": "u-replay-1",
         "payload": {"direction": "down", "comment": COMMENT}}
    )  # fmt: skip
    framed = AvroSerde.from_url(registry).encode(framed_event.to_avro())
    assert framed[:1] == b"\x00"  # schema-registry framing: poison to a worker without the registry
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    producer.produce(topics.raw, value=framed, key=b"u-replay-1")
    producer.produce(topics.raw, value=GARBAGE, key=b"u-garbage")
    producer.produce(topics.raw, value=b"", key=b"u-empty")
    producer.produce(topics.interactions, value=b"\x01\x02 not an interaction", key=b"i-1")
    assert producer.flush(30) == 0

    # 1. The worker without the registry dead-letters all four.
    with pipeline_process(settings, "worker", tmp_path / "worker-1.log") as worker:
        wait_for(lambda: _count(settings, topics.dlq) >= 4, 120, "four letters in the DLQ", [worker])
        wait_for(lambda: _committed_to_end(settings, [topics.raw, topics.interactions]), 60,
                 "the worker's offsets committed", [worker])  # fmt: skip

    listed = json.loads(_ok(settings, "dlq", "list", "--json").stdout)
    assert len(listed) == 4
    assert [r["ts"] for r in listed] == sorted((r["ts"] for r in listed), reverse=True)  # newest first
    by_error = {r["error"]: r for r in listed}
    registry_letter = next(r for e, r in by_error.items() if "no schema registry is configured" in e)
    assert registry_letter["stage"] == "decode" and registry_letter["topic"] == topics.raw
    assert registry_letter["size"] == len(framed) and registry_letter["offset"] == 0
    assert any("unknown framing" in e for e in by_error) and any("empty message" in e for e in by_error)
    interactions = next(r for r in listed if r["stage"] == "interactions")
    assert interactions["topic"] == topics.interactions
    assert set(listed[0]) == {"ts", "stage", "error", "topic", "partition", "offset", "size", "dlq_partition",
                              "dlq_offset"}  # no key, no bytes  # fmt: skip

    table = _ok(settings, "dlq", "list", "--since", "1h", "--stage", "decode")
    assert table.stdout.count(topics.raw) == 3 and "interactions" not in table.stdout
    assert "3 letter(s)" in table.stderr
    for secret in ("u-replay-1", "u-garbage", "415 555", "order 77", "not avro"):
        assert secret not in table.stdout + table.stderr
    assert "1 of 4 letter(s)" in _ok(settings, "dlq", "list", "--limit", "1").stderr
    nothing = _ok(settings, "dlq", "list", "--stage", "gate")
    assert "0 letter(s)" in nothing.stderr and "stages present: decode, interactions" in nothing.stderr

    raw_before = _count(settings, topics.raw)
    dry = _ok(settings, "dlq", "replay", "--dry-run")
    assert "dry run: would replay 2 message(s)" in dry.stderr
    assert f"skipped 1: from {topics.interactions} (stage interactions)" in dry.stderr
    assert "skipped 1: an empty message" in dry.stderr
    assert _count(settings, topics.raw) == raw_before  # nothing sent

    # 2. The fix: the worker gets the registry. A fresh event proves it runs; the dead-lettered
    # one has not landed on its own (its offsets were committed).
    fixed = settings.model_copy(update={"schema_registry_url": registry})
    marker = next(generate_events(1, seed=3))
    producer.produce(topics.raw, value=AvroSerde().encode(marker.to_avro()), key=b"u-marker")
    assert producer.flush(30) == 0
    with pipeline_process(fixed, "worker", tmp_path / "worker-2.log") as worker:
        wait_for(lambda: str(marker.event_id) in _clean_ids(settings, registry), 120, "the marker event", [worker])
        assert str(framed_event.event_id) not in _clean_ids(settings, registry)

        first = _ok(settings, "dlq", "replay")
        assert "replayed 2 message(s)" in first.stderr, first.stderr
        assert "skipped 1: an empty message" in first.stderr
        wait_for(lambda: str(framed_event.event_id) in _clean_ids(settings, registry), 60, "the replayed event",
                 [worker])  # fmt: skip
        # The garbage failed again: a new letter, pointing at the replayed copy, and no loop.
        wait_for(lambda: _count(settings, topics.dlq) >= 5, 60, "the garbage's second letter", [worker])
        garbage_letters = [r for r in json.loads(_ok(settings, "dlq", "list", "--json").stdout)
                           if r["topic"] == topics.raw and "unknown framing" in r["error"]]  # fmt: skip
        assert len(garbage_letters) == 2 and len({r["offset"] for r in garbage_letters}) == 2

        second = _ok(settings, "dlq", "replay")
        assert "replayed 2 message(s)" in second.stderr  # the event once more, the garbage once
        assert "skipped 1: the same message as another letter" in second.stderr
        wait_for(
            lambda: any(r["event_id"] == str(framed_event.event_id) and r["reason"] == "duplicate"
                        for r in _rejected(settings)),
            60, "the gate to drop the second replay as a duplicate", [worker],
        )  # fmt: skip
        wait_for(lambda: _count(settings, topics.dlq) >= 6, 60, "the garbage's third letter", [worker])
    assert _clean_ids(settings, registry).count(str(framed_event.event_id)) == 1
    assert _count(settings, topics.dlq) == 6  # every replay added one letter for the garbage, no more
    # Replayed copies went to the partitions the originals came from.
    originals = {p for p, k, _ in read_partitions(settings, topics.raw) if k == b"u-replay-1"}
    assert len(originals) == 1


def test_replay_with_nothing_to_send(isolated: Settings) -> None:
    ensure_topics(isolated)
    result = _ok(isolated, "dlq", "replay", "--since", "2h", "--stage", "decode")
    assert "0 letter(s) of stage decode" in result.stderr and "replayed 0 message(s)" in result.stderr


@pytest.mark.parametrize("args", [["dlq", "list"], ["dlq", "replay"], ["dlq", "replay", "--dry-run"]])
def test_kafka_unreachable_is_one_line_and_exit_1(isolated: Settings, args: list[str]) -> None:
    servers = f"127.0.0.1:{_free_port()}"
    result = _cli(isolated, *args, FEEDBACK_BOOTSTRAP_SERVERS=servers)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"error: cannot reach Kafka at {servers}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_dlq_topic_says_how_to_create_it(isolated: Settings) -> None:
    other = isolated.model_copy(update={"topic_prefix": f"none{uuid.uuid4().hex[:8]}."})
    result = _cli(other, "dlq", "list")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"error: topic {Topics(other.topic_prefix).dlq} does not exist at {other.kafka_bootstrap}; "
        "create the topics with `feedback topics`"
    )


def test_replay_skips_the_letters_of_a_user_erased_since(isolated: Settings) -> None:
    from datetime import UTC, datetime

    from schemas.dead_letter import dead_letter
    from sinks.clickhouse import connect
    from sinks.migrations import migrate

    ensure_topics(isolated)
    migrate(connect(isolated), isolated)  # the tables `forget` erases from (no sink runs here)
    topics = Topics(isolated.topic_prefix)
    serde, letters = AvroSerde(), AvroSerde("dead_letter_v1")
    producer = Producer({"bootstrap.servers": isolated.kafka_bootstrap})
    for n, user in enumerate(("u-gone", "u-kept", "u-gone")):
        event = FeedbackEvent.model_validate({"source": "dream_ui", "type": "thumbs", "user_id": user,
                                              "payload": {"direction": "up"}})  # fmt: skip
        letter = dead_letter(stage="gate", error="RuntimeError in gate", topic=topics.raw, partition=0, offset=n,
                             key=user.encode(), raw=serde.encode(event.to_avro()), now=datetime.now(UTC))  # fmt: skip
        producer.produce(topics.dlq, letters.encode(letter), user.encode())
    producer.flush(30)

    _ok(isolated, "forget", "--user-id", "u-gone", "--yes", "--no-drain")
    # The erasure record names the user by keyed pseudonym only.
    erasures = read_topic(isolated, topics.erasures)
    assert len(erasures) == 1 and b"u-gone" not in (erasures[0][0] or b"") + (erasures[0][1] or b"")

    out = _ok(isolated, "dlq", "replay", "--since", "1d").stderr  # the CLI reports on stderr
    assert "skipped 2: events of a user erased with `feedback forget`" in out, out
    assert "replayed 1 message(s)" in out, out
    replayed = [serde.decode(v)["user_id"] for _, v in read_topic(isolated, topics.raw) if v is not None]
    assert replayed == ["u-kept"]
