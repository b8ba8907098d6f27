"""Following the compacted state topics: directive bias and source reputation.

``BiasSubscriber`` is the client for stream consumers (model servers, routers)
that steer by directive bias::

    from producers.subscriber import BiasSubscriber

    with BiasSubscriber() as bias:
        bias.snapshot()                      # every directive's latest record
        while serving:
            bias.poll(1.0)                   # take updates as they are published
            grounding = bias.current("increase_grounding")  # decayed to now

It reads the topic from the beginning with no consumer-group state (every
subscriber sees every key), keeps the latest record per key, and forgets a key
on a tombstone.

``RewardSubscriber`` is the client for model routers: each arm's reward posterior from
``feedback.rewards.v1`` (see ``examples/router.py``)::

    from producers.subscriber import RewardSubscriber

    with RewardSubscriber(seed=7) as rewards:
        rewards.snapshot()
        arms = [("m-a", "p-1"), ("m-b", "p-1")]
        while serving:
            rewards.poll(0.0)
            model, prompt, _ = rewards.sample(arms)   # Thompson sampling (or rewards.best(arms))
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Generic, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from pipeline.errors import StackError
from pipeline.settings import Settings, get_settings
from schemas.reward_records import Arm, RewardRecord, decode_reward
from schemas.state_records import (
    BiasRecord,
    ReputationRecord,
    bias_key,
    decode_bias,
    decode_reputation,
)
from schemas.topics import Topics
from schemas.triage_records import TriageItem, decode_item

__all__ = [
    "BiasSubscriber",
    "CompactedTopicReader",
    "RewardSubscriber",
    "read_bias",
    "read_reputation",
    "read_rewards",
    "read_triage",
]

log = logging.getLogger(__name__)

R = TypeVar("R")


class CompactedTopicReader(Generic[R]):
    """The latest decoded value per key of a compacted topic, kept up to date by :meth:`poll`."""

    def __init__(
        self,
        settings: Settings,
        topic: str,
        decode: Callable[[bytes], R],
        on_update: Callable[[str, R | None], None] | None = None,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.decode = decode
        self.on_update = on_update
        self.values: dict[str, R] = {}
        self._consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": f"feedback-reader-{uuid.uuid4().hex[:12]}",  # never committed: no shared state
                "enable.auto.commit": False,
                "enable.partition.eof": False,
            }
        )
        self._partitions: list[TopicPartition] | None = None

    def _unreachable(self, exc: KafkaException) -> StackError:
        return StackError(f"cannot reach Kafka at {self.settings.kafka_bootstrap}: {exc.args[0].str()}")

    def _assign(self, timeout_s: float) -> list[TopicPartition]:
        """Assign every partition from the beginning (once); the topic's partitions."""
        if self._partitions is not None:
            return self._partitions
        try:
            meta = self._consumer.list_topics(self.topic, timeout=timeout_s)
        except KafkaException as exc:
            raise self._unreachable(exc) from None
        topic = meta.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise StackError(
                f"topic {self.topic} not found at {self.settings.kafka_bootstrap}; start the worker (or `feedback up`)"
            )
        partitions = [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in sorted(topic.partitions)]
        self._consumer.assign(partitions)
        self._partitions = partitions
        return partitions

    def apply(self, key: bytes | None, value: bytes | None, where: str = "") -> R | None:
        """Fold one message into :attr:`values`; returns the decoded record (None: removed or skipped)."""
        name = (key or b"").decode("utf-8", "replace")
        if value is None:
            self.values.pop(name, None)
            if self.on_update:
                self.on_update(name, None)
            return None
        try:
            record = self.decode(value)
        except ValueError as exc:
            # Coordinates and the error's kind only: never the payload.
            log.warning("state_record_skipped topic=%s %s reason=%s", self.topic, where, exc)
            return None
        self.values[name] = record
        if self.on_update:
            self.on_update(name, record)
        return record

    def poll(self, timeout_s: float = 1.0, max_messages: int = 1000) -> list[R]:
        """Apply what arrives within ``timeout_s``; returns the new records (tombstones remove keys)."""
        self._assign(max(timeout_s, 5.0))
        out: list[R] = []
        for msg in self._consumer.consume(max_messages, timeout=timeout_s):
            if msg.error():
                continue
            record = self.apply(msg.key(), msg.value(), f"partition={msg.partition()} offset={msg.offset()}")
            if record is not None:
                out.append(record)
        return out

    def snapshot(self, timeout_s: float = 10.0) -> dict[str, R]:
        """Read up to the end of every partition as of now (the high watermarks captured first);
        returns the latest value per key. Raises :class:`StackError` if Kafka or the topic is missing."""
        partitions = self._assign(timeout_s)
        try:
            ends = {
                tp.partition: self._consumer.get_watermark_offsets(
                    TopicPartition(tp.topic, tp.partition), timeout=timeout_s
                )[1]
                for tp in partitions
            }
        except KafkaException as exc:
            raise self._unreachable(exc) from None
        deadline = time.monotonic() + timeout_s

        def behind() -> bool:
            # Positions, not message offsets: a compacted log has gaps.
            try:
                positions = self._consumer.position([TopicPartition(self.topic, p) for p in ends])
            except KafkaException as exc:
                raise self._unreachable(exc) from None
            return any(ends[tp.partition] > 0 and tp.offset < ends[tp.partition] for tp in positions)

        while behind():
            if time.monotonic() > deadline:
                raise StackError(
                    f"timed out reading {self.topic} at {self.settings.kafka_bootstrap} after {timeout_s:g}s"
                )
            for msg in self._consumer.consume(1000, timeout=0.2):
                if not msg.error():
                    self.apply(msg.key(), msg.value(), f"partition={msg.partition()} offset={msg.offset()}")
        return dict(self.values)

    def close(self) -> None:
        self._consumer.close()


