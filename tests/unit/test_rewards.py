"""Rewards for routers, the pure parts: arms, the reward and its weight, the decayed Beta
posterior, replays, and the published record with its interval."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime

import orjson
import pytest

from schemas.reward_records import (
    NORMAL_ABOVE,
    RewardRecord,
    arm_key,
    beta_interval,
    beta_quantile,
    decode_reward,
    encode_reward,
    split_arm_key,
)
from stream_processors.rewards import (
    ITEMS_MAX,
    RewardConfig,
    context_tags,
    decode_items,
    event_weight,
    group_reward_items,
    reward_items,
    reward_of,
    reward_record,
    rewards_apply,
)

T0 = 1_750_000_000.0
CONFIG = RewardConfig(half_life_s=100.0, context_tags=("math", "lang:*"))


def _event(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "model_version": "m-a", "prompt_version": "p-1", "value": 1.0, "confidence": None,
        "propagation_weight": 1.0, "tags": [], "ts": datetime.fromtimestamp(T0, UTC),
    }  # fmt: skip
    return {**base, **kw}


def test_arm_keys_split_back_into_their_arm_whatever_the_names_hold() -> None:
    for arm in [("m", None, None), ("m", "p", None), ("m", "p", "math"), ("m|x", "p%7C", "a|b%"), ("m", None, "t")]:
        assert split_arm_key(arm_key(*arm)) == arm
    assert arm_key("m-a", "p-1") == "m-a|p-1" and arm_key("m-a", "p-1", "math") == "m-a|p-1|math"
    with pytest.raises(ValueError, match="model_version"):
        arm_key("")
    with pytest.raises(ValueError, match="not an arm key"):
        split_arm_key("just-one-part")


def test_context_tags_are_names_or_prefixes_distinct_and_sorted() -> None:
    assert context_tags(["lang:fr", "other", "math", "math", "lang:de"], CONFIG.context_tags) == [
        "lang:de", "lang:fr", "math",
    ]  # fmt: skip
    assert context_tags(["math"], ()) == []
    assert context_tags(["a", "b"], ("*",)) == ["a", "b"]


def test_reward_and_weight_follow_the_rule() -> None:
    assert [reward_of(v) for v in (-1.0, 0.0, 0.5, 1.0, 3.0)] == [0.0, 0.5, 0.75, 1.0, 1.0]
    assert event_weight(None, 1.0, None) == 1.0
    assert event_weight(0.5, 0.4, 0.5) == pytest.approx(0.1)
    assert event_weight(2.0, -1.0, 1.0) == 0.0  # each factor clamped to [0, 1]


def test_an_event_counts_toward_its_arm_and_each_context_arm() -> None:
    record = _event(value=0.5, confidence=0.8, propagation_weight=0.5, tags=["math", "x", "lang:en"])
    items = reward_items(record, partition=2, position=7, reputation_weight=0.5, config=CONFIG)
    assert [arm for arm, _ in items] == ["m-a|p-1", "m-a|p-1|lang:en", "m-a|p-1|math"]
    assert all(item == (2, 7, 0.75, pytest.approx(0.2), T0) for _, item in items)
    # No model or no value: no arm. No prompt: the arm's prompt part is empty.
    assert reward_items(_event(model_version=None), partition=0, position=0, reputation_weight=1, config=CONFIG) == []
    assert reward_items(_event(value=None), partition=0, position=0, reputation_weight=1, config=CONFIG) == []
    no_prompt = reward_items(_event(prompt_version=None), partition=0, position=0, reputation_weight=1, config=CONFIG)
    assert [arm for arm, _ in no_prompt] == ["m-a|"]


def test_the_posterior_adds_weighted_rewards_and_decays_by_event_time() -> None:
    v = rewards_apply(None, [(0, 1, 1.0, 1.0, T0), (0, 2, 0.0, 0.5, T0)], CONFIG)
    assert v is not None and (v["a"], v["b"], v["t"], v["n"]) == (1.0, 0.5, T0, 2)
    # One half-life later: the evidence halves, then the new event adds.
    v2 = rewards_apply(v, [(0, 3, 1.0, 1.0, T0 + 100)], CONFIG)
    assert v2 is not None and v2["a"] == pytest.approx(0.5 + 1.0) and v2["b"] == pytest.approx(0.25)
    assert v2["t"] == T0 + 100 and v2["applied"] == {"0": 3}
    # An older event (out of order) is added decayed to the state's time; time never goes back.
    v3 = rewards_apply(v2, [(1, 0, 1.0, 1.0, T0)], CONFIG)
    assert v3 is not None and v3["a"] == pytest.approx(1.5 + 0.5) and v3["t"] == T0 + 100


def test_the_state_does_not_depend_on_the_order_of_origins() -> None:
    rng = random.Random(7)
    events = [(p, pos, rng.random(), rng.random(), T0 + rng.uniform(0, 500)) for p in range(3) for pos in range(20)]
    per_origin = [[e for e in events if e[0] == p] for p in range(3)]
    results = []
    for order in itertools.permutations(range(3)):
        value = None
        for p in order:
            value = rewards_apply(value, per_origin[p], CONFIG) or value
        assert value is not None
        results.append((value["a"], value["b"], value["t"], value["n"]))
    assert all(r[2:] == results[0][2:] for r in results)
    assert all(r[0] == pytest.approx(results[0][0], rel=1e-12) and r[1] == pytest.approx(results[0][1], rel=1e-12)
               for r in results)  # fmt: skip


def test_a_replayed_item_changes_nothing() -> None:
    items = [(0, 10, 1.0, 1.0, T0), (0, 11, 0.0, 1.0, T0 + 1), (3, 4, 1.0, 1.0, T0 + 2)]
    once = rewards_apply(None, items, CONFIG)
    assert once is not None and once["n"] == 3
    assert rewards_apply(once, items, CONFIG) is None
    assert rewards_apply(once, items[:2], CONFIG) is None
    # A replay that overlaps new items applies only the new ones.
    more = rewards_apply(once, [*items, (0, 12, 1.0, 1.0, T0 + 3)], CONFIG)
    assert more is not None and more["n"] == 4 and more["applied"] == {"0": 12, "3": 4}


def test_reward_items_are_grouped_per_arm_in_order_and_decode_back() -> None:
    items = [("m|p", (0, i, 1.0, 1.0, T0)) for i in range(ITEMS_MAX + 2)] + [("n|p", (1, 0, 0.0, 0.5, T0))]
    messages = group_reward_items(items)
    assert [k for k, _ in messages] == [b"m|p", b"m|p", b"n|p"]
    decoded = [decode_items(v) for _, v in messages]
    assert len(decoded[0]) == ITEMS_MAX and decoded[1][-1] == (0, ITEMS_MAX + 1, 1.0, 1.0, T0)
    for bad, rule in [
        (b"{}", "non-empty JSON list"), (b"[[1, 2, 3]]", "partition, position"),
        (b'[["0", 1, 0.5, 1, 0]]', "integers"), (b"[[0, 1, 1.5, 1, 0]]", "in \\[0, 1\\]"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=rule):
            decode_items(bad)


def test_beta_interval_matches_known_quantiles() -> None:
    # Beta(1, 1) is uniform; Beta(2, 1) has cdf x^2; Beta(1, 3) has cdf 1 - (1 - x)^3.
    assert beta_interval(1, 1) == pytest.approx((0.025, 0.975), abs=1e-9)
    assert beta_quantile(0.25, 2, 1) == pytest.approx(0.5, abs=1e-9)
    assert beta_quantile(0.5, 1, 3) == pytest.approx(1 - 0.5 ** (1 / 3), abs=1e-9)
    # Beta(10, 30): the density integrated numerically (2M steps) gives 0.130377 and 0.393262.
    low, high = beta_interval(10, 30)
    assert low == pytest.approx(0.130377, abs=2e-6) and high == pytest.approx(0.393262, abs=2e-6)
    # Past NORMAL_ABOVE the normal approximation takes over, continuously.
    a, b = 0.3 * NORMAL_ABOVE, 0.7 * NORMAL_ABOVE
    exact, approx = beta_interval(a, b), beta_interval(a * 1.0001, b * 1.0001)
    assert exact == pytest.approx(approx, abs=2e-4)
    with pytest.raises(ValueError, match="level"):
        beta_interval(1, 1, level=1.0)


def test_the_record_publishes_the_posterior_and_decays_to_later_times() -> None:
    value = rewards_apply(None, [(0, 1, 1.0, 1.0, T0), (0, 2, 1.0, 1.0, T0), (0, 3, 0.0, 1.0, T0)], CONFIG)
    assert value is not None
    record = reward_record("m-a|p-1|math", value, CONFIG)
    assert (record.model_version, record.prompt_version, record.tag) == ("m-a", "p-1", "math")
    assert (record.alpha, record.beta, record.weight, record.events) == (3.0, 2.0, 3.0, 3)
    assert record.mean == pytest.approx(0.6)
    later = record.at(T0 + 100)  # one half-life: the evidence halves, the prior stays
    assert (later.alpha, later.beta, later.weight) == pytest.approx((2.0, 1.5, 1.5))
    assert record.at(T0 - 50) == record
    assert decode_reward(encode_reward(record)) == record
    line = record.to_json()
    assert line["key"] == "m-a|p-1|math" and line["ci_low"] < line["mean"] < line["ci_high"]
    assert line["updated_at"].startswith("2025-06-15")
    for bad in (b"not json", orjson.dumps({"model_version": "m"}), encode_reward(RewardRecord(
            "m", None, None, 0.0, 1.0, 1.0, 1.0, 10.0, T0, 0))):  # fmt: skip
        with pytest.raises(ValueError, match="not a reward record"):
            decode_reward(bad)
