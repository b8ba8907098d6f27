"""The composed gate step: order of stages, state in and out, replays."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from schemas import FeedbackEvent
from stream_processors.dedup import keyed_hash
from stream_processors.gate_step import (
    GateConfig,
    GateResult,
    OpinionEntry,
    SubjectState,
    gate_step,
    opinion_from_json,
    opinion_to_json,
    rejection_record,
)
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
        self.opinions: dict[str, OpinionEntry] = {}
        self.offset = 0

    def run(self, record: dict[str, Any], *, offset: int | None = None, now: datetime = NOW) -> GateResult:
        if offset is None:
            offset, self.offset = self.offset, self.offset + 1
        from stream_processors.dedup import dedup_key, opinion_key
        from stream_processors.gate_step import subject_of

        key, okey = dedup_key(record, self.config.hash_key), opinion_key(record, self.config.hash_key) or ""
        result = gate_step(
            record, offset=offset, now=now, config=self.config,
            subject_state=self.subjects.get(subject_of(record)), seen=self.seen.get(key),
            opinion=self.opinions.get(okey), opinion_key=okey,
        )  # fmt: skip
        if result.subject_state is not None:
            self.subjects[result.subject] = result.subject_state
        if result.seen is not None and result.outcome in ("clean", "sampled_out"):
            self.seen[result.dedup_key] = result.seen
        if result.opinion is not None:
            self.opinions[result.opinion_key] = result.opinion
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
    content = _record(type="bad_output", payload={})
    assert runner.run(content).outcome == "clean"
    resent = {**content, "event_id": "another-id"}  # the same content (and ts) under a new id
    assert runner.run(resent).outcome == "duplicate"



def test_a_second_rater_of_the_same_interaction_is_kept() -> None:
    runner = Runner()
    assert runner.run(_record(interaction_id="i-7", user_id="ann")).outcome == "clean"
    assert runner.run(_record(interaction_id="i-7", user_id="bo")).outcome == "clean"  # another person
    assert runner.run(_record(interaction_id="i-7", session_id="s-1")).outcome == "clean"  # a session, no user
    assert runner.run(_record(interaction_id="i-7", session_id="s-2")).outcome == "clean"
    assert all(runner.opinions[k].decisions[0][1:] == ("", "") for k in runner.opinions)  # nobody revised
    assert len(runner.opinions) == 4


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


def _extra(result: GateResult) -> dict[str, Any]:
    assert result.outcome == "clean" and result.event is not None, result
    return dict(result.event["payload"]["extra"])


def test_a_changed_vote_is_a_revision_naming_the_event_it_supersedes() -> None:
    runner = Runner()
    up = _record(interaction_id="i-2", user_id="ann", ts=NOW - timedelta(minutes=2))
    down = _record(interaction_id="i-2", user_id="ann", ts=NOW - timedelta(minutes=1), payload={"direction": "down"})
    again = _record(interaction_id="i-2", user_id="ann", payload={"direction": "up"})
    assert "supersedes" not in _extra(runner.run(up))
    assert _extra(runner.run(down))["supersedes"] == up["event_id"]
    assert _extra(runner.run(again))["supersedes"] == down["event_id"]  # the latest, not the first
    (entry,) = runner.opinions.values()
    assert (entry.event_id, entry.ts_us) == (again["event_id"], int(NOW.timestamp()) * 1_000_000)
    # Another type from the same rater on the same interaction is another opinion.
    rating = _record(type="rating", interaction_id="i-2", user_id="ann", payload={"stars": 2})
    assert "supersedes" not in _extra(runner.run(rating)) and len(runner.opinions) == 2


def test_exact_resends_of_a_revision_are_still_dropped() -> None:
    runner = Runner()
    vote = _record(interaction_id="i-3", user_id="ann", idempotency_key="vote-1")
    assert runner.run(vote).outcome == "clean"
    retried = _record(interaction_id="i-3", user_id="ann", idempotency_key="vote-1", payload={"direction": "down"})
    assert runner.run(retried).outcome == "duplicate"  # the same idempotency key: a resend, whatever it says
    plain = _record(interaction_id="i-4", user_id="ann")
    assert runner.run(plain).outcome == "clean"
    assert runner.run({**plain, "event_id": "new-id"}).outcome == "duplicate"  # the same content and ts
    (entry,) = [e for e in runner.opinions.values() if e.event_id == plain["event_id"]]
    assert len(entry.decisions) == 1  # the resend never reached the opinion


def test_an_older_revision_arriving_late_is_kept_but_never_current() -> None:
    runner = Runner()
    t1, t2, t3 = (_record(interaction_id="i-5", user_id="ann", ts=NOW - timedelta(minutes=m), tags=[str(m)])
                  for m in (3, 2, 1))  # fmt: skip
    assert "supersedes" not in _extra(runner.run(t2))
    late = _extra(runner.run(t1))  # older than the latest: history only
    assert "supersedes" not in late and late["superseded_by"] == t2["event_id"]
    assert _extra(runner.run(t3))["supersedes"] == t2["event_id"]  # the late one was never current
    # Equal times: the larger event id is the later revision, whichever arrives first.
    a = _record(interaction_id="i-6", user_id="ann", event_id="b-second", tags=["a"])
    b = _record(interaction_id="i-6", user_id="ann", event_id="a-first", tags=["b"])
    assert "supersedes" not in _extra(runner.run(a))
    assert _extra(runner.run(b))["superseded_by"] == "b-second"


def test_a_replayed_revision_repeats_its_decision_and_changes_nothing() -> None:
    runner = Runner()
    first = _record(interaction_id="i-8", user_id="ann", ts=NOW - timedelta(minutes=1))
    second = _record(interaction_id="i-8", user_id="ann", payload={"direction": "down"})
    once = [_extra(runner.run(r, offset=o)) for o, r in ((10, first), (11, second))]
    state = dict(runner.opinions)
    replayed = [runner.run(r, offset=o) for o, r in ((10, first), (11, second))]  # after a crash
    assert [_extra(r) for r in replayed] == once and once[1]["supersedes"] == first["event_id"]
    assert all(r.opinion is None for r in replayed) and runner.opinions == state
    (key,) = state
    assert opinion_from_json(opinion_to_json(state[key], 3)) == state[key]
    assert opinion_from_json({"expires_s": 1.0, "offset": 4}) is None  # a resend entry of the old rule


def test_an_opinion_entry_lasts_one_window_after_its_latest_revision() -> None:
    runner = Runner(GateConfig(pseudonym_key=KEY, hash_key=KEY, dedup_window_s=3600.0))
    first = _record(interaction_id="i-9", user_id="ann", ts=NOW)
    assert runner.run(first).outcome == "clean"
    later = NOW + timedelta(minutes=59)
    second = _record(interaction_id="i-9", user_id="ann", ts=later, tags=["2"])
    assert _extra(runner.run(second, now=later))["supersedes"] == first["event_id"]
    much_later = later + timedelta(hours=1, minutes=1)  # over the window since the second
    third = _record(interaction_id="i-9", user_id="ann", ts=much_later, tags=["3"])
    assert "supersedes" not in _extra(runner.run(third, now=much_later))
    (entry,) = runner.opinions.values()
    assert entry.expires_s == much_later.timestamp() + 3600.0 and len(entry.decisions) == 3


def test_a_sampled_out_signal_revises_nothing() -> None:
    config = GateConfig(pseudonym_key=KEY, hash_key=KEY, sample_rates={"rating": 0.0})
    runner = Runner(config)
    assert runner.run(_record(type="rating", interaction_id="i-10", user_id="ann", payload={"stars": 4})).outcome == (
        "sampled_out"
    )
    assert runner.opinions == {}


def test_the_stored_rater_is_never_a_user_id_or_an_ip() -> None:
    client = _record(interaction_id="i-11", client_ip="203.0.113.9", payload={"direction": "up", "rater": "x"})
    extra = _extra(Runner().run(client))
    assert extra["rater"].startswith("c_") and "203.0.113" not in extra["rater"]
    other = _extra(Runner().run(_record(interaction_id="i-11", client_ip="203.0.113.10")))
    assert other["rater"] != extra["rater"]  # two clients, two raters
    # With pseudonymization off the stored user_id is as sent, so the rater is a keyed pseudonym.
    plain = GateConfig(hash_key=KEY)
    extra = _extra(Runner(plain).run(_record(interaction_id="i-12", user_id="alice")))
    assert extra["rater"] == pseudonymize("alice", KEY)
    # Pseudonymized users and sessions are stored already: no payload key; a producer's is removed.
    spoof = {"direction": "up", "supersedes": "e-0", "superseded_by": "e-1", "rater": "alice"}
    for record in (_record(interaction_id="i-13", user_id="bo", payload=spoof), _record(type="bad_output",
                   payload={"supersedes": "e-0", "rater": "alice"})):  # fmt: skip
        assert not {"supersedes", "superseded_by", "rater"} & set(_extra(Runner().run(record)))
