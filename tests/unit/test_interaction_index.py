"""The interaction index's rules, without Kafka: the Bloom generations, the coverage, the decision."""

from __future__ import annotations

import random
import threading

import pytest

from stream_processors.interaction_index import Bloom, Coverage, InteractionIndex, TrackedIds, bloom_size


def test_bloom_never_forgets_and_keeps_its_false_positive_rate() -> None:
    rng = random.Random(7)
    bloom = Bloom(10_000, 0.01)
    added = [rng.randbytes(12) for _ in range(10_000)]
    for key in added:
        bloom.add(key)
    assert all(key in bloom for key in added)  # no false negatives: a tracked id always takes the join
    others = [rng.randbytes(13) for _ in range(20_000)]
    false_positives = sum(key in bloom for key in others) / len(others)
    assert false_positives < 0.02  # sized for 1%


def test_bloom_size_follows_the_formula() -> None:
    bits, k = bloom_size(1_000_000, 0.01)
    assert 9_500_000 < bits < 9_700_000  # ~9.6 bits per id at 1%
    assert k == 7


def test_tracked_ids_stay_at_least_one_generation_and_are_then_forgotten() -> None:
    ids = TrackedIds(keep_s=100.0, capacity=1000, now=0.0)
    ids.add(b"early", now=1.0)
    ids.add(b"late", now=99.0)
    ids.add(b"next", now=100.0)  # rotates: "early" and "late" are in the previous generation
    assert ids.may_contain(b"early") and ids.may_contain(b"late") and ids.may_contain(b"next")
    ids.add(b"later", now=200.0)  # rotates again: the generation holding "early"/"late" is dropped
    assert not ids.may_contain(b"early") and not ids.may_contain(b"late")
    assert ids.may_contain(b"next") and ids.may_contain(b"later")


def test_coverage_moves_only_once_every_watermark_asked_about_is_read() -> None:
    cov = Coverage()
    cov.start({0: 0, 1: 5})  # partition 1's log starts at 5 (earlier offsets were compacted away)
    cov.asked(10.0, {0: 3, 1: 5})
    assert cov.until == -float("inf")  # partition 0 still has offsets 0..2 to read
    cov.consumed(0, 2)
    assert cov.until == -float("inf")
    cov.asked(11.0, {0: 4, 1: 7})
    cov.consumed(0, 3)  # offsets 0..2 read: the question asked at 10.0 is answered
    assert cov.until == 10.0
    cov.consumed(1, 7)  # an end-of-partition report past a compacted gap
    assert cov.until == 10.0  # partition 0 needs offset 3 for the question asked at 11.0
    cov.consumed(0, 4)
    assert cov.until == 11.0


def test_an_empty_topic_is_covered_at_the_first_answer() -> None:
    cov = Coverage()
    cov.start({0: 0, 1: 0})
    cov.asked(5.0, {0: 0, 1: 0})
    assert cov.until == 5.0


def _index(**kw: float) -> InteractionIndex:
    return InteractionIndex("t", lambda: None, lambda: None, keep_s=1000.0, clock=lambda: 0.0, **kw)


def _cover(index: InteractionIndex, at: float) -> None:
    with index._advanced:
        index.coverage.asked(at, {0: 0})
        index._advanced.notify_all()


def test_only_feedback_sent_before_the_coverage_with_an_untracked_id_skips_the_join() -> None:
    index = _index(clock_skew_s=0.5)
    index.ids.add(b"i-tracked", now=0.0)
    # Nothing read yet: every id may have a context.
    assert index.may_have_context(b"i-never", created_s=1.0)
    _cover(index, 10.0)
    assert not index.may_have_context(b"i-never", created_s=9.0)  # sent before what was read
    assert index.may_have_context(b"i-tracked", created_s=9.0)  # tracked: the join decides
    assert index.may_have_context(b"i-never", created_s=9.6)  # within the allowed clock skew
    assert index.decided(9.5) and not index.decided(9.6)


def test_waiting_for_the_coverage_returns_once_it_has_moved() -> None:
    index = _index(clock_skew_s=0.0)
    assert not index.wait_until_decided(5.0, timeout_s=0.0)
    moved = threading.Thread(target=_cover, args=(index, 6.0))
    moved.start()
    try:
        assert index.wait_until_decided(5.0, timeout_s=30.0)
    finally:
        moved.join()
    assert not index.may_have_context(b"i-never", created_s=5.0)


@pytest.mark.parametrize("skew", [0.0, 0.05])
def test_a_future_timestamp_is_never_decided(skew: float) -> None:
    index = _index(clock_skew_s=skew)
    _cover(index, 100.0)
    assert index.may_have_context(b"i-never", created_s=200.0)
