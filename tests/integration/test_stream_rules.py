"""The gate and the state agents on the real broker and ClickHouse: a crafted stream lands
exactly as the rules say, and a worker killed with SIGKILL ends where an unkilled one does."""

from __future__ import annotations

import shutil
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from producers.producer import FeedbackProducer
from producers.synthetic import generate_events
from schemas import FeedbackEvent
from schemas.serde import AvroSerde
from schemas.state_records import decode_bias, decode_reputation
from schemas.topics import Topics
from sinks.clickhouse import connect
from stream_processors.config import pseudonym_key
from stream_processors.redact import pseudonymize
from stream_processors.reputation import ReputationPolicy, reputation_step
from tests.conftest import _free_port
from tests.integration.kafka_read import latest_by_key, read_topic
from tests.integration.pipeline_procs import pipeline_process, wait_for

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)
T = NOW - timedelta(hours=1)
ARRIVAL_MS = int(NOW.timestamp() * 1000)  # every message "arrives" at once: no bucket refill
HALF_LIFE = 3600.0
STEP = 0.2


def _e(at_s: float, **kw: Any) -> FeedbackEvent:
    base: dict[str, Any] = {"source": "dream_ui", "type": "thumbs", "ts": T + timedelta(seconds=at_s), "payload": {}}
    return FeedbackEvent.model_validate({**base, **kw})


