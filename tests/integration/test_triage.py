"""The triage queue on the real broker and ClickHouse: the worker enqueues what needs a human;
`feedback triage`, `label` and `resolve` work the queue; the sink mirrors it to ClickHouse and
the JSONL queue file; a noise label lowers the source's reputation."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from producers.client import FeedbackClient
from producers.subscriber import read_reputation
from schemas.topics import Topics
from schemas.triage_records import decode_commands
from sinks.clickhouse import connect
from sinks.state_sinks import TRIAGE_QUEUE_FILE
from tests.integration.kafka_read import read_topic
from tests.integration.pipeline_procs import pipeline_process, run_cli, wait_for

pytestmark = pytest.mark.integration


_cli = run_cli


def _queue(settings: Settings, *args: str) -> list[dict[str, Any]]:
    done = _cli(settings, "triage", "--json", *args)
    assert done.returncode == 0, done.stderr
    return list(orjson.loads(done.stdout))


def test_triage_queue_from_events_to_labels_reputation_and_the_mirrors(isolated: Settings, tmp_path: Path) -> None:
    settings = isolated.model_copy(update={"rate_limit_per_minute": 1e6, "kafka_session_timeout_s": 6.0})
    ensure_topics(settings)
    t0 = datetime.now(UTC) - timedelta(minutes=5)
    with (
        pipeline_process(settings, "worker", tmp_path / "worker.log") as worker,
        pipeline_process(settings, "sink", tmp_path / "sink.log") as sink,
    ):
        procs = [worker, sink]
        with FeedbackClient("oracle", settings) as fb:
            sends = [
                lambda: fb.bad_output(severity="error", user_id="u-1", ts=t0),
                lambda: fb.thumbs(up=True, user_id="u-2", ts=t0),  # nothing for a human
                lambda: fb.latency(9000, severity="warn", user_id="u-3", ts=t0),
                lambda: fb.veto("unsafe_advice", user_id="u-4", ts=t0),
            ]
            sent = []
            for send in sends:  # one after another: the queue's order is the order of arrival
                sent.append(send())
                fb.flush()
                time.sleep(0.01)
        wait_for(lambda: len(_queue(settings)) >= 3, 120, "three items in the triage queue", procs)
        pending = _queue(settings)
        assert [i["event_id"] for i in pending] == [sent[0].event_id, sent[2].event_id, sent[3].event_id]
        assert [i["reason"] for i in pending] == ["type bad_output", "severity warn", "type veto"]
        assert all(i["status"] == "open" and i["version"] == 1 for i in pending)
        before = read_reputation(settings)["oracle"]

        labeled = _cli(
            settings, "label", sent[0].event_id, "noise", "--note", "bot, mail bot@example.com", "--by", "ana"
        )
        assert labeled.returncode == 0 and "labeled" in labeled.stderr, labeled.stderr
        resolved = _cli(settings, "resolve", sent[3].event_id, "--by", "ana")
        assert resolved.returncode == 0 and "resolved" in resolved.stderr, resolved.stderr
        unknown = _cli(settings, "label", "no-such-item", "bug")
        assert unknown.returncode == 2 and "no triage item" in unknown.stderr

        items = {i["triage_id"]: i for i in _queue(settings, "--show", "all")}
        assert items[sent[0].event_id]["status"] == "labeled" and items[sent[0].event_id]["label"] == "noise"
        assert items[sent[0].event_id]["note"] == "bot, mail [EMAIL]"
        assert [h["op"] for h in items[sent[0].event_id]["history"]] == ["enqueue", "label"]
        assert items[sent[3].event_id]["status"] == "resolved"
        assert [i["triage_id"] for i in _queue(settings)] == [sent[0].event_id, sent[2].event_id]

        # The noise label counted against the source, once.
        wait_for(
            lambda: read_reputation(settings)["oracle"].observations == before.observations + 1,
            60, "the noise label in reputation", procs,
        )  # fmt: skip
        after = read_reputation(settings)["oracle"]
        assert after.score < before.score

        # Mirrors: ClickHouse holds each item's latest state; the queue file the unresolved ones.
        client = connect(settings)
        db = settings.clickhouse_database

        def mirrored() -> dict[str, tuple[Any, ...]]:
            if not client.command(f"EXISTS TABLE `{db}`.triage"):
                return {}
            rows = client.query(f"SELECT triage_id, status, label, version, reason FROM `{db}`.triage FINAL")
            return {r[0]: r[1:] for r in rows.result_rows}

        wait_for(lambda: mirrored().get(sent[3].event_id, ("",))[0] == "resolved", 60, "triage in ClickHouse", procs)
        wait_for(lambda: mirrored().get(sent[0].event_id, ("",))[0] == "labeled", 60, "the label in ClickHouse", procs)
        assert mirrored()[sent[2].event_id] == ("open", "", 1, "severity warn")
        queue_file = Path(settings.path) / TRIAGE_QUEUE_FILE
        wait_for(lambda: queue_file.exists() and len(queue_file.read_bytes().splitlines()) == 2, 30, "the queue file")
        lines = [orjson.loads(line) for line in queue_file.read_bytes().splitlines()]
        assert [(i["triage_id"], i["status"]) for i in lines] == [
            (sent[0].event_id, "labeled"),
            (sent[2].event_id, "open"),
        ]

    # The audit log: every change is a command in Kafka, in order per item.
    commands = [  # the worker's enqueues go as one JSON list per partition and batch
        c for _, v in read_topic(settings, Topics(settings.topic_prefix).triage_commands) for c in decode_commands(v)
    ]
    ops = [(c.op, c.by) for c in commands if c.triage_id == sent[0].event_id]
    assert ops == [("enqueue", ""), ("label", "ana")]
    assert b"bot@example.com" not in b"".join(queue_file.read_bytes().splitlines())
