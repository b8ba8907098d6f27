"""Following the state topics on the real broker: BiasSubscriber, read_reputation and the CLI."""

from __future__ import annotations

import subprocess
import time

import orjson
import pytest
from confluent_kafka import Producer

from pipeline.errors import StackError
from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from producers.subscriber import BiasSubscriber, read_reputation
from schemas.state_records import BiasRecord, ReputationRecord, encode_record
from schemas.topics import Topics
from tests.integration.pipeline_procs import run_cli

pytestmark = pytest.mark.integration


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(settings, *args, timeout=90)


def test_subscribers_and_cli_see_the_latest_value_per_key(isolated: Settings) -> None:
    ensure_topics(isolated)
    topics = Topics(isolated.topic_prefix)
    producer = Producer({"bootstrap.servers": isolated.kafka_bootstrap})
    now = time.time()
    for value in (0.1, 0.2, 0.3):
        record = BiasRecord("increase_grounding", None, value, now, 3600.0, int(value * 10))
        producer.produce(topics.directive_bias, key=record.key.encode(), value=encode_record(record))
    scoped = BiasRecord("increase_grounding", "m-1", 0.6, now - 3600.0, 3600.0, 4)  # one half-life ago
    producer.produce(topics.directive_bias, key=scoped.key.encode(), value=encode_record(scoped))
    gone = BiasRecord("reduce_novelty", None, 0.5, now, 3600.0, 1)
    producer.produce(topics.directive_bias, key=gone.key.encode(), value=encode_record(gone))
    producer.produce(topics.directive_bias, key=gone.key.encode(), value=None)
    for score in (0.9, 0.4):
        rep = ReputationRecord("mesh", score, 30, score < 0.5, score if score < 0.5 else 1.0)
        producer.produce(topics.reputation, key=b"mesh", value=encode_record(rep))
    assert producer.flush(30) == 0

    with BiasSubscriber(isolated) as sub:
        snap = sub.snapshot()
        assert set(snap) == {"increase_grounding", "increase_grounding|m-1"}
        assert snap["increase_grounding"].value == 0.3 and snap["increase_grounding|m-1"] == scoped
        assert sub.current("increase_grounding") == pytest.approx(0.3, rel=1e-3)
        assert sub.current("increase_grounding", "m-1") == pytest.approx(0.3, rel=1e-2)  # 0.6 halved
        assert sub.current("increase_grounding", "m-1", at=now - 3600.0) == pytest.approx(0.6)
        assert sub.current("reduce_novelty") == 0.0  # tombstoned
        later = BiasRecord("boost_safety", None, 0.7, now, 3600.0, 1)
        producer.produce(topics.directive_bias, key=b"boost_safety", value=encode_record(later))
        producer.flush(30)
        deadline = time.monotonic() + 20
        updates: list[BiasRecord] = []
        while not updates and time.monotonic() < deadline:
            updates = sub.poll(0.5)
        assert updates == [later] and sub.current("boost_safety") == pytest.approx(0.7, rel=1e-3)

    assert read_reputation(isolated)["mesh"].downweighted is True

    bias = _cli(isolated, "bias", "--json")
    assert bias.returncode == 0, bias.stderr
    rows = {r["key"]: r for r in orjson.loads(bias.stdout)}
    assert set(rows) == {"increase_grounding", "increase_grounding|m-1", "boost_safety"}
    assert rows["boost_safety"]["value"] == 0.7 and rows["increase_grounding"]["events"] == 3
    assert rows["increase_grounding"]["value_now"] == pytest.approx(0.3, rel=1e-2)
    assert rows["increase_grounding|m-1"]["model_version"] == "m-1"
    assert rows["increase_grounding|m-1"]["value"] == 0.6
    assert rows["increase_grounding|m-1"]["value_now"] == pytest.approx(0.3, rel=1e-2)
    table = _cli(isolated, "bias")
    assert table.returncode == 0, table.stderr
    assert "model_version" in table.stdout and "m-1" in table.stdout and "reduce_novelty" not in table.stdout
    reputation = _cli(isolated, "reputation", "--json")
    assert reputation.returncode == 0 and orjson.loads(reputation.stdout)[0]["score"] == 0.4
    watch = _cli(isolated, "bias", "watch", "--json", "--max-seconds", "4")
    assert watch.returncode == 0, watch.stderr
    watched = [orjson.loads(line) for line in watch.stdout.splitlines()]
    assert {w["key"] for w in watched} == {"increase_grounding", "increase_grounding|m-1", "boost_safety"}


def test_cli_names_the_problem_when_kafka_is_absent(isolated: Settings) -> None:
    broken = isolated.model_copy(update={"bootstrap_servers": "127.0.0.1:1"})
    result = _cli(broken, "reputation", "--json")
    assert result.returncode == 1 and "127.0.0.1:1" in result.stderr


def test_a_missing_topic_is_named_with_the_bootstrap_servers(isolated: Settings) -> None:
    # No ensure_topics: this prefix has no topics at all.
    with BiasSubscriber(isolated) as sub, pytest.raises(StackError) as raised:
        sub.snapshot(timeout_s=5)
    assert Topics(isolated.topic_prefix).directive_bias in str(raised.value)
    assert isolated.kafka_bootstrap in str(raised.value)
