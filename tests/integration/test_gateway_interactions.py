"""Tracking over HTTP against the real gateway, broker and ClickHouse: POST /internal/interactions
then feedback naming it through the pipeline, joined; GET /internal/interactions/{id} gives the
context and the feedback stats; the same auth, limits and redaction as the feedback endpoints."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from producers.client import FeedbackClient
from producers.gateway import create_gateway
from producers.producer import JAVA_PARTITIONER, FeedbackProducer
from schemas.serde import AvroSerde
from schemas.topics import Topics
from sinks.clickhouse import connect
from tests.conftest import _free_port
from tests.integration import test_gateway
from tests.integration.kafka_read import read_partitions
from tests.integration.pipeline_procs import pipeline_process, run_cli, wait_for
from tests.integration.test_gateway import AUTH, TOKENS
from tests.integration.test_stream_rules import _scrape

pytestmark = pytest.mark.integration

KEY = {"X-Internal-Token": AUTH["X-Internal-Token"]}
gateway = test_gateway.gateway  # the gateway fixture there: in-process, the real broker, 5 a minute
TRACK = {"interaction_id": "i-1", "source": "assistant", "model_version": "m-1", "prompt_version": "p-1"}


def _post(client: TestClient, path: str, body: Any, headers: dict[str, str] = AUTH) -> Any:
    return client.post(path, content=orjson.dumps(body), headers=headers)


def _tracked(settings: Settings) -> list[tuple[int, bytes | None, dict[str, Any]]]:
    serde = AvroSerde("interaction_v1")
    topic = Topics(settings.topic_prefix).interactions
    return [(p, k, serde.decode(v)) for p, k, v in read_partitions(settings, topic) if v is not None]


def test_tracked_over_http_joined_in_the_stream_and_answered_with_stats(isolated: Settings, tmp_path: Path) -> None:
    metrics_port = _free_port()
    settings = isolated.model_copy(
        update={
            "internal_tokens": TOKENS,
            "allow_text": True,
            "rate_limit_per_minute": 1e6,
            "interaction_ttl_s": 3600.0,
            "worker_metrics_port": metrics_port,
            "kafka_session_timeout_s": 6.0,
        }
    )
    ensure_topics(settings)
    now = datetime.now(UTC).replace(microsecond=0)
    tracked_at = now - timedelta(minutes=10)
    with (
        pipeline_process(settings, "worker", tmp_path / "worker.log") as worker,
        pipeline_process(settings, "sink", tmp_path / "sink.log") as sink,
        TestClient(create_gateway(settings)) as gw,
    ):
        procs = [worker, sink]
        body = {
            **TRACK, "ts": tracked_at.isoformat(), "latency_ms": 840, "cost": 0.002,
            "prompt": "hello", "response": "write to bob@example.com",
        }  # fmt: skip
        resp = _post(gw, "/internal/interactions", body)
        assert resp.status_code == 202, resp.text
        assert resp.json() == {"interaction_id": "i-1", "ts": tracked_at.isoformat()}
        assert _post(gw, "/internal/interactions", {**TRACK, "interaction_id": "i-2"}).status_code == 202

        def stored() -> float:
            try:
                return _scrape(metrics_port).get(("feedback_interactions_total", ()), 0.0)
            except OSError:
                return 0.0

        wait_for(lambda: stored() >= 2, 120, "the interactions stored by the worker", procs)
        # Feedback naming it, later, through the gateway and the pipeline: rating 4 is 0.5, thumbs up 1.0.
        feedback = [
            {"source": "dream_ui", "type": "rating", "user_id": "u-1", "interaction_id": "i-1",
             "ts": (now - timedelta(minutes=2)).isoformat(), "payload": {"stars": 4}},
            {"source": "dream_ui", "type": "thumbs", "user_id": "u-2", "interaction_id": "i-1",
             "ts": (now - timedelta(minutes=1)).isoformat(), "payload": {"direction": "up"}},
        ]  # fmt: skip
        assert all(_post(gw, "/internal/feedback", event).status_code == 202 for event in feedback)

        client = connect(settings)
        db = settings.clickhouse_database

        def joined() -> list[tuple[Any, ...]]:
            if not client.command(f"EXISTS TABLE `{db}`.feedback_events"):
                return []
            return client.query(
                f"SELECT user_id, interaction_status, model_version, interaction_latency_ms FROM `{db}`.feedback_events"
                " FINAL WHERE interaction_id = 'i-1' ORDER BY user_id"
            ).result_rows

        wait_for(lambda: len(joined()) == 2, 120, "the feedback in ClickHouse", procs)
        assert [r[1:] for r in joined()] == [("joined", "m-1", 840.0)] * 2

        def lookup(interaction_id: str, gateway: TestClient = gw) -> Any:
            return gateway.get(f"/internal/interactions/{interaction_id}", headers=KEY)

        wait_for(lambda: lookup("i-2").status_code == 200, 60, "the interactions in ClickHouse", procs)
        # The rollup's part may be committed a moment after the events table's (two tables, one insert).
        wait_for(lambda: lookup("i-1").json()["feedback"]["count"] == 2, 30, "the feedback stats", procs)
        answer = lookup("i-1").json()
        assert answer["context"] == {
            "ts": tracked_at.isoformat(), "source": "assistant", "model_version": "m-1", "prompt_version": "p-1",
            "prompt": "hello", "response": "write to [EMAIL]", "latency_ms": 840.0, "cost": 0.002,
        }  # fmt: skip
        assert answer["feedback"] == {
            "count": 2, "mean": 0.75,
            "last": {"ts": (now - timedelta(minutes=1)).isoformat(), "type": "thumbs", "value": 1.0},
        }  # fmt: skip
        assert lookup("i-2").json()["feedback"] == {"count": 0, "mean": None, "last": None}
        unknown = lookup("i-never-tracked")
        assert unknown.status_code == 404 and unknown.json()["error"] == "unknown interaction"
        assert gw.get("/internal/interactions/i-1").status_code == 401
        # A deployment that does not allow text never returns the snapshots, whatever is stored.
        with TestClient(create_gateway(settings.model_copy(update={"allow_text": False}))) as no_text:
            context = lookup("i-1", no_text).json()["context"]
            assert "prompt" not in context and "response" not in context and context["cost"] == 0.002

        # A tombstone on the compacted topic (what `feedback forget` sends) erases the row in ClickHouse.
        topic = Topics(settings.topic_prefix).interactions
        with FeedbackProducer(settings, topic=topic, config=JAVA_PARTITIONER) as tombstones:
            tombstones.send_raw(None, key=b"i-2")  # type: ignore[arg-type]
        wait_for(lambda: lookup("i-2").status_code == 404, 60, "the tombstoned interaction gone", procs)
        # `feedback forget` of a user whose feedback names i-1 erases the interaction.
        result = run_cli(settings, "forget", "--user-id", "u-1", "--yes", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        report = orjson.loads(result.stdout)
        # Deleted by the sink on the tombstone, or by forget itself if the sink was behind: checked either way.
        assert report["erased"]["interaction contexts (tombstoned)"] == 1
        assert report["remaining"]["ClickHouse interactions"] == 0
        assert lookup("i-1").status_code == 404
    # Nothing unredacted went to Kafka; the key is the id, in the partition track() gives it.
    records = _tracked(settings)
    assert not any("bob@example.com" in str(r) for _, _, r in records if r)


def test_same_record_and_partition_as_track(gateway: tuple[TestClient, Settings]) -> None:
    client, settings = gateway
    ids = [f"i-{n}" for n in range(5)]
    ts = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    for i in ids:
        body = {**TRACK, "interaction_id": i, "ts": ts.isoformat(), "prompt": "a", "latency_ms": 12.5}
        assert _post(client, "/internal/interactions", body).status_code == 202
    with FeedbackClient("assistant", settings, model_version="m-1", prompt_version="p-1") as fb:
        for i in ids:
            fb.track(i, ts=ts, prompt="a", latency_ms=12.5)
    messages: dict[bytes, list[tuple[int, dict[str, Any]]]] = {}
    for partition, key, record in _tracked(settings):
        assert key is not None
        messages.setdefault(key, []).append((partition, record))
    assert sorted(messages) == [i.encode() for i in ids]
    for (http_partition, http), (client_partition, tracked) in messages.values():
        # The same bytes' record and the same partition (Kafka's Java partitioner), over HTTP or from Python.
        assert http_partition == client_partition and http == tracked
        assert http["prompt"] is None  # text is not allowed here: the snapshot is never sent
    assert len({p for records in messages.values() for p, _ in records}) > 1  # the ids spread over partitions


def test_auth_type_size_validation_and_rate_limit(gateway: tuple[TestClient, Settings]) -> None:
    client, settings = gateway
    for headers in ({"Content-Type": "application/json"}, {**AUTH, "X-Internal-Token": "wrong"}):
        resp = _post(client, "/internal/interactions", TRACK, headers)
        assert resp.status_code == 401 and resp.json() == {"error": "unauthorized"}
    assert client.get("/internal/interactions/i-1").status_code == 401
    assert (
        client.post("/internal/interactions", content=b"x", headers={**AUTH, "Content-Type": "text/plain"}).status_code
        == 415
    )
    huge = {**TRACK, "prompt": "x" * (settings.gateway_max_body_bytes + 10)}
    assert _post(client, "/internal/interactions", huge).status_code == 413
    bad = {"interaction_id": "", "latency_ms": -1, "ts": "2026-12-01T10:00:00", "user_id": "u-1"}
    resp = _post(client, "/internal/interactions", bad)
    assert resp.status_code == 422
    problems = {p["field"]: p["rule"] for p in resp.json()["problems"]}
    assert set(problems) == {"interaction_id", "source", "latency_ms", "ts", "user_id"}
    assert "timezone" in problems["ts"] and "u-1" not in resp.text  # the values are never echoed
    assert _post(client, "/internal/interactions", [TRACK]).json()["problems"] == [
        {"field": "body", "rule": "must be a JSON object"}
    ]
    too_long = client.get("/internal/interactions/" + "x" * 201, headers=KEY)
    assert too_long.status_code == 422 and too_long.json()["problems"][0]["field"] == "interaction_id"
    assert _tracked(settings) == []  # nothing refused was published
    # 5 a minute per subject (here the peer), as for feedback; GETs count too.
    codes = [_post(client, "/internal/interactions", {**TRACK, "interaction_id": f"r-{n}"}) for n in range(6)]
    assert [r.status_code for r in codes] == [202] * 5 + [429]
    assert int(codes[-1].headers["Retry-After"]) >= 1
    assert client.get("/internal/interactions/r-0", headers=KEY).status_code == 429
    assert len(_tracked(settings)) == 5


def test_lookup_before_any_sink_ran_is_503_naming_the_fix(gateway: tuple[TestClient, Settings]) -> None:
    client, _ = gateway
    resp = client.get("/internal/interactions/i-1", headers=KEY)
    assert resp.status_code == 503 and "feedback sink" in resp.json()["error"]
    assert int(resp.headers["Retry-After"]) >= 1
    spec = client.get("/openapi.json").json()
    assert {"/internal/interactions", "/internal/interactions/{interaction_id}"} <= set(spec["paths"])
    assert "Interaction" in spec["components"]["schemas"]


def test_kafka_unavailable_is_503(isolated: Settings) -> None:
    broken = isolated.model_copy(
        update={"internal_tokens": TOKENS, "bootstrap_servers": "127.0.0.1:1", "gateway_publish_timeout_s": 1.5}
    )
    with TestClient(create_gateway(broken)) as client:
        resp = _post(client, "/internal/interactions", TRACK)
        assert resp.status_code == 503 and int(resp.headers["Retry-After"]) >= 1
