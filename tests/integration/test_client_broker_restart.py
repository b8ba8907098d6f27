"""A client keeps every acknowledged event when the broker goes away mid-run and comes back."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pipeline.kafka_admin import ensure_topics
from pipeline.localstack import LocalKafka
from pipeline.settings import PROJECT_ROOT, Settings
from producers.client import FeedbackClient
from schemas.serde import AvroSerde
from schemas.topics import Topics
from tests.conftest import _free_port
from tests.integration.kafka_read import read_topic

pytestmark = pytest.mark.integration


def test_every_acknowledged_event_survives_a_broker_restart(tmp_path: Path) -> None:
    # A private broker: stopping it must not disturb the other tests.
    (tmp_path / "kafka").mkdir()
    libs = PROJECT_ROOT / ".local" / "kafka" / "libs"
    if libs.is_dir():
        (tmp_path / "kafka" / "libs").symlink_to(libs)
    settings = Settings(state_dir=tmp_path, kafka_port=_free_port(), kafka_controller_port=_free_port(),
                        topic_partitions=2)  # fmt: skip
    kafka = LocalKafka(settings)
    kafka.start()
    try:
        ensure_topics(settings)
        sent: list[str] = []
        stop = threading.Event()

        def emit(fb: FeedbackClient) -> None:
            i = 0
            while not stop.is_set() and i < 20_000:
                sent.append(fb.thumbs(up=i % 2 == 0, user_id=f"u-{i % 50}", idempotency_key=f"k-{i}").event_id)
                i += 1
                if i % 200 == 0:
                    time.sleep(0.02)

        with FeedbackClient("dream_ui", settings) as fb:
            worker = threading.Thread(target=emit, args=(fb,))
            worker.start()
            time.sleep(1.0)
            kafka.stop()  # the broker goes away while events are being sent
            time.sleep(2.0)
            kafka.start()
            time.sleep(1.0)
            stop.set()
            worker.join(30)
            fb.flush(120)  # raises DeliveryError if any event was not acknowledged
            acknowledged = fb.producer.delivered
        assert acknowledged == len(sent) > 0
        serde = AvroSerde()
        landed = [serde.decode(v)["event_id"] for _, v in read_topic(settings, Topics().raw)]
        assert set(landed) == set(sent)
        assert len(landed) == len(sent)  # idempotent producer: no duplicates from retries
    finally:
        kafka.stop()
