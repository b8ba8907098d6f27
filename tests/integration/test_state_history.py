"""Reputation and directive-bias updates are recorded in ClickHouse, once each."""

from __future__ import annotations

import pytest
from confluent_kafka import Producer

from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from schemas.state_records import BiasRecord, ReputationRecord, encode_record
from schemas.topics import Topics
from sinks.clickhouse import connect
from sinks.state_sinks import BiasHistorySink, ReputationHistorySink

pytestmark = pytest.mark.integration


def test_state_updates_land_in_history_tables_once(isolated: Settings) -> None:
    ensure_topics(isolated)
    topics = Topics(isolated.topic_prefix)
    producer = Producer({"bootstrap.servers": isolated.kafka_bootstrap})
    for i in range(5):
        rep = ReputationRecord("oracle", 1.0 - i * 0.1, 20 + i, i >= 4, 1.0)
        producer.produce(topics.reputation, key=b"oracle", value=encode_record(rep))
        bias = BiasRecord("boost_safety", "m-1" if i % 2 else None, 0.1 * i, 1_795_000_000.0 + i, 3600.0, i + 1)
        producer.produce(topics.directive_bias, key=bias.key.encode(), value=encode_record(bias))
    producer.produce(topics.reputation, key=b"mesh", value=b"{not a record")  # skipped, never stops the sink
    producer.produce(topics.reputation, key=b"gone", value=None)  # a tombstone
    assert producer.flush(30) == 0

    for _ in range(2):  # the second run uses a fresh group: the same updates again, collapsed by coordinates
        for sink in (ReputationHistorySink(isolated), BiasHistorySink(isolated)):
            sink.run(idle_exit_s=3.0)
        isolated = isolated.model_copy(update={"sink_group": isolated.sink_group + "-again"})

    client = connect(isolated)
    db = isolated.clickhouse_database
    reps = client.query(f"SELECT source, score, observations, downweighted FROM `{db}`.reputation_history FINAL"
                        " ORDER BY observations").result_rows  # fmt: skip
    assert [r[2] for r in reps] == [20, 21, 22, 23, 24] and {r[0] for r in reps} == {"oracle"}
    assert reps[-1][3] is True and reps[-1][1] == pytest.approx(0.6)
    biases = client.query(f"SELECT directive, model_version, value, events FROM `{db}`.directive_bias_history FINAL"
                          " ORDER BY events").result_rows  # fmt: skip
    assert [(b[1], b[3]) for b in biases] == [(None, 1), ("m-1", 2), (None, 3), ("m-1", 4), (None, 5)]
    assert int(client.command(f"SELECT count() FROM `{db}`.directive_bias_history")) == 5  # not only with FINAL
