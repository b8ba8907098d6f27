"""Producer → Kafka → worker → Kafka → sink → ClickHouse + JSONL, on the real services."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from pipeline.kafka_admin import ensure_topics, topic_message_counts
from pipeline.settings import Settings
from producers.producer import FeedbackProducer
from producers.synthetic import generate_events
from schemas.hashing import compute_hash
from schemas.models import FeedbackEvent
from schemas.serde import AvroSerde
from schemas.topics import Topics
from sinks.clickhouse import connect
from stream_processors.config import hash_key, pseudonym_key
from stream_processors.dedup import keyed_hash
from stream_processors.redact import pseudonymize
from tests.integration.pipeline_procs import pipeline_process, wait_for

pytestmark = pytest.mark.integration

N_EVENTS = 10_000
POISON = [b"not avro at all", b"\xc3\x01" + b"\x07" * 8 + b"unknown", b""]


def _final_count(settings: Settings, table: str = "feedback_events") -> int:
    client = connect(settings)
    db = settings.clickhouse_database
    if not client.command(f"EXISTS TABLE `{db}`.{table}"):
        return 0
    return int(client.command(f"SELECT count() FROM `{db}`.{table} FINAL"))


def test_ten_thousand_events_land_exactly_once_and_poison_goes_to_the_dlq(isolated: Settings, tmp_path: Path) -> None:
    ensure_topics(isolated)
    events = list(generate_events(N_EVENTS, seed=11))
    # One event whose comment holds an email: its stored row must not let a guess be checked.
    planted = FeedbackEvent.model_validate({
        "source": "dream_ui", "type": "thumbs", "user_id": "u-planted",
        "payload": {"direction": "down", "comment": "write to jane.roe@example.com"},
    })  # fmt: skip
    events[100] = planted
    with FeedbackProducer(isolated) as producer:
        # Poison in the middle of the stream: the events after it must still land.
        producer.send_many(events[: N_EVENTS // 2])
        for value in POISON:
            producer.send_raw(value, key=events[0].user_id.encode())
        producer.send_many(events[N_EVENTS // 2 :])

    with (
        pipeline_process(isolated, "worker", tmp_path / "worker.log") as worker,
        pipeline_process(isolated, "sink", tmp_path / "sink.log") as sink,
    ):
        wait_for(lambda: _final_count(isolated) >= N_EVENTS, 240, "10,000 events in ClickHouse", [worker, sink])
        topics = Topics(isolated.topic_prefix)
        wait_for(
            lambda: topic_message_counts(isolated, [topics.dlq])[topics.dlq] >= len(POISON),
            60,
            "poison in the DLQ topic",
            [worker, sink],
        )
        wait_for(
            lambda: _final_count(isolated, "dlq_events") >= len(POISON),
            60,
            "dead letters in ClickHouse",
            [worker, sink],
        )

        def jsonl_lines() -> int:  # the JSONL sink is its own consumer: it may trail ClickHouse's
            return sum(len(f.read_bytes().splitlines()) for f in isolated.path.glob("feedback-*.jsonl"))

        wait_for(lambda: jsonl_lines() >= N_EVENTS, 60, "10,000 events in the JSONL files", [worker, sink])

    client = connect(isolated)
    db = isolated.clickhouse_database
    expected = {e.event_id for e in events}
    landed = [r[0] for r in client.query(f"SELECT event_id FROM `{db}`.feedback_events FINAL").result_rows]
    assert len(landed) == N_EVENTS
    assert set(landed) == expected
    # Delivered once, not merely deduplicated at read time.
    assert int(client.command(f"SELECT count() FROM `{db}`.feedback_events")) == N_EVENTS

    # The content survives the trip: hashes (keyed) and fields match what was produced.
    by_id = {e.event_id: e for e in events}
    secret = hash_key(isolated)
    key = pseudonym_key(isolated)
    assert key is not None and events[0].user_id is not None
    sample = client.query(
        f"SELECT event_id, hash, source, type, severity, user_id, model_version FROM `{db}`.feedback_events LIMIT 50"
    ).result_rows
    for event_id, digest, source, type_, severity, user_id, model_version in sample:
        e = by_id[event_id]
        assert (digest, source, type_, severity, user_id, model_version) == (
            keyed_hash(e.hash, secret),
            e.source,
            e.type,
            e.severity.value,
            pseudonymize(e.user_id, key),  # personal ids leave the gate pseudonymized
            e.model_version,
        )

    lines = [
        orjson.loads(line)
        for f in sorted(isolated.path.glob("feedback-*.jsonl"))
        for line in f.read_bytes().splitlines()
    ]
    assert len(lines) == N_EVENTS
    assert {line["event_id"] for line in lines} == expected
    assert all("client_ip" not in line for line in lines)
    for line in lines[:50]:
        assert line["hash"] == keyed_hash(by_id[line["event_id"]].hash, secret)
        assert f"feedback-{line['ts'][:10]}.jsonl" in {p.name for p in isolated.path.glob("*.jsonl")}

    # An attacker with the stored row of the planted event guesses the email behind [EMAIL]:
    # rebuilding the raw event around each guess and hashing it as the producer does finds the
    # producer's hash for the true guess, but nothing stored matches any guess.
    ((stored_hash, comment),) = client.query(
        f"SELECT hash, payload_comment FROM `{db}`.feedback_events FINAL WHERE event_id = %(id)s",
        parameters={"id": planted.event_id},
    ).result_rows
    assert comment == "write to [EMAIL]"
    guesses = {}
    for candidate in ("jane@example.com", "jane.roe@example.com", "j.roe@example.com", "jane.roe@example.org"):
        raw = planted.model_dump(mode="json")
        raw["payload"]["comment"] = f"write to {candidate}"
        guesses[candidate] = compute_hash(FeedbackEvent.model_validate(raw))
    assert guesses["jane.roe@example.com"] == planted.hash  # the guess works against an unkeyed hash
    stored = {stored_hash} | {line["hash"] for line in lines if line["event_id"] == planted.event_id}
    assert stored == {keyed_hash(planted.hash, secret)} and not stored & set(guesses.values())

    # The DLQ holds each poison message with its stage, reason and original bytes.
    dlq = AvroSerde("dead_letter_v1")
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": isolated.kafka_bootstrap,
            "group.id": f"{isolated.topic_prefix}check",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topics.dlq])
    letters = []
    try:
        for _ in range(60):
            for msg in consumer.consume(num_messages=100, timeout=1.0):
                if msg.error() is None:
                    letters.append(dlq.decode(msg.value()))
            if len(letters) >= len(POISON):
                break
    finally:
        consumer.close()
    assert sorted(letter["raw"] for letter in letters) == sorted(POISON)
    assert {letter["stage"] for letter in letters} == {"decode"}
    assert all(letter["topic"] == topics.raw and letter["error"] for letter in letters)
    assert len({(letter["partition"], letter["offset"]) for letter in letters}) == len(POISON)
    assert _final_count(isolated, "dlq_events") == len(POISON)
    stages = client.query(f"SELECT DISTINCT stage, topic FROM `{db}`.dlq_events").result_rows
    assert stages == [("decode", topics.raw)]
