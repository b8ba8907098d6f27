"""The Faust app: thin agents around the pure stages in this package."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust

from pipeline.settings import Settings
from schemas.serde import AvroSerde
from schemas.topics import Topics
from stream_processors.gate import GateCodecs, route_raw

__all__ = ["create_app", "run_worker"]

log = logging.getLogger(__name__)

GATE_BATCH = 1000
GATE_WITHIN_S = 0.2


def _broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{server.strip()}" for server in bootstrap.split(",") if server.strip()]


def create_app(settings: Settings, **overrides: Any) -> faust.App:
    """The worker's Faust app with the gate agent registered."""
    topics = Topics(settings.topic_prefix)
    conf: dict[str, Any] = {
        "broker": _broker_urls(settings.kafka_bootstrap),
        "value_serializer": "raw",
        "key_serializer": "raw",
        "topic_partitions": settings.topic_partitions,
        "producer_acks": -1,
        "consumer_auto_offset_reset": "earliest",
        "store": "memory://",
        "datadir": str(settings.state_dir / "worker" / settings.worker_id),
        "web_enabled": False,
        "table_standby_replicas": 0,
    }
    conf.update(overrides)
    Path(conf["datadir"]).parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(f"{settings.topic_prefix}{settings.worker_id}", **conf)

    codecs = GateCodecs(
        events=AvroSerde.from_url(settings.schema_registry_url),
        dead_letters=AvroSerde("dead_letter_v1"),
    )
    raw_topic = app.topic(topics.raw, value_serializer="raw", key_serializer="raw")
    clean_topic = app.topic(topics.clean, value_serializer="raw", key_serializer="raw")
    dlq_topic = app.topic(topics.dlq, value_serializer="raw", key_serializer="raw")

    @app.agent(raw_topic, name="gate")
    async def gate(stream: faust.StreamT) -> None:
        # Raw bytes in, explicit decode: Faust would only log a value that fails to
        # deserialize, and we owe every message a destination.
        async for events in stream.take_events(GATE_BATCH, within=GATE_WITHIN_S):
            now = datetime.now(UTC)
            for event in events:
                msg = event.message
                routed = route_raw(
                    msg.value,
                    codecs=codecs,
                    key=msg.key,
                    topic=msg.topic,
                    partition=msg.partition,
                    offset=msg.offset,
                    now=now,
                )
                if routed.destination == "clean":
                    await clean_topic.send(key=msg.key, value=routed.value)
                else:
                    log.warning(
                        "dead_lettered stage=decode partition=%d offset=%d reason=%s",
                        msg.partition,
                        msg.offset,
                        routed.reason,
                    )
                    await dlq_topic.send(key=msg.key, value=routed.value)

    return app


def run_worker(settings: Settings) -> None:
    """Run the worker until SIGTERM/SIGINT (blocking)."""
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True)
    worker.execute_from_commandline()
