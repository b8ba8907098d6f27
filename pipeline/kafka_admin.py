"""Creating the pipeline's topics and reading their sizes."""

from __future__ import annotations

import dataclasses
import logging

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic, ResourceType

from pipeline.errors import StackError
from pipeline.settings import Settings
from schemas.topics import Topics, TopicSpec

__all__ = ["ensure_topics", "replication_for", "topic_message_counts", "topic_replication"]

log = logging.getLogger(__name__)


def replication_for(brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for a cluster of ``brokers``: up to three
    copies, and an acknowledged write on all but one of them, so losing any one broker
    neither loses an acknowledged event nor stops writes; one broker: (1, 1)."""
    replicas = max(1, min(3, brokers))
    return replicas, max(1, replicas - 1)


def topic_replication(settings: Settings) -> tuple[int, int | None]:
    """(replication factor, min.insync.replicas) for the topics the pipeline creates; -1 and
    None leave them to the cluster's defaults (a single local broker's are 1 and 1).

    The settings win. Unset, a local cluster of several brokers gets :func:`replication_for`
    its size (its brokers default to the same, for topics others create); anything else the
    cluster's defaults. With only the replication factor set locally, min ISR follows from it."""
    replicas, min_isr = -1, None
    if settings.uses_local_kafka and settings.kafka_brokers > 1:
        replicas, min_isr = replication_for(settings.kafka_brokers)
    if settings.topic_replication_factor is not None:
        replicas = settings.topic_replication_factor
        if settings.uses_local_kafka:
            min_isr = replication_for(replicas)[1]
    if settings.topic_min_insync_replicas is not None:
        min_isr = settings.topic_min_insync_replicas
    return replicas, min_isr


def _set_retention(admin: AdminClient, topic: str, retention_ms: str, timeout: float) -> None:
    """Give an existing topic ``retention_ms`` when it has another (dead letters created under an
    older default or setting)."""
    resource = ConfigResource(ResourceType.TOPIC, topic)
    try:
        current = admin.describe_configs([resource])[resource].result(timeout=timeout)
        if current["retention.ms"].value == retention_ms:
            return
        change = ConfigResource(
            ResourceType.TOPIC, topic,
            incremental_configs=[ConfigEntry("retention.ms", retention_ms,
                                             incremental_operation=AlterConfigOpType.SET)],
        )  # fmt: skip
        admin.incremental_alter_configs([change])[change].result(timeout=timeout)
    except KafkaException as exc:
        raise StackError(f"cannot set retention.ms of topic {topic}: {exc.args[0].str()}") from None
    log.info("topic_retention_set topic=%s retention_ms=%s", topic, retention_ms)


def ensure_topics(
    settings: Settings,
    topics: Topics | None = None,
    timeout: float = 30.0,
    *,
    compacted: list[str] | None = None,
) -> list[str]:
    """Create every pipeline topic that does not exist yet; returns the names created.

    ``compacted``: further compacted topics to create with the same partition count (the
    worker's table changelogs, so they exist before its first rebalance; see run_worker).
    Raises :class:`StackError` when the broker is unreachable or refuses a topic.
    """
    topics = topics or Topics(settings.topic_prefix)
    specs = dict(topics.specs())
    dlq_retention = str(int(settings.dlq_retention_hours * 3_600_000))
    specs[topics.dlq] = dataclasses.replace(specs[topics.dlq], retention_ms=int(dlq_retention))
    for name in compacted or ():
        specs[name] = TopicSpec(name, key="table key", value_schema=None, compacted=True)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise StackError(
            f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}. Start it with `feedback up`."
        ) from None
    replicas, min_isr = topic_replication(settings)
    durability = {} if min_isr is None else {"min.insync.replicas": str(min_isr)}
    wanted = [
        NewTopic(
            name,
            num_partitions=spec.partitions or settings.topic_partitions,
            replication_factor=replicas,
            config={**spec.config(), **durability},
        )
        for name, spec in specs.items()
        if name not in existing
    ]
    created: list[str] = []
    if topics.dlq in existing:
        _set_retention(admin, topics.dlq, dlq_retention, timeout)
    if not wanted:
        return created
    for name, future in admin.create_topics(wanted, operation_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise StackError(f"cannot create topic {name}: {exc.args[0].str()}") from None
    log.info("topics_created count=%d", len(created))
    return created


def topic_message_counts(settings: Settings, names: list[str], timeout: float = 10.0) -> dict[str, int]:
    """Messages currently held per topic (high minus low watermark, summed over partitions).

    A topic that does not exist counts as 0.
    """
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap, "group.id": "feedback-stats", "enable.auto.commit": False}
    )
    try:
        metadata = consumer.list_topics(timeout=timeout)
        counts: dict[str, int] = {}
        for name in names:
            topic = metadata.topics.get(name)
            if topic is None or topic.error is not None:
                counts[name] = 0
                continue
            total = 0
            for partition in topic.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(name, partition), timeout=timeout)
                total += max(0, high - low)
            counts[name] = total
        return counts
    finally:
        consumer.close()
