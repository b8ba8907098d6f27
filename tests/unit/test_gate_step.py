"""The composed gate step: order of stages, state in and out, replays."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from schemas import FeedbackEvent
from stream_processors.dedup import keyed_hash
from stream_processors.gate_step import GateConfig, GateResult, SubjectState, gate_step, rejection_record
from stream_processors.ratelimit import RateLimit
from stream_processors.redact import pseudonymize

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
KEY = b"test-key"
CONFIG = GateConfig(pseudonym_key=KEY, hash_key=KEY)


def _record(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"source": "dream_ui", "type": "thumbs", "ts": NOW, "payload": {"direction": "up"}}
    return FeedbackEvent.model_validate({**base, **kw}).to_avro()


class Runner:
    """Feeds events through gate_step keeping the state the agent would keep in its tables."""

    def __init__(self, config: GateConfig = CONFIG) -> None:
        self.config = config
        self.subjects: dict[str, SubjectState] = {}
        self.seen: dict[str, Any] = {}
        self.offset = 0

    def run(self, record: dict[str, Any], *, offset: int | None = None, now: datetime = NOW) -> GateResult:
        if offset is None:
            offset, self.offset = self.offset, self.offset + 1
        from stream_processors.dedup import dedup_key
        from stream_processors.gate_step import subject_of

        key = dedup_key(record, self.config.hash_key)
        result = gate_step(
            record, offset=offset, now=now, config=self.config,
            subject_state=self.subjects.get(subject_of(record)), seen=self.seen.get(key),
        )  # fmt: skip
        if result.subject_state is not None:
            self.subjects[result.subject] = result.subject_state
        if result.seen is not None and result.outcome in ("clean", "sampled_out"):
            self.seen[result.dedup_key] = result.seen
        return result


def test_clean_event_is_normalized_redacted_guarded_and_pseudonymized() -> None:
    record = _record(
        user_id="alice",
        client_ip="203.0.113.9",
        payload={"direction": "down", "comment": "mail me: alice@example.com", "text": "the answer was wrong"},
    )
    result = Runner().run(record)
    assert result.outcome == "clean"
    event = result.event
    assert event is not None
    assert (event["value"], event["confidence"]) == (-1.0, 1.0)
    assert event["payload"]["comment"] == "mail me: [EMAIL]"
    assert event["payload"]["text"] is None and event["text_dropped"] is True
    assert event["user_id"] == pseudonymize("alice", KEY)
    assert event["client_ip"] is None
    assert event["sample_rate"] == 1.0
    # Keyed: equal contents keep equal hashes, but a guess at the raw content cannot be checked.
    assert event["hash"] == keyed_hash(record["hash"], CONFIG.hash_key) != record["hash"]
    assert result.redactions["EMAIL"] == 1


def test_allow_text_keeps_text_and_no_key_keeps_user_id() -> None:
    result = Runner(GateConfig(allow_text=True)).run(_record(user_id="bob", payload={"direction": "up", "text": "t"}))
    assert result.event is not None
    assert result.event["payload"]["text"] == "t" and not result.event["text_dropped"]
    assert result.event["user_id"] == "bob"


def test_invalid_is_rejected_naming_field_and_rule() -> None:
    result = Runner().run(_record(type="rating", payload={"stars": 9}))
    assert (result.outcome, result.reason, result.field) == ("rejected", "invalid", "payload.stars")
    future = Runner().run(_record(ts=NOW + timedelta(minutes=10)))
    assert (future.outcome, future.field) == ("rejected", "ts")


def test_duplicates_within_the_window_are_dropped() -> None:
    runner = Runner()
    first = _record(idempotency_key="k1")
    again = _record(idempotency_key="k1", payload={"direction": "down"})  # same key, other content
    assert runner.run(first).outcome == "clean"
    assert runner.run(again, now=NOW + timedelta(hours=1)).outcome == "duplicate"
    assert runner.run(again, now=NOW + timedelta(hours=25)).outcome == "clean"
    explicit = _record(interaction_id="i-1", user_id="u")
    assert runner.run(explicit).outcome == "clean"
    assert runner.run(_record(interaction_id="i-1", user_id="u", payload={"direction": "down"})).outcome == "duplicate"



def test_a_second_rater_of_the_same_interaction_is_kept() -> None:
    runner = Runner()
    assert runner.run(_record(interaction_id="i-7", user_id="ann")).outcome == "clean"
    assert runner.run(_record(interaction_id="i-7", user_id="bo")).outcome == "clean"  # another person
    assert runner.run(_record(interaction_id="i-7", session_id="s-1")).outcome == "clean"  # a session, no user
    assert runner.run(_record(interaction_id="i-7", session_id="s-2")).outcome == "clean"
    assert runner.run(_record(interaction_id="i-7", user_id="bo", payload={"direction": "down"})).outcome == "duplicate"
    assert runner.run(_record(interaction_id="i-7", session_id="s-1", tags=["x"])).outcome == "duplicate"


def test_burst_from_one_user_is_rate_limited_and_others_are_not() -> None:
    runner = Runner(GateConfig(rate_limit=RateLimit.per_minute(60)))
    outcomes = [runner.run(_record(user_id="burst", tags=[f"e{i}"])).outcome for i in range(70)]
    assert outcomes.count("clean") == 60 and outcomes.count("rejected") == 10
    assert runner.run(_record(user_id="calm")).outcome == "clean"


def test_per_source_override() -> None:
    runner = Runner(GateConfig(source_limits={"mesh": RateLimit(rate_per_s=0.0, burst=2)}))
    outcomes = [runner.run(_record(source="mesh", tags=[f"m{i}"])).outcome for i in range(3)]
    assert outcomes == ["clean", "clean", "rejected"]


def test_replaying_the_same_offsets_changes_nothing_and_decides_the_same() -> None:
    runner = Runner(GateConfig(rate_limit=RateLimit(rate_per_s=0.0, burst=2)))
    records = [_record(user_id="r", event_id=f"r{i}", idempotency_key=f"k{i}") for i in range(4)]
    first = [runner.run(r, offset=i).outcome for i, r in enumerate(records)]
    subjects, seen = dict(runner.subjects), dict(runner.seen)
    replay = [runner.run(r, offset=i).outcome for i, r in enumerate(records)]
    assert first == replay == ["clean", "clean", "rejected", "rejected"]
    assert runner.subjects == subjects and runner.seen == seen


def test_sampling_is_per_type_and_spares_vetoes_and_safety() -> None:
    runner = Runner(GateConfig(sample_rates={"thumbs": 0.0, "veto": 0.0, "safety": 0.0}))
    assert runner.run(_record()).outcome == "sampled_out"
    veto = runner.run(_record(type="veto", payload={"reason_code": "pii_leak"}))
    assert veto.outcome == "clean" and veto.event is not None and veto.event["sample_rate"] == 1.0
    assert runner.run(_record(type="safety")).outcome == "clean"


def test_rejection_record_has_metadata_but_no_payload_or_user() -> None:
    record = _record(user_id="carol", payload={"direction": "up", "comment": "secret words"})
    result = Runner(GateConfig(rate_limit=RateLimit(rate_per_s=0, burst=0))).run(record)
    rejected = rejection_record(record, result, topic="feedback.raw.v1", partition=1, offset=5, now=NOW, hash_key=KEY)
    assert rejected["hash"] == keyed_hash(record["hash"], KEY) != record["hash"]
    assert rejected["reason"] == "rate_limited" and rejected["event_id"] == record["event_id"]
    assert "carol" not in repr(rejected) and "secret" not in repr(rejected)
