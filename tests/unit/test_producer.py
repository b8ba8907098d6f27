"""The sync producer names every event Kafka did not acknowledge (no broker listens here)."""

from __future__ import annotations

import pytest

from pipeline.settings import Settings
from producers.producer import DeliveryError, FeedbackProducer
from schemas import AvroSerde, FeedbackEvent
from schemas.bulk import BulkEncoder


def test_flush_names_each_unacknowledged_event_by_its_id() -> None:
    producer = FeedbackProducer(Settings(bootstrap_servers="127.0.0.1:1"), config={"message.timeout.ms": 500})
    events = [FeedbackEvent(source="s", type="thumbs", user_id=f"u-{i}") for i in range(3)]
    producer.send_many(events)
    producer.send_raw(b"\x00not avro", key=b"k", label="replayed-7")
    with pytest.raises(DeliveryError, match="4 event\\(s\\) not acknowledged") as info:
        producer.flush(10)
    assert sorted(label for label, _ in info.value.failures) == sorted([e.event_id for e in events] + ["replayed-7"])
    assert producer.delivered == 0


def test_bulk_sends_are_reported_to_the_default_callback_by_event_id() -> None:
    """send_encoded_many names no callback per message: failures still come back, by id."""
    producer = FeedbackProducer(Settings(bootstrap_servers="127.0.0.1:1"), config={"message.timeout.ms": 500})
    items = [{"source": "s", "type": "thumbs", "user_id": f"u-{i}"} for i in range(5)]
    accepted = BulkEncoder(AvroSerde()).encode(items)
    assert producer.send_encoded_many(accepted) == 5
    producer.send_encoded(accepted[0].key, accepted[0].value)
    with pytest.raises(DeliveryError, match="6 event\\(s\\) not acknowledged") as info:
        producer.flush(10)
    expected = [a.event_id for a in accepted] + [accepted[0].event_id]  # type: ignore[union-attr]
    assert sorted(label for label, _ in info.value.failures) == sorted(expected)
