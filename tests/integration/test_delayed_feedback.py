"""Delayed feedback on the real broker and ClickHouse: track() now, feedback later, joined in the stream.

Three partitions, so the join only works if track() and the stream's re-keying put each
interaction_id in the same partition (the Java murmur2 partitioner on both sides).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from producers.client import FeedbackClient
from schemas.envelope import is_envelope, unpack
from schemas.serde import AvroSerde
from schemas.topics import Topics
from sinks.clickhouse import connect
from tests.conftest import _free_port
from tests.integration.kafka_read import read_partitions
from tests.integration.pipeline_procs import pipeline_process, wait_for
from tests.integration.test_stream_rules import _scrape

pytestmark = pytest.mark.integration

N = 30


def test_late_feedback_is_enriched_and_unknown_or_expired_is_marked(isolated: Settings, tmp_path: Path) -> None:
    metrics_port = _free_port()
    settings = isolated.model_copy(
        update={
            "allow_text": True,
            "interaction_ttl_s": 3600.0,
            "rate_limit_per_minute": 1e6,
            "worker_metrics_port": metrics_port,
            "kafka_session_timeout_s": 6.0,
            # The gate waits for the interaction index as long as it takes (default: 200 ms, then the
            # join decides), so which events skip the join is the rule's choice, not the machine's.
            "interaction_index_wait_ms": 60_000.0,
        }
    )
    ensure_topics(settings)
    now = datetime.now(UTC)
    topics = Topics(settings.topic_prefix)

    with (
        pipeline_process(settings, "worker", tmp_path / "worker.log") as worker,
        pipeline_process(settings, "sink", tmp_path / "sink.log") as sink,
    ):
        procs = [worker, sink]
        with FeedbackClient("assistant", settings) as fb:
            for i in range(N):
                fb.track(
                    f"i-{i}", ts=now - timedelta(minutes=10), model_version=f"m-{i % 3}", prompt_version="p-1",
                    latency_ms=10.0 * i, cost=0.001, prompt="hello", response="write to bob@example.com",
                )  # fmt: skip
            fb.track("i-old", ts=now - timedelta(minutes=90), model_version="m-old")  # past the 1 h TTL

        def stored() -> float:
            try:
                return _scrape(metrics_port).get(("feedback_interactions_total", ()), 0.0)
            except OSError:
                return 0.0

        wait_for(lambda: stored() >= N + 1, 120, "the interactions stored by the worker", procs)

        with FeedbackClient("dream_ui", settings) as fb:
            for i in range(N):
                fb.rating(1 + i % 5, interaction_id=f"i-{i}", user_id=f"u-{i}")
            fb.thumbs(up=False, interaction_id="i-old", user_id="u-old")
            fb.thumbs(up=True, interaction_id="i-never-tracked", user_id="u-x")
            fb.thumbs(up=True, user_id="u-none")

        client = connect(settings)
        db = settings.clickhouse_database

        def rows() -> list[tuple]:
            if not client.command(f"EXISTS TABLE `{db}`.feedback_events"):
                return []
            return client.query(
                f"SELECT interaction_id, interaction_status, model_version, prompt_version, interaction_latency_ms, "
                f"interaction_cost, interaction_tracked_at, interaction_response FROM `{db}`.feedback_events FINAL"
            ).result_rows

        wait_for(lambda: len(rows()) >= N + 3, 120, "the feedback in ClickHouse", procs)

    by_id = {r[0]: r for r in rows()}
    assert len(by_id) == N + 3
    for i in range(N):
        _, status, model, prompt, latency, cost, tracked_at, response = by_id[f"i-{i}"]
        assert status == "joined", f"i-{i} was not joined"
        assert (model, prompt, latency, cost) == (f"m-{i % 3}", "p-1", 10.0 * i, 0.001)
        assert abs(tracked_at.replace(tzinfo=UTC) - (now - timedelta(minutes=10))) < timedelta(milliseconds=1)
        assert response == "write to [EMAIL]"
    assert by_id["i-old"][1:3] == ("expired", None)
    assert by_id["i-never-tracked"][1:3] == ("unknown", None)
    assert by_id[None][1] is None
    # The same partition for an interaction and its feedback, on both topics.
    tracked = {key: p for p, key, _ in read_partitions(settings, topics.interactions)}
    rekeyed = {  # the worker sends them as envelopes, one per partition and batch
        str(AvroSerde().decode(body)["interaction_id"]).encode(): p
        for p, _, value in read_partitions(settings, topics.enrich)
        for body in (unpack(value) if is_envelope(value) else [value])
    }
    # Only the interactions that were tracked take the join; the one never tracked went straight to
    # the clean topic, marked unknown all the same (above).
    assert set(rekeyed) == set(tracked)
    assert all(rekeyed[key] == tracked[key] for key in tracked)
    assert len(set(tracked.values())) == 3  # the ids really spread over the partitions
    # Nothing left the client unredacted.
    assert not any(b"bob@example.com" in (v or b"") for _, _, v in read_partitions(settings, topics.interactions))
