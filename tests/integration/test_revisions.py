"""Feedback semantics through the real worker, sink and ClickHouse: a second rater is kept, a
changed vote is a revision naming the event it supersedes, an exact resend is dropped, and
feedback_current holds each opinion's latest revision."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from producers.producer import FeedbackProducer
from schemas import FeedbackEvent
from sinks.clickhouse import connect
from stream_processors.config import pseudonym_key
from stream_processors.redact import pseudonymize
from tests.integration.pipeline_procs import pipeline_process, wait_for

pytestmark = pytest.mark.integration

T = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)


def _vote(user: str, direction: str, at_s: float) -> FeedbackEvent:
    return FeedbackEvent.model_validate({
        "source": "dream_ui", "type": "thumbs", "ts": T + timedelta(seconds=at_s), "user_id": user,
        "interaction_id": "answer-1", "payload": {"direction": direction},
    })  # fmt: skip


def test_a_changed_vote_is_a_revision_and_feedback_current_holds_the_latest(isolated: Settings, tmp_path: Path) -> None:
    settings = isolated
    ensure_topics(settings)
    ann_up, ben_up, ann_down = _vote("ann", "up", 0), _vote("ben", "up", 1), _vote("ann", "down", 2)
    resent = FeedbackEvent.model_validate({**ann_down.model_dump(), "event_id": "ann-down-resent"})
    with FeedbackProducer(settings) as producer:
        for event in (ann_up, ben_up, ann_down, resent):
            producer.send(event)

    client = connect(settings)
    db = settings.clickhouse_database

    def count(sql: str) -> int:
        if not client.command(f"EXISTS TABLE `{db}`.rejected_events"):
            return 0
        return int(client.command(sql.replace("{db}", f"`{db}`")))

    with (
        pipeline_process(settings, "worker", tmp_path / "worker.log") as worker,
        pipeline_process(settings, "sink", tmp_path / "sink.log") as sink,
    ):
        wait_for(
            lambda: count("SELECT count() FROM {db}.feedback_events FINAL") >= 3
            and count("SELECT count() FROM {db}.rejected_events FINAL") >= 1,
            150, "three events and one refusal in ClickHouse", [worker, sink],
        )  # fmt: skip
        events = {
            r["event_id"]: r
            for r in client.query(
                f"SELECT event_id, user_id, value, supersedes FROM `{db}`.feedback_events FINAL"
            ).named_results()
        }
        current = list(
            client.query(
                f"SELECT event_id, rater, opinion_key, value, supersedes FROM `{db}`.feedback_current FINAL"
                " ORDER BY event_id"
            ).named_results()
        )
        refused = client.query(f"SELECT event_id, reason FROM `{db}`.rejected_events FINAL").result_rows

    assert set(events) == {ann_up.event_id, ben_up.event_id, ann_down.event_id}  # the resend is not among them
    assert events[ann_down.event_id]["supersedes"] == ann_up.event_id
    assert events[ann_up.event_id]["supersedes"] is None and events[ben_up.event_id]["supersedes"] is None
    assert refused == [(resent.event_id, "duplicate")]

    key = pseudonym_key(settings)
    assert key is not None
    ann, ben = pseudonymize("ann", key), pseudonymize("ben", key)
    by_rater: dict[str, dict[str, Any]] = {r["rater"]: r for r in current}
    assert len(current) == 2 and set(by_rater) == {ann, ben}  # one row per opinion; never a user id in clear
    assert by_rater[ann]["event_id"] == ann_down.event_id and by_rater[ann]["value"] == -1.0  # the latest: down
    assert by_rater[ann]["supersedes"] == ann_up.event_id
    assert by_rater[ben]["event_id"] == ben_up.event_id and by_rater[ben]["value"] == 1.0
    assert by_rater[ann]["opinion_key"] == f"answer-1|{ann}|thumbs"
