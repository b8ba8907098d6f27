"""BiasSubscriber's bookkeeping without a broker: latest per key, tombstones, decay to a moment."""

from __future__ import annotations

import pytest

from pipeline.settings import Settings
from producers.subscriber import BiasSubscriber
from schemas.state_records import BiasRecord, encode_record


def test_latest_record_per_key_decays_and_tombstones_remove() -> None:
    seen: list[BiasRecord] = []
    sub = BiasSubscriber(Settings(bootstrap_servers="127.0.0.1:1"), on_update=seen.append)
    try:
        old = BiasRecord("increase_grounding", None, 0.2, 1000.0, 100.0, 1)
        new = BiasRecord("increase_grounding", None, 0.8, 2000.0, 100.0, 2)
        scoped = BiasRecord("increase_grounding", "m-1", 0.5, 2000.0, 100.0, 1)
        for record in (old, new, scoped):
            sub.reader.apply(record.key.encode(), encode_record(record))
        sub.reader.apply(b"boost_safety", b"not json")  # skipped, logged by coordinates only
        assert sub.records == {"increase_grounding": new, "increase_grounding|m-1": scoped}
        assert seen == [old, new, scoped]
        assert sub.current("increase_grounding", at=2000.0) == pytest.approx(0.8)
        assert sub.current("increase_grounding", at=2200.0) == pytest.approx(0.2)  # two half-lives
        assert sub.current("increase_grounding", "m-1", at=2100.0) == pytest.approx(0.25)
        assert sub.current("increase_grounding", at=1500.0) == pytest.approx(0.8)  # never grows backwards
        assert sub.current("reduce_novelty") == 0.0
        sub.reader.apply(b"increase_grounding", None)
        assert "increase_grounding" not in sub.records
    finally:
        sub.close()


def test_an_undecodable_value_is_skipped_and_logged_by_coordinates_only(caplog: pytest.LogCaptureFixture) -> None:
    sub = BiasSubscriber(Settings(bootstrap_servers="127.0.0.1:1"))
    try:
        good = BiasRecord("boost_safety", None, 0.4, 1000.0, 100.0, 1)
        sub.reader.apply(b"boost_safety", encode_record(good))
        with caplog.at_level("WARNING", logger="producers.subscriber"):
            kept = sub.reader.apply(b"boost_safety", b'{"secret": "alice@example.com"}', "partition=2 offset=17")
        assert kept is None and sub.records == {"boost_safety": good}  # the last good value stays
        (message,) = [r.getMessage() for r in caplog.records]
        assert sub.reader.topic in message and "partition=2 offset=17" in message
        assert "alice" not in message and "secret" not in message
    finally:
        sub.close()
