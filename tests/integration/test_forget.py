"""`feedback forget` on the real broker, ClickHouse and files: a user's events, triage items,
interaction contexts and rate-limit entry are gone from every store (checked by query, by
scanning every file, and by folding the compacted topics); another user's are untouched."""

from __future__ import annotations

import gzip
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from producers.client import FeedbackClient
from schemas.topics import Topics
from sinks.clickhouse import connect
from sinks.state_sinks import TRIAGE_QUEUE_FILE
from stream_processors.config import pseudonym_key
from stream_processors.redact import pseudonymize
from tests.integration.kafka_read import latest_by_key
from tests.integration.pipeline_procs import pipeline_process, run_cli, wait_for

pytestmark = pytest.mark.integration

SECRET = "alice-private-question-7781"  # the interaction's prompt: text that must vanish with her


def _sent(fb: FeedbackClient, user: str, t0: datetime) -> tuple[list[str], str]:
    """Five events (two that need a human, two about one tracked interaction); their ids and the interaction's."""
    interaction = f"{user}-chat-1"
    fb.track(interaction, ts=t0, model_version="m-1", prompt=f"{SECRET if user == 'alice' else 'hi'}", response="ok")
    fb.flush()
    time.sleep(0.5)  # the context is stored before its feedback arrives
    events = [
        fb.veto("unsafe_advice", user_id=user, ts=t0),
        fb.bad_output(severity="error", user_id=user, interaction_id=interaction, ts=t0),
        fb.thumbs(up=False, user_id=user, interaction_id=interaction, ts=t0 + timedelta(seconds=1)),
        fb.rating(4, user_id=user, ts=t0 + timedelta(seconds=2)),
        fb.thumbs(up=True, user_id=user, ts=t0 - timedelta(days=2)),  # another day's file
    ]
    fb.flush()
    return [e.event_id for e in events], interaction


def _count(client: object, sql: str, values: list[str]) -> int:
    return int(client.command(sql, parameters={"v": values}))  # type: ignore[attr-defined]