class BiasSubscriber:
    """Follows ``feedback.directive-bias.v1``; :meth:`current` gives a directive's bias decayed to now."""

    def __init__(self, settings: Settings | None = None, on_update: Callable[[BiasRecord], None] | None = None) -> None:
        settings = settings or get_settings()

        def notify(_key: str, record: BiasRecord | None) -> None:
            if record is not None and on_update is not None:
                on_update(record)

        self.reader = CompactedTopicReader(settings, Topics(settings.topic_prefix).directive_bias, decode_bias, notify)

    @property
    def records(self) -> dict[str, BiasRecord]:
        return dict(self.reader.values)

    def snapshot(self, timeout_s: float = 10.0) -> dict[str, BiasRecord]:
        return self.reader.snapshot(timeout_s)

    def poll(self, timeout_s: float = 1.0) -> list[BiasRecord]:
        return self.reader.poll(timeout_s)

    def current(self, directive: str, model_version: str | None = None, at: datetime | float | None = None) -> float:
        """The directive's bias at ``at`` (default now), decayed from its last update; 0.0 if unknown."""
        record = self.reader.values.get(bias_key(directive, model_version))
        if record is None:
            return 0.0
        return record.at(datetime.now().astimezone() if at is None else at)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> BiasSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ArmLike = Arm | tuple[str, ...] | str