def _crafted() -> tuple[list[FeedbackEvent], dict[str, str]]:
    """The stream, and what the gate must decide for each event id (clean | duplicate | ...)."""
    events: list[tuple[FeedbackEvent, str]] = []
    add = events.append
    pii = "reach me at alice@example.com or +44 20 7946 0958; v2.3.1 on 2026-11-20 cost $12.50"
    alice = _e(0, user_id="alice", interaction_id="i-1", payload={"direction": "down", "comment": pii, "text": "T"})
    add((alice, "clean"))
    # The same content again under another event id: an exact resend (a changed vote would be kept).
    add((FeedbackEvent.model_validate({**alice.model_dump(), "event_id": "alice-resent"}), "duplicate"))
    carol = _e(2, user_id="carol", type="rating", idempotency_key="r-1", payload={"stars": 4})
    add((carol, "clean"))
    add((carol, "duplicate"))  # the same event sent twice
    for i in range(10):
        add(
            (
                _e(3, user_id="bob", idempotency_key=f"b-{i}", payload={"direction": "up"}),
                "clean" if i < 5 else "rate_limited",
            )
        )
    dave = _e(4, user_id="dave", type="correction", payload={
        "comment": "card 4111 1111 1111 1111 please", "corrected_response": "Canberra"})  # fmt: skip
    add((dave, "clean"))
    add((_e(10, source="guardian", type="veto", severity="critical", interaction_id="v-1"), "clean"))
    add((_e(20, source="guardian", type="veto", severity="critical", interaction_id="v-2"), "clean"))
    add((_e(0, source="oracle", type="bad_output", severity="error", user_id="u1"), "clean"))
    add((_e(600, source="oracle", type="bad_output", severity="warn", user_id="u2"), "clean"))
    add((_e(30, source="oracle", type="latency", severity="warn", user_id="u3"), "clean"))
    add((_e(30, source="oracle", type="safety", severity="critical", user_id="u4"), "clean"))
    add((_e(45, user_id="sam", session_id="sess-1", type="rating", payload={"stars": 2}), "clean"))  # session-level
    for i in range(3):
        add((_e(40 + i, user_id=f"reader-{i}", type="implicit", payload={"signal": "copy"}), "sampled_out"))
    future = FeedbackEvent.model_validate({**_e(0, user_id="erin").model_dump(), "ts": NOW + timedelta(minutes=10)})
    add((future, "invalid"))
    return [e for e, _ in events], {e.event_id + f"#{n}": d for n, (e, d) in enumerate(events)}


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def test_crafted_stream_lands_exactly_as_the_rules_say(isolated: Settings, tmp_path: Path) -> None:
    metrics_port = _free_port()
    settings = isolated.model_copy(
        update={
            "topic_partitions": 1,  # one order for the EWMA, so the expected reputation is exact
            "rate_limit_per_minute": 5.0,
            "sample_rates": {"implicit": 0.0, "veto": 0.0},
            "bias_step": STEP,
            "bias_half_life_s": HALF_LIFE,
            "bias_publish_interval_s": 0.2,
            "worker_metrics_port": metrics_port,
            "kafka_session_timeout_s": 6.0,
        }
    )
    ensure_topics(settings)
    events, decisions = _crafted()
    with FeedbackProducer(settings) as producer:
        for event in events:
            producer.send(event, timestamp_ms=ARRIVAL_MS)
    expected = Counter(decisions.values())
    clean_ids = {k.split("#")[0] for k, d in decisions.items() if d == "clean"}
    topics = Topics(settings.topic_prefix)

    with (
        pipeline_process(settings, "worker", tmp_path / "worker.log") as worker,
        pipeline_process(settings, "sink", tmp_path / "sink.log") as sink,
    ):
        procs = [worker, sink]
        client = connect(settings)
        db = settings.clickhouse_database

        def landed() -> int:
            if not client.command(f"EXISTS TABLE `{db}`.feedback_events"):
                return 0
            return int(client.command(f"SELECT count() FROM `{db}`.feedback_events FINAL"))

        wait_for(lambda: landed() >= len(clean_ids), 120, "the clean events in ClickHouse", procs)

        def state_done() -> bool:
            rep = latest_by_key(settings, topics.reputation)
            return (
                sum(decode_reputation(v).observations for v in rep.values()) == len(events)
                and len(latest_by_key(settings, topics.directive_bias)) == 3
            )

        wait_for(state_done, 60, "reputation and bias published", procs)
        refused = len(events) - len(clean_ids) - expected["sampled_out"]

        def rejected_rows() -> dict[str, int]:
            if not client.command(f"EXISTS TABLE `{db}`.rejected_events"):
                return {}
            q = f"SELECT reason, count() FROM `{db}`.rejected_events FINAL GROUP BY reason"
            return {reason: int(n) for reason, n in client.query(q).result_rows}

        wait_for(lambda: sum(rejected_rows().values()) >= refused, 60, "rejections in ClickHouse", procs)
        assert rejected_rows() == {r: expected[r] for r in ("duplicate", "rate_limited", "invalid")}
        time.sleep(1.0)  # let the throttled publisher emit the final bias values
        metrics = _scrape(metrics_port)

        rows = client.query(
            f"SELECT event_id, user_id, type, payload_comment, payload_text, corrected_response, text_dropped,"
            f" sample_rate, value, propagation_weight FROM `{db}`.feedback_events FINAL"
        ).named_results()
        rows = list(rows)
    assert {r["event_id"] for r in rows} == clean_ids
    assert landed() == len(clean_ids)
    key = pseudonym_key(settings)
    assert key is not None
    by_id = {r["event_id"]: r for r in rows}
    a = by_id[events[0].event_id]
    assert a["payload_comment"] == "reach me at [EMAIL] or [PHONE]; v2.3.1 on 2026-11-20 cost $12.50"
    assert a["payload_text"] is None and a["text_dropped"] == 1
    assert a["user_id"] == pseudonymize("alice", key) and a["value"] == -1.0
    d = next(r for r in rows if r["type"] == "correction")
    assert d["payload_comment"] == "card [CARD] please" and d["corrected_response"] == "Canberra"
    assert all(r["sample_rate"] == 1.0 for r in rows)
    session = next(r for r in rows if r["type"] == "rating" and r["propagation_weight"] != 1.0)
    assert session["propagation_weight"] == 0.5 and session["value"] == -0.5
    assert sum(1 for r in rows if r["propagation_weight"] == 1.0) == len(rows) - 1
    assert not any(r["user_id"] in ("alice", "bob", "carol", "dave") for r in rows)

    rejected = [AvroSerde("rejected_v1").decode(v) for _, v in read_topic(settings, topics.rejected)]
    assert Counter(r["reason"] for r in rejected) == {
        "duplicate": expected["duplicate"], "rate_limited": expected["rate_limited"], "invalid": expected["invalid"],
    }  # fmt: skip
    assert next(r for r in rejected if r["reason"] == "invalid")["field"] == "ts"

    # Directive bias: exact decayed values from event time.
    bias = {k: decode_bias(v) for k, v in latest_by_key(settings, topics.directive_bias).items()}
    assert bias["increase_grounding"].value == pytest.approx(STEP * 1.0 * 0.5 ** (600 / HALF_LIFE) + STEP * 0.75)
    assert bias["increase_grounding"].updated_s == pytest.approx((T + timedelta(seconds=600)).timestamp())
    assert bias["reduce_novelty"].value == pytest.approx(STEP * 0.75)
    s = STEP * 1.5
    assert bias["boost_safety"].value == pytest.approx(s * 0.5 ** (20 / HALF_LIFE) + s * 0.5 ** (10 / HALF_LIFE) + s)
    assert bias["boost_safety"].events == 3

    # Reputation: the EWMA over each source's outcomes, in stream order.
    policy = ReputationPolicy()
    outcome_of = {"clean": "accepted", "sampled_out": "accepted"}
    want: dict[str, Any] = {}
    for event, decision in zip(events, decisions.values(), strict=True):
        want[event.source] = reputation_step(want.get(event.source), outcome_of.get(decision, decision), policy)
    rep = {k: decode_reputation(v) for k, v in latest_by_key(settings, topics.reputation).items()}
    assert set(rep) == {"dream_ui", "guardian", "oracle"}
    for source, state in want.items():
        assert rep[source].observations == state.observations
        assert rep[source].score == pytest.approx(state.score, abs=1e-9)
    assert rep["dream_ui"].score < 1.0 and rep["guardian"].score == 1.0

    def m(name: str, **labels: str) -> float:
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    assert m("feedback_total", source="dream_ui", type="thumbs") == 6
    assert m("feedback_veto_total") == 2
    assert m("feedback_rate_limited_total") == 5
    assert m("feedback_duplicates_total") == 2
    assert m("feedback_rejected_total", reason="invalid") == 1
    assert m("feedback_sampled_out_total", type="implicit") == 3
    assert (m("feedback_redactions_total", kind="EMAIL"), m("feedback_redactions_total", kind="PHONE")) == (1, 1)
    assert m("feedback_redactions_total", kind="CARD") == 1
    assert ("feedback_consumer_lag", (("partition", "0"), ("topic", topics.raw))) in metrics


