"""RewardSubscriber without a broker: latest record per arm, decay to a moment, the prior for an
unknown arm, Thompson sampling with a seed, and best()'s tie-break rule."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pipeline.settings import Settings
from producers.subscriber import RewardSubscriber
from schemas.reward_records import Arm, RewardRecord, encode_reward

T = 1_750_000_000.0


def _record(model: str, alpha: float, beta: float, *, prompt: str = "p", tag: str | None = None,
            at: float = T) -> RewardRecord:  # fmt: skip
    return RewardRecord(model, prompt, tag, alpha, beta, 1.0, 1.0, 100.0, at, int(alpha + beta - 2))


def _subscriber(*records: RewardRecord, seed: int | None = None) -> RewardSubscriber:
    sub = RewardSubscriber(Settings(bootstrap_servers="127.0.0.1:1"), seed=seed)
    for record in records:
        sub.reader.apply(record.key.encode(), encode_reward(record))
    return sub


def test_mean_interval_and_decay_of_the_latest_record_per_arm() -> None:
    seen: list[RewardRecord] = []
    sub = RewardSubscriber(Settings(bootstrap_servers="127.0.0.1:1"), on_update=seen.append)
    try:
        old, new = _record("m-a", 2.0, 2.0), _record("m-a", 9.0, 3.0)
        for record in (old, new):
            sub.reader.apply(record.key.encode(), encode_reward(record))
        sub.reader.apply(b"m-b|p", b"not json")  # skipped, logged by coordinates only
        assert sub.records == {"m-a|p": new} and seen == [old, new]
        assert sub.mean(("m-a", "p"), at=T) == pytest.approx(0.75)
        low, high = sub.interval("m-a|p", at=T)
        assert low < 0.75 < high and (low, high) == new.interval()
        # One half-life on: the evidence (8 and 2) halves, the prior (1, 1) stays: Beta(5, 2).
        assert sub.mean(Arm("m-a", "p"), at=T + 100) == pytest.approx(5 / 7)
        # An arm never published is the prior.
        assert sub.mean(("m-z", "p")) == 0.5 and sub.record(("m-z", "p")).weight == 0.0
        sub.reader.apply(b"m-a|p", None)
        assert sub.records == {}
    finally:
        sub.close()


def test_best_takes_the_highest_mean_then_more_evidence_then_the_smallest_key() -> None:
    sub = _subscriber(
        _record("m-a", 6.0, 4.0),  # mean 0.6, weight 8
        _record("m-b", 3.0, 2.0),  # mean 0.6, weight 3
        _record("m-c", 3.0, 2.0),  # the same as m-b
        _record("m-d", 2.0, 8.0),
    )
    try:
        arms = [("m-d", "p"), ("m-c", "p"), ("m-b", "p"), ("m-a", "p")]
        assert sub.best(arms, at=T) == Arm("m-a", "p")
        assert sub.best(arms[:3], at=T) == Arm("m-b", "p")  # m-b and m-c tie on both: the smaller key
        assert sub.best(list(reversed(arms[:3])), at=T) == Arm("m-b", "p")  # whatever the order
        with pytest.raises(ValueError, match="arms"):
            sub.best([])
    finally:
        sub.close()


def test_thompson_sampling_is_seedable_and_favours_the_better_arm() -> None:
    records = (_record("m-a", 30.0, 10.0), _record("m-b", 10.0, 30.0), _record("m-c", 1.0, 1.0, tag="math"))
    arms = [("m-a", "p"), ("m-b", "p"), ("m-c", "p", "math")]
    one, two = _subscriber(*records, seed=11), _subscriber(*records, seed=11)
    try:
        picks = [one.sample(arms, at=T) for _ in range(500)]
        assert picks == [two.sample(arms, at=T) for _ in range(500)]  # the same seed, the same choices
        counts = Counter(a.model_version for a in picks)
        # P(m-a wins) is about 0.7 here; m-b (mean 0.25) almost never wins against m-a (0.75).
        assert counts["m-a"] > 300 and counts["m-b"] < 25
        assert one.sample(arms, at=T, rng=random.Random(3)) == two.sample(arms, at=T, rng=random.Random(3))
    finally:
        one.close()
        two.close()
