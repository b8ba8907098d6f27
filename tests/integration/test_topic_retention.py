"""Dead letters hold raw bytes: their topic keeps them no longer than the raw topic, by default."""

from __future__ import annotations

import time

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from schemas.topics import Topics

pytestmark = pytest.mark.integration


def _retention_ms(settings: Settings, topic: str) -> int:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    resource = ConfigResource(ResourceType.TOPIC, topic)
    return int(admin.describe_configs([resource])[resource].result(timeout=30)["retention.ms"].value)


def test_dlq_retention_follows_the_raw_topic_and_the_setting_tightens_an_existing_topic(isolated: Settings) -> None:
    topics = Topics(isolated.topic_prefix)
    ensure_topics(isolated)
    assert _retention_ms(isolated, topics.dlq) == _retention_ms(isolated, topics.raw) == 24 * 3_600_000
    # A shorter setting is applied to the topic that already exists.
    ensure_topics(isolated.model_copy(update={"dlq_retention_hours": 2.0}))
    deadline = time.monotonic() + 15  # the brokers apply a config change from the metadata log
    while _retention_ms(isolated, topics.dlq) != 2 * 3_600_000 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _retention_ms(isolated, topics.dlq) == 2 * 3_600_000
    assert _retention_ms(isolated, topics.raw) == 24 * 3_600_000  # the others are left alone