# --- crash recovery ----------------------------------------------------------------
N_CRASH = 20_000


def _crash_stream() -> list[FeedbackEvent]:
    events = list(generate_events(N_CRASH, seed=5, now=NOW))
    # 40 users, ~500 events each against a 60/min bucket: most of each user's events are limited.
    events = [e.model_copy(update={"user_id": f"user-{i % 40}"}) for i, e in enumerate(events)]
    return events + events[:500]  # and 500 duplicates at the end


def _run_to_completion(settings: Settings, tmp_path: Path, events: list[FeedbackEvent], kills: int) -> dict[str, Any]:
    """Produce ``events``, run the worker (killing it ``kills`` times mid-stream), return the final state."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    ensure_topics(settings)
    with FeedbackProducer(settings) as producer:
        for event in events:
            producer.send(event, timestamp_ms=ARRIVAL_MS)
    topics = Topics(settings.topic_prefix)
    datadir = settings.state_dir / "worker" / f"{settings.topic_prefix}{settings.worker_id}"
    observed = 0

    def observations() -> int:
        return sum(decode_reputation(v).observations for v in latest_by_key(settings, topics.reputation).values())

    def outcomes() -> int:  # outcome records: the gate sends a JSON list per source and batch
        return sum(len(items) if isinstance(items := orjson.loads(v), list) else 1
                   for _, v in read_topic(settings, topics.outcomes) if v is not None)  # fmt: skip

    for attempt in range(kills + 1):
        with pipeline_process(settings, "worker", tmp_path / f"worker-{attempt}.log") as worker:
            if attempt < kills:
                threshold = len(events) * (attempt + 1) // (kills + 2)
                wait_for(lambda t=threshold: outcomes() >= t, 180, f"{threshold} outcomes", [worker])
                worker.kill()  # SIGKILL: no commit, no flush, no goodbye
                worker.wait(10)
                observed = observations()
                assert observed < len(events), "the kill came after the stream was done: the test proves nothing"
                if attempt == kills - 1:
                    shutil.rmtree(datadir)  # last restart from the changelogs alone, as on a new machine
                continue
            wait_for(lambda: observations() == len(events), 240, "every event observed", [worker])
            clean_ids = {AvroSerde().decode(v)["event_id"] for _, v in read_topic(settings, topics.clean)}
            directive_types = {"bad_output", "latency", "safety", "veto"}
            by_id = {e.event_id: e for e in events}
            increments = sum(1 for i in clean_ids if by_id[i].type in directive_types)

            def bias_events() -> int:
                return sum(decode_bias(v).events for v in latest_by_key(settings, topics.directive_bias).values())

            wait_for(lambda n=increments: bias_events() == n, 60, f"{increments} bias increments", [worker])
            time.sleep(1.0)
            return {
                "clean": clean_ids,
                "rejected": Counter(
                    AvroSerde("rejected_v1").decode(v)["reason"] for _, v in read_topic(settings, topics.rejected)
                ),
                "reputation": {k: decode_reputation(v) for k, v in latest_by_key(settings, topics.reputation).items()},
                "bias": {k: decode_bias(v) for k, v in latest_by_key(settings, topics.directive_bias).items()},
                "subjects": latest_by_key(
                    settings, f"{settings.topic_prefix}{settings.worker_id}-gate-subjects-changelog"
                ),
                "seen": len(
                    latest_by_key(settings, f"{settings.topic_prefix}{settings.worker_id}-gate-seen-changelog")
                ),
            }
    raise AssertionError("unreachable")


def test_worker_killed_with_sigkill_ends_in_the_same_state(isolated: Settings, tmp_path: Path) -> None:
    events = _crash_stream()
    common = {
        "topic_partitions": 1,
        "kafka_session_timeout_s": 6.0,
        "bias_publish_interval_s": 0.2,
        "worker_metrics_port": 0,
    }
    calm = _run_to_completion(
        isolated.model_copy(update={**common, "topic_prefix": isolated.topic_prefix + "calm."}),
        tmp_path / "calm",
        events,
        kills=0,
    )
    crashed = _run_to_completion(
        isolated.model_copy(update={**common, "topic_prefix": isolated.topic_prefix + "kill."}),
        tmp_path / "kill",
        events,
        kills=2,
    )

    # Rejections may repeat after a replay (the sink collapses them by coordinates); decisions may not change.
    assert set(crashed["rejected"]) == set(calm["rejected"])
    assert crashed["clean"] == calm["clean"]
    assert calm["rejected"]["rate_limited"] > 1000 and calm["rejected"]["duplicate"] == 500
    assert crashed["reputation"] == calm["reputation"]
    assert crashed["bias"] == calm["bias"]
    assert crashed["subjects"] == calm["subjects"] and len(calm["subjects"]) == 40
    assert crashed["seen"] == calm["seen"]
