"""The worker's interaction index against the real broker: what it reads, and what it decides."""

from __future__ import annotations

import time

import pytest

from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from producers.client import FeedbackClient
from stream_processors.app import interaction_index

pytestmark = pytest.mark.integration


def _wait(check: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_the_index_reads_every_tracked_id_and_decides_only_past_what_it_has_read(isolated: Settings) -> None:
    ensure_topics(isolated)
    with FeedbackClient("assistant", isolated) as fb:
        for i in range(20):
            fb.track(f"i-{i}", model_version="m-1")
        fb.flush()
    tracked_by = time.time()
    index = interaction_index(isolated).start()
    try:
        # An empty-handed start: until it has read the topic, every id may have a context.
        assert index.may_have_context(b"i-never", created_s=tracked_by)
        _wait(lambda: index.covered_until > tracked_by + 0.1, 60, "the index to read the topic")
        assert all(index.may_have_context(f"i-{i}".encode(), created_s=tracked_by) for i in range(20))
        assert not index.may_have_context(b"i-never", created_s=tracked_by)
        # Later tracks are read too, and the coverage keeps moving while they arrive.
        with FeedbackClient("assistant", isolated) as fb:
            fb.track("i-late", model_version="m-2")
            fb.flush()
        late = time.time()
        _wait(lambda: index.covered_until > late, 60, "the index to read the new track")
        assert index.may_have_context(b"i-late", created_s=late)
        # Feedback "sent" after what the index has read is never decided as unknown.
        assert index.may_have_context(b"i-never", created_s=time.time() + 60)
    finally:
        index.stop()
    assert index.error == ""


def test_feedback_right_after_its_track_from_the_same_client_waits_for_it(isolated: Settings) -> None:
    """The client's half of the rule: an event naming an interaction whose track() is still in
    flight is sent only after Kafka has the interaction."""
    ensure_topics(isolated)
    with FeedbackClient("assistant", isolated) as fb:
        fb.track("i-now", model_version="m-1")
        assert fb._tracks_in_flight == {"i-now"}
        fb.thumbs(up=True, interaction_id="i-other", user_id="u1")  # another interaction: no wait
        assert fb._tracks_in_flight == {"i-now"}
        fb.thumbs(up=True, interaction_id="i-now", user_id="u1")
        assert fb._tracks_in_flight == set()  # the tracker was flushed first
        assert fb._tracker is not None and len(fb._tracker._producer) == 0  # nothing of it in flight
        fb.track("i-bulk", model_version="m-1")
        fb.emit_many([{"type": "thumbs", "payload": {"direction": "up"}, "interaction_id": "i-bulk"}])
        assert fb._tracks_in_flight == set() and len(fb._tracker._producer) == 0
