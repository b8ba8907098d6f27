"""The Faust agents, driven with Faust's test context (no broker): gate, reputation, directive bias."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.settings import Settings
from schemas import FeedbackEvent
from schemas.envelope import is_envelope, position, unpack
from schemas.serde import AvroSerde
from schemas.state_records import decode_bias, decode_reputation
from schemas.topics import Topics
from stream_processors.app import FeedbackApp, create_app
from stream_processors.dedup import dedup_key, opinion_key
from stream_processors.interaction_index import InteractionIndex
from stream_processors.outputs import CapturedOutputs
from stream_processors.redact import pseudonymize

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
KEY = "agent-test-pseudonym-key"
EVENTS = AvroSerde("feedback_event_v1")
REJECTED = AvroSerde("rejected_v1")
TOPICS = Topics()
SETTLE_S = 0.6


class Harness:
    """One app in test mode: outputs captured per topic, tables in memory."""

    def __init__(self, tmp: Path, index: InteractionIndex | None = None, **settings: Any) -> None:
        base = {
            "table_store": "memory", "state_dir": tmp, "pseudonym_key": KEY, "worker_metrics_port": 0,
            "rate_limit_per_minute": 5, "bias_publish_interval_s": 0.0,
        }  # fmt: skip
        self.settings = Settings(**{**base, **settings})
        self.outputs = CapturedOutputs()
        self.fatal: list[BaseException] = []  # a batch that failed as a whole (the worker would stop)
        self.fa: FeedbackApp = create_app(
            self.settings, outputs=self.outputs, on_fatal=self.fatal.append, interaction_index=index
        )
        self.fa.app.finalize()
        self.fa.app.flow_control.resume()

    @property
    def messages(self) -> dict[str, list[tuple[bytes | None, bytes | None]]]:
        """What the agents produced, per topic, message by message (grouped messages as sent)."""
        return defaultdict(list, {t: [(k, v) for k, v, _ in sent] for t, sent in self.outputs.sent.items()})

    @property
    def sent(self) -> dict[str, list[tuple[bytes | None, bytes | None]]]:
        """What the agents produced, one entry per record: grouped outcomes, bias increments and
        triage commands expanded to their items, enrich envelopes to their events (keyed by
        interaction id)."""
        out: dict[str, list[tuple[bytes | None, bytes | None]]] = defaultdict(list)
        for topic, messages in self.messages.items():
            for key, value in messages:
                if topic in (TOPICS.outcomes, TOPICS.bias_input, TOPICS.triage_commands) and value is not None:
                    items = orjson.loads(value)
                    for item in items if isinstance(items, list) else [items]:
                        item_key = item.get("source") if topic == TOPICS.outcomes else None
                        item_key = item.get("key", item_key) if topic == TOPICS.bias_input else item_key
                        item_key = item.get("triage_id", item_key) if topic == TOPICS.triage_commands else item_key
                        out[topic].append((str(item_key).encode(), orjson.dumps(item)))
                elif topic == TOPICS.enrich and is_envelope(value):
                    for body in unpack(value):  # type: ignore[arg-type]
                        out[topic].append((str(EVENTS.decode(body)["interaction_id"]).encode(), body))
                else:
                    out[topic].append((key, value))
        return out

    @property
    def accepted(self) -> list[bytes]:
        """What the gate passed, to clean or (with an interaction_id) to enrich, in order per topic."""
        sent = self.sent
        return [v for t in (TOPICS.clean, TOPICS.enrich) for _, v in sent[t] if v is not None]

    def table(self, name: str) -> dict[str, Any]:
        return dict(self.fa.tables[name].items())

    def metric(self, name: str, **labels: str) -> float:
        value = self.fa.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def clean(self) -> list[dict[str, Any]]:
        """Every event the gate accepted, in order (whether it went straight to clean or via enrich)."""
        return [EVENTS.decode(v) for v in self.accepted]

    def rejected(self) -> list[dict[str, Any]]:
        return [REJECTED.decode(v) for _, v in self.sent[TOPICS.rejected]]

    async def feed(
        self,
        agent: str,
        messages: list[tuple[bytes | None, bytes, float]],
        until: Callable[[], bool],
        *,
        replay_from: int | None = None,
    ) -> None:
        """Put ``messages`` (key, value, timestamp) through ``agent`` and wait for ``until``;
        with ``replay_from``, put them again from that offset on, as a restarted worker would."""
        async with self.fa.agents[agent].test_context() as ctx:
            for key, value, ts in messages:
                await ctx.put(value, key=key, timestamp=ts)
            await _settle(until)
            if replay_from is not None:
                ctx.sent_offset = replay_from
                for key, value, ts in messages[replay_from:]:
                    await ctx.put(value, key=key, timestamp=ts)
            await asyncio.sleep(SETTLE_S)  # take_events hands a partial batch over after WITHIN_S

    async def cascade(self) -> None:
        """Feed the gate's outcomes to the reputation agent, and its increments to the bias agent."""
        outcomes = [(k, v, 0.0) for k, v in self.messages[TOPICS.outcomes]]
        n_outcomes = len(self.sent[TOPICS.outcomes])
        await self.feed("reputation", outcomes, lambda: sum(self._observations()) >= n_outcomes)
        increments = [(k, v, 0.0) for k, v in self.messages[TOPICS.bias_input]]
        n_increments = len(self.sent[TOPICS.bias_input])
        await self.feed(
            "bias", increments, lambda: sum(v["events"] for v in self.table("bias").values()) >= n_increments
        )
        assert self.fa.publish_state is not None
        self.fa.publish_state(force=True)

    def _observations(self) -> Iterator[int]:
        return (v["observations"] for v in self.table("reputation").values())