def _file_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root``, gzip members decompressed."""
    out = {}
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            out[str(path.relative_to(root))] = gzip.decompress(data) if path.suffix == ".gz" else data
    return out


def test_forget_erases_a_user_from_every_store_and_keeps_the_others(isolated: Settings, tmp_path: Path) -> None:
    settings = isolated.model_copy(
        update={"rate_limit_per_minute": 1e6, "kafka_session_timeout_s": 6.0, "allow_text": True}
    )
    ensure_topics(settings)
    topics = Topics(settings.topic_prefix)
    key = pseudonym_key(settings)
    assert key is not None
    alice, bob = pseudonymize("alice", key), pseudonymize("bob", key)
    db = f"`{settings.clickhouse_database}`"
    t0 = datetime.now(UTC) - timedelta(minutes=5)

    with (
        pipeline_process(settings, "worker", tmp_path / "worker.log") as worker,
        pipeline_process(settings, "sink", tmp_path / "sink.log") as sink,
    ):
        procs = [worker, sink]
        with FeedbackClient("assistant", settings) as fb:
            alice_ids, alice_chat = _sent(fb, "alice", t0)
            bob_ids, bob_chat = _sent(fb, "bob", t0)
        client = connect(settings)
        queue = Path(settings.path) / TRIAGE_QUEUE_FILE

        def landed() -> bool:
            try:
                rows = _count(client, f"SELECT count() FROM {db}.feedback_events WHERE user_id IN {{v:Array(String)}}",
                              [alice, bob])  # fmt: skip
                triaged = _count(client, f"SELECT count() FROM {db}.triage WHERE triage_id IN {{v:Array(String)}}",
                                 alice_ids + bob_ids)  # fmt: skip
            except Exception:
                return False
            files = b"".join(_file_bytes(Path(settings.path)).values()) if Path(settings.path).exists() else b""
            # The queue file is rewritten just after its batch reached ClickHouse: wait for the item itself.
            queued = queue.exists() and alice_ids[0].encode() in queue.read_bytes()
            return rows == 10 and triaged >= 4 and files.count(alice.encode()) >= 5 and queued

        wait_for(landed, 150, "both users' events in ClickHouse, the files and the triage queue", procs)
        before = _file_bytes(Path(settings.path))
        assert any(SECRET.encode() in data for data in before.values())  # the joined prompt is stored
        assert alice_ids[0].encode() in queue.read_bytes()

        done = run_cli(settings, "forget", "--user-id", "alice", "--yes", "--json", "--wait", "120")
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr and "alice" not in done.stderr  # the id is never echoed
        result = orjson.loads(done.stdout)
        assert result["complete"] and not result["pending"]
        assert result["erased"]["ClickHouse feedback_events rows"] == 5
        assert result["erased"]["JSONL lines"] == 5
        assert result["erased"]["triage items (erase commands)"] == 2
        assert result["erased"]["interaction contexts (tombstoned)"] == 1
        assert not any(result["remaining"].values())
        assert result["ageing_days"][topics.raw] == 1

        # By query: nothing of alice in ClickHouse; bob untouched.
        def rows(table: str, column: str, values: list[str]) -> int:
            return _count(client, f"SELECT count() FROM {db}.{table} WHERE {column} IN {{v:Array(String)}}", values)

        assert rows("feedback_events", "user_id", [alice, "alice"]) == 0
        assert rows("feedback_events", "event_id", alice_ids) == 0
        assert rows("triage", "triage_id", alice_ids) == 0
        assert rows("interaction_stats", "interaction_id", [alice_chat]) == 0
        assert rows("feedback_current", "user_id", [alice, "alice"]) == 0  # her opinions too
        assert rows("feedback_events", "user_id", [bob]) == 5
        assert rows("triage", "triage_id", bob_ids) >= 2
        assert rows("interaction_stats", "interaction_id", [bob_chat]) >= 1
        assert rows("feedback_current", "user_id", [bob]) >= 1

        # By scanning every file (day files, compressed or not, the triage queue, the ledger, receipts).
        wait_for(lambda: alice_ids[0].encode() not in queue.read_bytes(), 30, "the queue file rewritten", procs)
        after = _file_bytes(Path(settings.path))
        traces = [alice.encode(), b"alice", SECRET.encode(), alice_chat.encode(), *(i.encode() for i in alice_ids)]
        found = {name: [t for t in traces if t in data] for name, data in after.items()}
        assert not any(found.values()), found
        assert sum(data.count(bob.encode()) for data in after.values()) == 5
        assert bob_ids[0].encode() in queue.read_bytes()

        # The compacted topics, folded to their latest value per key: alice's keys are tombstoned.
        app = f"{settings.topic_prefix}{settings.worker_id}"

        def changelog(table: str) -> set[str]:  # the worker's tables: JSON keys
            return {orjson.loads(k) for k in latest_by_key(settings, f"{app}-{table}-changelog")}

        subjects = changelog("gate-subjects")
        assert alice not in subjects and "alice" not in subjects and bob in subjects
        assert alice_chat not in changelog("interactions") and bob_chat in changelog("interactions")
        assert not set(alice_ids) & changelog("triage") and bob_ids[0] in changelog("triage")
        assert alice_chat not in latest_by_key(settings, topics.interactions)
        assert bob_chat in latest_by_key(settings, topics.interactions)
        assert not set(alice_ids) & set(latest_by_key(settings, topics.triage))
        assert bob_ids[0] in latest_by_key(settings, topics.triage)

        # Again: harmless, nothing left to erase.
        again = run_cli(settings, "forget", "--user-id", "alice", "--yes", "--json", "--wait", "60")
        assert again.returncode == 0, again.stderr
        assert orjson.loads(again.stdout)["erased"]["ClickHouse feedback_events rows"] == 0

        # By pseudonym (e.g. copied from a ClickHouse row): bob goes too.
        by_pseudonym = run_cli(settings, "forget", "--pseudonym", bob, "--yes", "--json", "--wait", "120")
        assert by_pseudonym.returncode == 0, by_pseudonym.stderr
        assert orjson.loads(by_pseudonym.stdout)["erased"]["ClickHouse feedback_events rows"] == 5
        assert rows("feedback_events", "user_id", [bob]) == 0
        assert bob not in changelog("gate-subjects")
        client.close()