class RewardSubscriber:
    """Follows ``feedback.rewards.v1``: each arm's Beta posterior of the reward, for routers.

    An arm is an :class:`~schemas.reward_records.Arm`, a tuple ``(model_version,
    prompt_version?, tag?)`` or its topic key. Every read takes ``at`` (datetime or Unix
    seconds; default now): the record decayed from its last update to that moment, so arms
    last heard of at different times are compared at one time, and an arm that stops getting
    feedback drifts back to the prior (more exploration). An arm never heard of is the prior.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        on_update: Callable[[RewardRecord], None] | None = None,
        *,
        seed: int | None = None,
    ) -> None:
        settings = settings or get_settings()

        def notify(_key: str, record: RewardRecord | None) -> None:
            if record is not None and on_update is not None:
                on_update(record)

        self.prior = (settings.rewards_prior_alpha, settings.rewards_prior_beta)
        self.half_life_s = settings.rewards_half_life_s
        self.rng = random.Random(seed)  # Thompson draws: the same seed, the same choices
        self.reader = CompactedTopicReader(settings, Topics(settings.topic_prefix).rewards, decode_reward, notify)

    @property
    def records(self) -> dict[str, RewardRecord]:
        return dict(self.reader.values)

    def snapshot(self, timeout_s: float = 10.0) -> dict[str, RewardRecord]:
        return self.reader.snapshot(timeout_s)

    def poll(self, timeout_s: float = 1.0) -> list[RewardRecord]:
        return self.reader.poll(timeout_s)

    def record(self, arm: ArmLike, at: datetime | float | None = None) -> RewardRecord:
        """The arm's posterior at ``at`` (the prior when the arm was never published)."""
        key = Arm.of(arm)
        record = self.reader.values.get(key.key)
        if record is None:
            alpha, beta = self.prior
            return RewardRecord(*key, alpha, beta, alpha, beta, self.half_life_s, 0.0, 0)
        return record.at(time.time() if at is None else at)

    def mean(self, arm: ArmLike, at: datetime | float | None = None) -> float:
        """The posterior mean reward of ``arm``, in [0, 1]."""
        return self.record(arm, at).mean

    def interval(self, arm: ArmLike, level: float = 0.95, at: datetime | float | None = None) -> tuple[float, float]:
        """The central ``level`` interval of the arm's posterior (see :func:`~schemas.reward_records.beta_interval`)."""
        return self.record(arm, at).interval(level)

    def sample(
        self, arms: Iterable[ArmLike], at: datetime | float | None = None, rng: random.Random | None = None
    ) -> Arm:
        """Thompson sampling: one draw from each arm's posterior; the arm with the highest draw
        (a tie, which has probability zero, goes to the arm listed first). ``rng``: default the
        subscriber's own (seeded with ``seed``)."""
        rng = rng or self.rng
        chosen = [Arm.of(a) for a in arms]
        if not chosen:
            raise ValueError("arms: give at least one arm to choose from")
        records = [self.record(a, at) for a in chosen]
        draws = [rng.betavariate(r.alpha, r.beta) for r in records]
        return chosen[max(range(len(chosen)), key=lambda i: (draws[i], -i))]

    def best(self, arms: Iterable[ArmLike], at: datetime | float | None = None) -> Arm:
        """The arm with the highest posterior mean; on a tie, the one with more evidence
        (weight), then the smallest arm key: the same choice whatever order ``arms`` come in."""
        chosen = [Arm.of(a) for a in arms]
        if not chosen:
            raise ValueError("arms: give at least one arm to choose from")
        records = {a: self.record(a, at) for a in chosen}
        return min(chosen, key=lambda a: (-records[a].mean, -records[a].weight, a.key))

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> RewardSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_all(settings: Settings, topic: str, decode: Callable[[bytes], R], timeout_s: float) -> dict[str, R]:
    reader = CompactedTopicReader(settings, topic, decode)
    try:
        return reader.snapshot(timeout_s)
    finally:
        reader.close()


def read_bias(settings: Settings, timeout_s: float = 10.0) -> dict[str, BiasRecord]:
    """Every directive's latest bias record."""
    return _read_all(settings, Topics(settings.topic_prefix).directive_bias, decode_bias, timeout_s)


def read_reputation(settings: Settings, timeout_s: float = 10.0) -> dict[str, ReputationRecord]:
    """Every source's latest reputation record."""
    return _read_all(settings, Topics(settings.topic_prefix).reputation, decode_reputation, timeout_s)


def read_rewards(settings: Settings, timeout_s: float = 10.0) -> dict[str, RewardRecord]:
    """Every arm's latest reward record, by arm key."""
    return _read_all(settings, Topics(settings.topic_prefix).rewards, decode_reward, timeout_s)


def read_triage(settings: Settings, timeout_s: float = 10.0) -> dict[str, TriageItem]:
    """Every triage item's latest state, by triage id."""
    return _read_all(settings, Topics(settings.topic_prefix).triage, decode_item, timeout_s)