async def _settle(done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError("the agent did not finish in time")
        await asyncio.sleep(0.05)


def _event(offset_s: float = 0.0, **kw: Any) -> tuple[bytes, bytes, float]:
    base: dict[str, Any] = {"source": "dream_ui", "type": "thumbs", "ts": T0 + timedelta(seconds=offset_s)}
    base.setdefault("payload", {"direction": "up"})
    event = FeedbackEvent.model_validate({**base, **kw})
    key = (event.user_id or event.client_ip or event.source).encode()
    return key, EVENTS.encode(event.to_avro()), (T0 + timedelta(seconds=offset_s)).timestamp()


def _crafted() -> list[tuple[bytes, bytes, float]]:
    msgs = []
    # A thumbs-down with PII in the comment and text that must be dropped.
    msgs.append(_event(0, user_id="alice", interaction_id="i-1", payload={
        "direction": "down", "comment": "call me at +1 415 555 0100 or alice@example.com",
        "text": "model answer text"}))  # fmt: skip
    # The same signal resent (another event id, the same content and ts): a duplicate by content.
    resent = FeedbackEvent.model_validate({**EVENTS.decode(msgs[0][1]), "event_id": "resent-1"})
    msgs.append((msgs[0][0], EVENTS.encode(resent.to_avro()), msgs[0][2] + 1))
    # A burst of 8 from one user; the limit is 5 per minute (burst 5): 5 pass... minus what alice already used.
    msgs += [
        _event(2 + i * 0.01, user_id="bob", payload={"direction": "up"}, idempotency_key=f"b{i}") for i in range(8)
    ]
    # Directive feeders.
    msgs.append(_event(3, type="bad_output", user_id="carol", severity="error", payload={}))
    msgs.append(_event(3.5, type="latency", user_id="dave", severity="warn", payload={}))
    msgs.append(_event(4, type="veto", source="guardian", severity="critical", payload={}))
    # Invalid: 10 minutes in the future of its arrival.
    key, value, ts = _event(600, user_id="erin")
    msgs.append((key, value, ts - 600))
    # Poison.
    msgs.append((b"mallory", b"\x00not avro", T0.timestamp()))
    return msgs


def test_gate_applies_every_rule_and_counts_it(tmp_path: Path) -> None:
    h = Harness(tmp_path, sample_rates={"veto": 0.0, "latency": 1.0})
    msgs = _crafted()
    asyncio.run(h.feed("gate", msgs, lambda: len(h.sent[TOPICS.outcomes]) >= len(msgs) - 1))

    clean = h.clean()
    by_type = defaultdict(list)
    for event in clean:
        by_type[event["type"]].append(event)
    # alice's first event: redacted, text dropped, pseudonymized, client ip gone, normalized.
    (first,) = [e for e in by_type["thumbs"] if e["user_id"] == pseudonymize("alice", KEY.encode())]
    assert first["payload"]["comment"] == "call me at [PHONE] or [EMAIL]"
    assert first["payload"]["text"] is None and first["text_dropped"] is True
    assert first["user_id"] == pseudonymize("alice", KEY.encode())
    assert (first["value"], first["confidence"]) == (-1.0, 1.0)
    # bob: 5 of 8 within the bucket.
    assert sum(1 for e in by_type["thumbs"] if e["user_id"] == pseudonymize("bob", KEY.encode())) == 5
    # The veto survives a 0.0 sample rate; every kept event records its rate.
    assert len(by_type["veto"]) == 1 and all(e["sample_rate"] == 1.0 for e in clean)
    assert len(by_type["bad_output"]) == 1 and len(by_type["latency"]) == 1
    assert len(clean) == 1 + 5 + 3

    reasons = sorted(r["reason"] for r in h.rejected())
    assert reasons == ["duplicate", "invalid", "rate_limited", "rate_limited", "rate_limited"]
    invalid = next(r for r in h.rejected() if r["reason"] == "invalid")
    assert invalid["field"] == "ts" and "future" in invalid["rule"] and invalid["offset"] == len(msgs) - 2
    # No personal data anywhere downstream: keys and rejected records carry pseudonyms or sources.
    downstream = b"".join(k or b"" for t in (TOPICS.clean, TOPICS.enrich, TOPICS.rejected) for k, _ in h.sent[t])
    assert b"alice" not in downstream and b"bob" not in downstream
    # Events naming an interaction are re-keyed by it (to meet its context); the rest go straight on.
    assert all(EVENTS.decode(v)["interaction_id"] == k.decode() for k, v in h.sent[TOPICS.enrich] if k)
    assert all(EVENTS.decode(v)["interaction_id"] is None for _, v in h.sent[TOPICS.clean])
    assert h.sent[TOPICS.enrich] and h.sent[TOPICS.clean]
    (letter,) = [AvroSerde("dead_letter_v1").decode(v) for _, v in h.sent[TOPICS.dlq]]
    assert letter["stage"] == "decode" and letter["raw"] == b"\x00not avro" and letter["offset"] == len(msgs) - 1
    assert letter["key"] == b"mallory" and letter["topic"] == TOPICS.raw

    assert h.metric("feedback_total", source="dream_ui", type="thumbs") == 6
    assert h.metric("feedback_veto_total") == 1
    assert h.metric("feedback_rate_limited_total") == 3
    assert h.metric("feedback_duplicates_total") == 1
    assert h.metric("feedback_rejected_total", reason="invalid") == 1
    assert h.metric("feedback_redactions_total", kind="EMAIL") == 1
    assert h.metric("feedback_redactions_total", kind="PHONE") == 1
    assert h.metric("feedback_dlq_total", stage="decode") == 1
    assert h.metric("feedback_text_dropped_total") == 1

    # The tables: bob's bucket is empty, remembers the last offset applied and which were limited.
    bob = h.table("subjects")[pseudonymize("bob", KEY.encode())]  # keyed by pseudonym, never the id in clear
    # Positions: the raw offset << 16 (single-event messages are item 0).
    assert bob["bucket"][0] < 1 and bob["offset"] == position(9) and bob["limited"] == [position(o) for o in (7, 8, 9)]
    alice = EVENTS.decode(msgs[0][1])
    assert {dedup_key(alice, KEY.encode()), opinion_key(alice, KEY.encode())} <= set(h.table("seen"))


def _votes() -> list[tuple[bytes, bytes, float]]:
    """ann thumbs-up, ben thumbs-up, ann changes to thumbs-down, and an exact resend of that."""
    ann_up = _event(0, user_id="ann", interaction_id="i-2", payload={"direction": "up"})
    ben_up = _event(1, user_id="ben", interaction_id="i-2", payload={"direction": "up"})
    ann_down = _event(2, user_id="ann", interaction_id="i-2", payload={"direction": "down"})
    resent = FeedbackEvent.model_validate({**EVENTS.decode(ann_down[1]), "event_id": "resent-2"})
    return [ann_up, ben_up, ann_down, (ann_down[0], EVENTS.encode(resent.to_avro()), ann_down[2] + 1)]


def test_a_changed_vote_lands_as_a_revision_and_its_replay_repeats_it(tmp_path: Path) -> None:
    msgs = _votes()
    ids = [EVENTS.decode(v)["event_id"] for _, v, _ in msgs]
    once = Harness(tmp_path / "once", rate_limit_per_minute=1000)
    asyncio.run(once.feed("gate", msgs, lambda: len(once.sent[TOPICS.outcomes]) >= len(msgs)))
    landed = {e["event_id"]: e["payload"]["extra"] for e in once.clean()}
    assert sorted(landed) == sorted(ids[:3])  # a second rater kept, a changed vote kept, the resend dropped
    assert landed[ids[2]]["supersedes"] == ids[0]
    assert "supersedes" not in landed[ids[0]] and "supersedes" not in landed[ids[1]]
    assert [r["reason"] for r in once.rejected()] == ["duplicate"] and once.rejected()[0]["event_id"] == ids[3]

    twice = Harness(tmp_path / "twice", rate_limit_per_minute=1000)  # a worker that crashed after the batch
    asyncio.run(twice.feed("gate", msgs, lambda: len(twice.sent[TOPICS.outcomes]) >= len(msgs), replay_from=0))
    assert twice.table("seen") == once.table("seen")
    assert [e["payload"]["extra"] for e in twice.clean()] == [landed[i] for i in ids[:3]] * 2
    # Opinions are swept with the resend keys once their window ends: the table stays bounded.
    assert len(once.table("seen")) == 3 + 2  # three resend keys, two opinions
    once.fa.sweeps["seen"]((T0 + timedelta(seconds=once.settings.dedup_window_s + 10)).timestamp())
    assert once.table("seen") == {}


def test_sampling_drops_by_type_and_counts(tmp_path: Path) -> None:
    h = Harness(tmp_path, sample_rates={"implicit": 0.0}, rate_limit_per_minute=1000)
    msgs = [
        _event(i * 0.1, type="implicit", user_id=f"u{i}", payload={"signal": "copy"}, idempotency_key=f"k{i}")
        for i in range(10)
    ]
    msgs.append(_event(2, type="safety", user_id="s", payload={}))
    asyncio.run(h.feed("gate", msgs, lambda: len(h.sent[TOPICS.outcomes]) >= len(msgs)))
    assert [e["type"] for e in h.clean()] == ["safety"]
    assert h.metric("feedback_sampled_out_total", type="implicit") == 10
    assert not h.rejected()


def test_gate_replay_of_the_same_offsets_changes_nothing_twice(tmp_path: Path) -> None:
    once = Harness(tmp_path / "once")
    msgs = _crafted()
    asyncio.run(once.feed("gate", msgs, lambda: len(once.sent[TOPICS.outcomes]) >= len(msgs) - 1))

    twice = Harness(tmp_path / "twice")
    asyncio.run(twice.feed("gate", msgs, lambda: len(twice.sent[TOPICS.outcomes]) >= len(msgs) - 1, replay_from=2))
    assert twice.table("subjects") == once.table("subjects")
    assert twice.table("seen") == once.table("seen")
    # The replay repeats every decision: nothing that passed is now limited or a duplicate.
    replayed = twice.clean()[len(once.clean()) :]
    assert sorted(e["event_id"] for e in replayed) == sorted(e["event_id"] for e in once.clean()[1:])


def test_reputation_and_bias_follow_the_gate_and_ignore_replays(tmp_path: Path) -> None:
    h = Harness(tmp_path, bias_step=0.2, bias_half_life_s=600)
    msgs = _crafted()

    async def run() -> None:
        await h.feed("gate", msgs, lambda: len(h.sent[TOPICS.outcomes]) >= len(msgs) - 1)
        await h.cascade()
        # Replaying every outcome and increment (a crash of the state agents) changes no value.
        before = (h.table("reputation"), h.table("bias"))
        outcomes = [(k, v, 0.0) for k, v in h.messages[TOPICS.outcomes]]
        await h.feed("reputation", outcomes, lambda: True)
        increments = [(k, v, 0.0) for k, v in h.messages[TOPICS.bias_input]]
        await h.feed("bias", increments, lambda: True)
        assert (h.table("reputation"), h.table("bias")) == before

    asyncio.run(run())
    rep = {k.decode(): decode_reputation(v) for k, v in h.sent[TOPICS.reputation]}
    dream = rep["dream_ui"]
    assert dream.observations == len(msgs) - 2  # every decoded event but guardian's veto
    assert 0 < dream.score < 1 and not dream.downweighted and dream.weight == 1.0
    assert rep["guardian"].score == 1.0

    bias = {k.decode(): decode_bias(v) for k, v in h.sent[TOPICS.directive_bias]}
    assert set(bias) == {"increase_grounding", "reduce_novelty", "boost_safety"}
    # One event each: step x severity scale (error 1.0, warn 0.75, critical 1.5 → clamped by nothing at 0.3).
    assert bias["increase_grounding"].value == pytest.approx(0.2 * 1.0)
    assert bias["reduce_novelty"].value == pytest.approx(0.2 * 0.75)
    assert bias["boost_safety"].value == pytest.approx(0.2 * 1.5)
    assert bias["boost_safety"].half_life_s == 600 and bias["boost_safety"].events == 1
    assert h.metric("feedback_state_replays_total", table="reputation") == len(h.sent[TOPICS.outcomes])


def test_bias_is_scoped_by_model_version_when_configured(tmp_path: Path) -> None:
    h = Harness(tmp_path, bias_by_model_version=True)
    msgs = [
        _event(0, type="bad_output", user_id="a", model_version="m-1", payload={}),
        _event(1, type="bad_output", user_id="b", model_version="m-2", payload={}),
        _event(2, type="bad_output", user_id="c", model_version="m-2", payload={}),
    ]

    async def run() -> None:
        await h.feed("gate", msgs, lambda: len(h.sent[TOPICS.outcomes]) >= 3)
        await h.cascade()

    asyncio.run(run())
    bias = {k.decode(): decode_bias(v) for k, v in h.sent[TOPICS.directive_bias]}
    assert set(bias) == {"increase_grounding|m-1", "increase_grounding|m-2"}
    assert bias["increase_grounding|m-2"].events == 2 and bias["increase_grounding|m-2"].model_version == "m-2"


def test_undecodable_state_messages_are_dead_lettered(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    asyncio.run(h.feed("reputation", [(b"x", b"{not json", 0.0)], lambda: bool(h.sent[TOPICS.dlq])))
    letter = AvroSerde("dead_letter_v1").decode(h.sent[TOPICS.dlq][0][1])
    assert letter["stage"] == "reputation" and "outcome" in letter["error"]


# --- delayed feedback: interactions joined to later feedback -------------------------------

INTERACTIONS = AvroSerde("interaction_v1")


def _interaction(interaction_id: str, at: datetime, **kw: Any) -> tuple[bytes, bytes, float]:
    from schemas.interaction import Interaction

    record = Interaction(interaction_id=interaction_id, ts=at, source="dream_ui", **kw).to_avro()
    return interaction_id.encode(), INTERACTIONS.encode(record), at.timestamp()


def _clean(interaction_id: str, at: datetime, **kw: Any) -> tuple[bytes, bytes, float]:
    event = FeedbackEvent.model_validate(
        {"source": "dream_ui", "type": "rating", "ts": at, "interaction_id": interaction_id,
         "payload": {"stars": 2}, **kw}
    )  # fmt: skip
    return interaction_id.encode(), EVENTS.encode(event.to_avro()), at.timestamp()


@pytest.mark.parametrize("allow_text", [False, True])
def test_late_feedback_is_joined_to_its_interaction_and_marked(tmp_path: Path, allow_text: bool) -> None:
    h = Harness(tmp_path, allow_text=allow_text, interaction_ttl_s=3600)
    t0 = T0 - timedelta(hours=3)
    tracked = [
        _interaction(
            "i-1",
            t0,
            model_version="m-7",
            prompt_version="p-2",
            latency_ms=830.0,
            cost=0.0021,
            prompt="what is my balance?",
            response="mail alice@example.com for it",
        ),
        _interaction("i-1", t0 - timedelta(minutes=5), model_version="m-OLD"),  # older: must not overwrite
        _interaction("i-stale", t0 - timedelta(hours=5), model_version="m-5"),
        (b"i-bad", b"\x00not avro", t0.timestamp()),
        (b"i-neg", INTERACTIONS.encode({**_avro_interaction("i-neg", t0), "latency_ms": -1.0}), t0.timestamp()),
    ]
    feedback = [
        _clean("i-1", t0 + timedelta(minutes=50)),  # within the hour: joined
        _clean("i-1", t0 + timedelta(minutes=55), model_version="m-explicit"),  # the event's own version wins
        _clean("i-stale", t0 + timedelta(minutes=10)),  # 5 h 10 min after its interaction: expired
        _clean("i-never", t0 + timedelta(minutes=10)),  # never tracked: unknown
    ]

    async def run() -> None:
        await h.feed("interactions", tracked, lambda: len(h.table("interactions")) >= 2)
        await h.feed("enrich", feedback, lambda: len(h.sent[TOPICS.clean]) >= len(feedback))

    asyncio.run(run())
    out = [EVENTS.decode(v) for _, v in h.sent[TOPICS.clean]]
    extra = [e["payload"]["extra"] for e in out]
    assert [x["interaction_status"] for x in extra] == ["joined", "joined", "expired", "unknown"]
    joined = out[0]
    assert (joined["model_version"], joined["prompt_version"]) == ("m-7", "p-2")
    assert extra[0]["interaction_latency_ms"] == 830.0 and extra[0]["interaction_cost"] == 0.0021
    assert extra[0]["interaction_source"] == "dream_ui"
    assert datetime.fromisoformat(extra[0]["interaction_tracked_at"]) == t0
    assert extra[0]["stars"] == 2  # the signal's own payload is kept beside the context
    if allow_text:  # snapshots kept, redacted with the gate's redaction
        assert extra[0]["interaction_response"] == "mail [EMAIL] for it"
        assert extra[0]["interaction_prompt"] == "what is my balance?"
    else:  # private by default: no snapshot text downstream, nor in the table
        assert "interaction_response" not in extra[0] and "interaction_prompt" not in extra[0]
        assert all(v["response"] is None and v["prompt"] is None for v in h.table("interactions").values())
    assert out[1]["model_version"] == "m-explicit" and out[1]["prompt_version"] == "p-2"
    assert out[2]["model_version"] is None and "interaction_latency_ms" not in extra[2]
    assert out[3]["model_version"] is None
    assert h.metric("feedback_enriched_total", status="joined") == 2
    assert h.metric("feedback_enriched_total", status="expired") == 1
    assert h.metric("feedback_enriched_total", status="unknown") == 1
    # Poison and invalid interactions are dead-lettered with their reason; the agent goes on.
    letters = [AvroSerde("dead_letter_v1").decode(v) for _, v in h.sent[TOPICS.dlq]]
    assert [(d["stage"], d["offset"]) for d in letters] == [("interactions", 3), ("interactions", 4)]
    assert "latency_ms" in letters[1]["error"] and "greater than or equal to 0" in letters[1]["error"]
    assert h.table("interactions")["i-1"]["model_version"] == "m-7"
    # Keys on the clean topic: the subject (here the source), never the interaction.
    assert {k for k, _ in h.sent[TOPICS.clean]} == {b"dream_ui"}


def test_feedback_on_an_interaction_never_tracked_skips_the_join_only_when_the_index_shows_it(
    tmp_path: Path,
) -> None:
    # The index's rules are real (stream_processors.interaction_index); its Kafka thread is not
    # started: the test says what it has read. It has read everything tracked up to T0 + 30 s.
    index = InteractionIndex("interactions", lambda: None, lambda: None, keep_s=3600.0, clock_skew_s=0.05,
                             clock=lambda: T0.timestamp())  # fmt: skip
    index.ids.add(b"i-tracked", now=T0.timestamp())
    index.coverage.asked((T0 + timedelta(seconds=30)).timestamp(), {0: 0})
    h = Harness(tmp_path, index=index, rate_limit_per_minute=1e6, interaction_index_wait_ms=0.0)
    feedback = [
        _event(1, user_id="u1", interaction_id="i-tracked"),  # tracked: through the join
        _event(2, user_id="u2", interaction_id="i-never"),  # never tracked, sent before what was read
        _event(60, user_id="u3", interaction_id="i-fresh"),  # sent after what the index has read
        _event(3, user_id="u4"),  # no interaction: straight to clean, no status
    ]
    asyncio.run(h.feed("gate", feedback, lambda: len(h.accepted) >= 4))
    through_join = sorted(k for k, _ in h.sent[TOPICS.enrich])
    assert through_join == [b"i-fresh", b"i-tracked"]
    direct = {e.get("interaction_id"): e for e in (EVENTS.decode(v) for _, v in h.sent[TOPICS.clean])}
    assert set(direct) == {"i-never", None}
    # Marked exactly as the join marks an interaction it does not know.
    assert direct["i-never"]["payload"]["extra"]["interaction_status"] == "unknown"
    assert "interaction_status" not in (direct[None]["payload"].get("extra") or {})
    assert h.metric("feedback_enrich_skipped_total") == 1
    assert h.metric("feedback_enriched_total", status="unknown") == 1


def _avro_interaction(interaction_id: str, at: datetime) -> dict[str, Any]:
    from schemas.interaction import Interaction

    return Interaction(interaction_id=interaction_id, ts=at, source="dream_ui").to_avro()


# --- the triage queue ------------------------------------------------------------------------


def test_triage_queue_from_the_gate_to_labels_and_reputation(tmp_path: Path) -> None:
    from schemas.triage_records import TriageCommand, decode_command, decode_item

    h = Harness(tmp_path, rate_limit_per_minute=1000, reputation_alpha=0.5)
    msgs = [
        _event(0, source="guardian", type="veto", severity="critical", user_id="g1"),
        _event(1, source="oracle", type="bad_output", severity="error", user_id="o1"),
        _event(2, source="oracle", type="thumbs", user_id="o2", payload={"direction": "up"}),  # no human needed
        _event(3, source="mesh", type="rating", severity="warn", user_id="m1", payload={"stars": 1}),
    ]
    asyncio.run(h.feed("gate", msgs, lambda: len(h.sent[TOPICS.outcomes]) >= len(msgs)))
    enqueued = [decode_command(v) for _, v in h.sent[TOPICS.triage_commands]]
    assert [(c.source, c.reason) for c in enqueued] == [
        ("guardian", "type veto"), ("oracle", "type bad_output"), ("mesh", "severity warn"),
    ]  # fmt: skip
    bad_output = enqueued[1].triage_id
    people = [
        TriageCommand("label", bad_output, T0.timestamp() + 60, tag="noise", by="ana"),
        TriageCommand("resolve", enqueued[0].triage_id, T0.timestamp() + 70, note="ok", by="ana"),
    ]
    commands = [(c.triage_id.encode(), c.to_bytes(), 0.0) for c in [*enqueued, *people]]
    commands.append((b"x", b"not a command", 0.0))
    asyncio.run(h.feed("triage", commands, lambda: len(h.sent[TOPICS.triage]) >= 5, replay_from=3))

    items = {k.decode(): decode_item(v) for k, v in h.sent[TOPICS.triage]}  # latest per id
    assert items[bad_output].status == "labeled" and items[bad_output].label == "noise"
    assert items[enqueued[0].triage_id].status == "resolved" and items[enqueued[2].triage_id].status == "open"
    assert h.table("triage")[bad_output]["version"] == 2  # the replay of the label did not apply it twice
    letters = [AvroSerde("dead_letter_v1").decode(v) for _, v in h.sent[TOPICS.dlq]]  # once, and once replayed
    assert len(letters) == 2 and all(d["stage"] == "triage" and "not JSON" in d["error"] for d in letters)
    assert h.metric("feedback_triage_total", op="enqueue") == 3 and h.metric("feedback_triage_total", op="label") == 1

    # The noise label reaches reputation (twice: once replayed) and counts once.
    noise = [(k, v) for k, v in h.sent[TOPICS.outcomes] if b'"origin":"triage"' in v]
    assert len(noise) == 2 and all(k == b"oracle" for k, _ in noise)
    before = dict(h.table("reputation"))
    gate_outcomes = [(k, v, 0.0) for k, v in h.sent[TOPICS.outcomes] if b'"origin":"triage"' not in v]
    asyncio.run(h.feed("reputation", [*gate_outcomes, *((k, v, 0.0) for k, v in noise)],
                       lambda: sum(h._observations()) >= len(gate_outcomes) + 1))  # fmt: skip
    oracle = h.table("reputation")["oracle"]
    assert not before and oracle["observations"] == 3  # two gate outcomes + one noise label
    assert oracle["score"] == pytest.approx(0.5)  # 1, 1, then 0 with alpha 0.5
    assert oracle["applied"]["triage:0"] == position(3)


def test_rate_limit_keys_hold_no_ip_or_user_id_and_idle_buckets_are_swept(tmp_path: Path) -> None:
    h = Harness(tmp_path, rate_limit_idle_s=600.0)
    msgs = [_event(0, client_ip="203.0.113.7"), _event(1, user_id="zoe"), _event(500, user_id="yan")]
    asyncio.run(h.feed("gate", msgs, lambda: len(h.table("subjects")) >= 3))
    keys = set(h.table("subjects"))
    secret = KEY.encode()
    assert keys == {pseudonymize(s, secret) for s in ("203.0.113.7", "zoe", "yan")}
    changelog = h.fa.tables["subjects"].changelog
    written = b"".join((k or b"") + (v or b"") for k, v, _ in h.outputs.sent[changelog])
    assert b"203.0.113.7" not in written and b"zoe" not in written

    # Event time T0+0 and T0+1 are 600 s idle at T0+601; yan (T0+500) is not: only the idle two go,
    # as tombstones in the changelog.
    h.fa.sweeps["subjects"]((T0 + timedelta(seconds=601)).timestamp())
    assert set(h.table("subjects")) == {pseudonymize("yan", secret)}
    assert h.metric("feedback_table_keys", table="gate-subjects") == 1
    tombstones = [k for k, v, _ in h.outputs.sent[changelog] if v is None]
    assert len(tombstones) == 2
    # A swept subject starts again from a full bucket.
    asyncio.run(h.feed("gate", [_event(700, user_id="zoe")], lambda: len(h.table("subjects")) == 2))
    assert h.table("subjects")[pseudonymize("zoe", secret)]["bucket"][0] == pytest.approx(4.0)


def test_an_event_dead_lettered_in_the_gate_leaves_no_state_so_its_replay_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stream_processors.app as app_module

    h = Harness(tmp_path)
    route_gate = app_module.route_gate

    def failing(record: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if record.get("user_id") == "zed":
            raise RuntimeError("a bug on the way to the outputs")
        return route_gate(record, *args, **kwargs)

    monkeypatch.setattr(app_module, "route_gate", failing)
    msg = _event(0, user_id="zed", interaction_id="i-9", payload={"direction": "down"})
    asyncio.run(h.feed("gate", [msg, _event(1, user_id="amy")], lambda: len(h.table("subjects")) >= 1))
    assert len(h.sent[TOPICS.dlq]) == 1 and h.metric("feedback_dlq_total", stage="gate") == 1
    secret = KEY.encode()
    record = EVENTS.decode(msg[1])
    # Nothing of zed's event was recorded: no dedup key, no token taken.
    assert dedup_key(record, secret) not in h.table("seen")
    assert pseudonymize("zed", secret) not in h.table("subjects")

    # After the fix, the replayed letter (the same bytes, a new offset) is accepted, not a duplicate.
    monkeypatch.setattr(app_module, "route_gate", route_gate)
    asyncio.run(h.feed("gate", [msg], lambda: pseudonymize("zed", secret) in h.table("subjects")))
    assert [e["event_id"] for e in h.clean() if e["interaction_id"] == "i-9"] == [record["event_id"]]
    assert not [r for r in h.rejected() if r["event_id"] == record["event_id"]]


def test_the_dedup_sweep_tombstones_keys_whose_window_ended(tmp_path: Path) -> None:
    h = Harness(tmp_path, dedup_window_s=60.0, rate_limit_per_minute=1000)
    msgs = [_event(float(i), user_id=f"w{i}", idempotency_key=f"k{i}") for i in range(30)]
    asyncio.run(h.feed("gate", msgs, lambda: len(h.table("seen")) >= 30))
    # At T0+75 the windows of the events at T0+0..T0+15 have ended (60 s each), the others' not.
    h.fa.sweeps["seen"]((T0 + timedelta(seconds=75)).timestamp())
    assert len(h.table("seen")) == 14
    # The sweep's pass covered the whole (small) table: its gauge holds the keys left.
    assert h.metric("feedback_table_keys", table="gate-seen") == 14
    changelog = h.fa.tables["seen"].changelog
    assert sum(1 for _, v, _ in h.outputs.sent[changelog] if v is None) == 16
    # Once every window has ended the table is empty: it cannot grow past a window's worth of keys.
    h.fa.sweeps["seen"]((T0 + timedelta(seconds=200)).timestamp())
    assert h.table("seen") == {}
    assert h.metric("feedback_table_keys", table="gate-seen") == 0
