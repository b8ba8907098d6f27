"""The rewards agent with Faust's test context (its reward-items step driven directly): gate → clean →
reward items → rewards table → feedback.rewards.v1, with reputation weights, session feedback, context arms, replays."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from pipeline.settings import Settings
from schemas.envelope import position
from schemas.reward_records import decode_reward
from schemas.serde import AvroSerde
from schemas.state_records import ReputationRecord, encode_record
from stream_processors.app import create_app
from tests.unit.test_agents import EVENTS, TOPICS, Harness, _event
from tests.unit.test_batch_replay import Crash, CrashingOutputs

HALF_LIFE = 60.0
LETTERS = AvroSerde("dead_letter_v1")


def _msgs() -> list[tuple[bytes, bytes, float]]:
    return [
        _event(0, user_id="u1", model_version="m-a", prompt_version="p-1", tags=["math"]),
        _event(10, user_id="u2", type="rating", payload={"stars": 2}, model_version="m-a", prompt_version="p-1"),
        _event(
            20,
            user_id="u3",
            type="quality_score",
            payload={"score": 0.9},
            model_version="m-a",
            prompt_version="p-1",
            tags=["math", "other"],
        ),
        # Session-level (a session, no interaction): it carries propagation_weight 0.5.
        _event(
            30,
            user_id="u4",
            type="rating",
            payload={"stars": 5},
            model_version="m-b",
            prompt_version="p-1",
            session_id="s-1",
        ),
        _event(40, user_id="u5", source="spammy", model_version="m-b", prompt_version="p-1"),
        _event(50, user_id="u6", payload={"direction": "down"}),  # no model_version: no arm
        _event(5, user_id="u7", payload={"direction": "down"}, model_version="m-a", prompt_version="p-1"),  # late
    ]


def _expected(clean: list[dict[str, Any]], weights: dict[str, float]) -> dict[str, tuple[float, float, int]]:
    """The rule, computed here on its own: per arm (alpha, beta, events) with prior 1/1."""
    arms: dict[str, list[tuple[float, float, float]]] = {}
    for e in clean:
        if not e["model_version"]:
            continue
        r = (e["value"] + 1) / 2
        w = (e["confidence"] if e["confidence"] is not None else 1.0) * weights.get(e["source"], 1.0)
        w *= e["propagation_weight"] if e["propagation_weight"] is not None else 1.0
        keys = [f"{e['model_version']}|{e['prompt_version']}"] + [
            f"{e['model_version']}|{e['prompt_version']}|{t}" for t in e["tags"] if t == "math"
        ]
        for key in keys:
            arms.setdefault(key, []).append((r, w, e["ts"].timestamp()))
    out = {}
    for key, items in arms.items():
        last = max(t for _, _, t in items)
        a = sum(w * r * 0.5 ** ((last - t) / HALF_LIFE) for r, w, t in items)
        b = sum(w * (1 - r) * 0.5 ** ((last - t) / HALF_LIFE) for r, w, t in items)
        out[key] = (1 + a, 1 + b, len(items))
    return out


def test_rewards_follow_the_clean_events_by_the_rule_and_ignore_replays(tmp_path: Path) -> None:
    h = Harness(tmp_path, rewards_half_life_s=HALF_LIFE, rewards_context_tags=["math"], rate_limit_per_minute=60)
    msgs = _msgs()
    spammy = ReputationRecord("spammy", 0.25, 40, True, 0.25)
    h.fa.handlers["reward-weights"]([SimpleNamespace(message=SimpleNamespace(
        key=b"spammy", value=encode_record(spammy), partition=0, offset=0))])  # fmt: skip

    async def run() -> None:
        await h.feed("gate", msgs, lambda: len(h.sent[TOPICS.clean]) >= len(msgs))
        # reward-items reads the clean topic with its own consumer: its step is driven directly,
        # with the clean batch and then all of it again (a restarted worker reads it once more).
        clean = _as_events(TOPICS.clean, [(k, v, 0) for k, v in h.messages[TOPICS.clean]])
        h.fa.handlers["reward-items"](clean)
        h.fa.handlers["reward-items"](clean)
        inputs = [(k, v, 0.0) for k, v in h.messages[TOPICS.rewards_input]]
        await h.feed("rewards", inputs, lambda: sum(v["n"] for v in h.table("rewards").values()) >= 8)
        assert h.fa.publish_state is not None
        h.fa.publish_state(force=True)

    asyncio.run(run())
    clean_events = [EVENTS.decode(v) for _, v in h.sent[TOPICS.clean]]
    assert len(clean_events) == len(msgs)
    expected = _expected(clean_events, {"spammy": 0.25})
    assert set(expected) == {"m-a|p-1", "m-a|p-1|math", "m-b|p-1"}
    published = {k.decode(): decode_reward(v) for k, v in h.sent[TOPICS.rewards]}
    assert set(published) == set(expected)
    for key, (alpha, beta, events) in expected.items():
        record = published[key]
        assert (record.alpha, record.beta) == (pytest.approx(alpha, abs=1e-8), pytest.approx(beta, abs=1e-8)), key
        assert record.events == events and record.half_life_s == HALF_LIFE
    # m-b: the session rating counts half (decayed over the 10 s to the newest), the down-weighted source a quarter.
    assert published["m-b|p-1"].weight == pytest.approx(0.5 * 0.5 ** (10 / HALF_LIFE) + 0.25)
    assert published["m-a|p-1|math"].tag == "math" and published["m-a|p-1"].tag is None
    # Every item arrived twice (the replayed clean batch); each counted once.
    sent_items = sum(len(orjson.loads(v)) for _, v in h.sent[TOPICS.rewards_input])
    assert sent_items == 2 * sum(e for _, _, e in expected.values())
    assert h.metric("feedback_state_updates_total", table="rewards") >= 3


def _as_events(topic: str, sent: list[tuple[bytes | None, bytes | None, int | None]], start: int = 0) -> list[Any]:
    return [
        SimpleNamespace(message=SimpleNamespace(topic=topic, partition=p or 0, offset=start + i, key=k, value=v,
                                                timestamp=None))
        for i, (k, v, p) in enumerate(sent)
    ]  # fmt: skip


@pytest.mark.parametrize("crash", ["after_flush_before_store", "after_everything"])
def test_a_replayed_rewards_batch_changes_no_arm_twice(tmp_path: Path, crash: str) -> None:
    """The rewards step driven directly: a crash after its outputs were flushed (before the local
    store) or after everything, then the same input again; the table ends as one calm pass does."""
    clean = [(k, v, None) for k, v, _ in _clean_batch(tmp_path / "gate")]

    def app(name: str) -> tuple[Any, CrashingOutputs]:
        base: dict[str, Any] = {"table_store": "rocksdb", "state_dir": tmp_path / name, "worker_metrics_port": 0,
                                "pseudonym_key": "reward-test-key-0123", "rewards_half_life_s": HALF_LIFE}  # fmt: skip
        outputs = CrashingOutputs(partition_count=3)
        fa = create_app(Settings(**base), outputs=outputs, on_fatal=lambda exc: None)
        fa.app.finalize()
        return fa, outputs

    calm, calm_out = app("calm")
    calm.handlers["reward-items"](_as_events(TOPICS.clean, clean))
    calm.handlers["rewards"](_as_events(TOPICS.rewards_input, calm_out.sent[TOPICS.rewards_input]))
    once = dict(calm.tables["rewards"].items())
    assert sum(v["n"] for k, v in once.items() if k.count("|") == 1) == 20

    fa, outputs = app("crashed")
    fa.handlers["reward-items"](_as_events(TOPICS.clean, clean))
    fa.handlers["reward-items"](_as_events(TOPICS.clean, clean))  # the clean batch read again
    inputs = _as_events(TOPICS.rewards_input, outputs.sent[TOPICS.rewards_input])
    if crash == "after_flush_before_store":
        outputs.crash_next_flush = True
        with pytest.raises(Crash):
            fa.handlers["rewards"](inputs)
    else:
        fa.handlers["rewards"](inputs)
    fa.handlers["rewards"](inputs)  # the restarted worker reads its input again
    again = dict(fa.tables["rewards"].items())
    assert {k: {**v, "partition": 0} for k, v in again.items()} == {k: {**v, "partition": 0} for k, v in once.items()}


def _clean_batch(tmp: Path) -> list[tuple[bytes, bytes, float]]:
    """20 clean events over two models (the gate's own output, so every field is as the worker writes it)."""
    h = Harness(tmp, rate_limit_per_minute=60)
    msgs = [
        _event(
            i,
            user_id=f"c{i}",
            model_version=("m-a", "m-b")[i % 2],
            prompt_version="p-1",
            payload={"direction": ("up", "down", "up")[i % 3]},
        )
        for i in range(20)
    ]
    asyncio.run(h.feed("gate", msgs, lambda: len(h.sent[TOPICS.clean]) >= 20))
    return [(k, v, 0.0) for k, v in h.messages[TOPICS.clean] if k is not None and v is not None]


def test_a_malformed_rewards_input_is_dead_lettered(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    bad = [(b"m|p", b"not json", 0.0), (b"no-arm", orjson.dumps([[0, 1, 0.5, 1.0, 0.0]]), 0.0),
           (b"m|p", orjson.dumps([[0, 1, 0.5, 1.0, 0.0]]), 0.0)]  # fmt: skip
    asyncio.run(h.feed("rewards", bad, lambda: len(h.sent[TOPICS.dlq]) >= 2))
    letters = [LETTERS.decode(v) for _, v in h.sent[TOPICS.dlq]]
    assert [letter["stage"] for letter in letters] == ["rewards", "rewards"]
    assert all("not a rewards-input message" in letter["error"] for letter in letters)
    assert h.table("rewards")["m|p"]["n"] == 1  # the good one still landed


def test_an_undecodable_clean_message_is_dead_lettered_and_the_rest_counted(tmp_path: Path) -> None:
    h = Harness(tmp_path, rate_limit_per_minute=60)
    good = [v for _, v, _ in _clean_batch(tmp_path / "gate")[:3]]
    sent = [(b"k", good[0], 0), (b"k", b"\x00not avro", 0), (b"k", good[1], 0), (b"k", None, 0), (b"k", good[2], 0)]
    h.fa.handlers["reward-items"](_as_events(TOPICS.clean, sent))
    letters = [LETTERS.decode(v) for _, v in h.sent[TOPICS.dlq]]
    assert [(letter["stage"], letter["offset"]) for letter in letters] == [("reward-items", 1)]
    items = [item for _, v in h.sent[TOPICS.rewards_input] for item in orjson.loads(v)]
    assert sorted(item[1] for item in items) == [position(0), position(2), position(4)]
