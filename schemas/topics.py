"""Every Kafka topic the pipeline uses, in one place.

Names carry a version suffix; raw (unredacted) data has a short retention,
state topics are compacted and keyed by what they describe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TOPICS", "TopicSpec", "Topics", "topic_names"]

_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS


@dataclass(frozen=True)
class TopicSpec:
    """A topic's contract: name, key, value schema and broker configuration."""

    name: str
    key: str
    value_schema: str | None
    retention_ms: int | None = None
    compacted: bool = False
    partitions: int | None = None  # None: the settings' default
    extra_config: dict[str, str] = field(default_factory=dict)

    def config(self) -> dict[str, str]:
        """Broker-side topic configuration."""
        cfg: dict[str, str] = {"cleanup.policy": "compact" if self.compacted else "delete"}
        if self.retention_ms is not None:
            cfg["retention.ms"] = str(self.retention_ms)
        if self.compacted:
            # Keep the latest value per key promptly visible to new subscribers.
            cfg["min.compaction.lag.ms"] = "0"
            cfg["segment.ms"] = str(_HOUR_MS)
        cfg.update(self.extra_config)
        return cfg


TOPICS: dict[str, TopicSpec] = {
    spec.name: spec
    for spec in (
        TopicSpec(
            "feedback.raw.v1",
            key="subject: user_id | client ip | source",
            value_schema="feedback_event_v1",  # or null: an erasure marker from `feedback forget`
            # Unredacted: keep only long enough to survive a worker outage.
            retention_ms=1 * _DAY_MS,
        ),
        TopicSpec("feedback.clean.v1", key="subject", value_schema="feedback_event_v1", retention_ms=7 * _DAY_MS),
        TopicSpec("feedback.rejected.v1", key="subject", value_schema=None, retention_ms=7 * _DAY_MS),
        # Dead letters hold raw bytes: as long as the raw topic by default (FEEDBACK_DLQ_RETENTION_HOURS).
        TopicSpec("feedback.dlq.v1", key="original key", value_schema="dead_letter_v1", retention_ms=1 * _DAY_MS),
        # Internal: the gate's per-event decisions for the state agents (JSON, no payload).
        TopicSpec("feedback.outcomes.v1", key="source", value_schema=None, retention_ms=1 * _DAY_MS),
        TopicSpec("feedback.bias-input.v1", key="directive", value_schema=None, retention_ms=1 * _DAY_MS),
        TopicSpec("feedback.directive-bias.v1", key="directive", value_schema=None, compacted=True),
        TopicSpec("feedback.reputation.v1", key="source", value_schema=None, compacted=True),
        # Internal: each clean event's reward items (JSON lists), one message per arm and batch.
        TopicSpec("feedback.rewards-input.v1", key="arm", value_schema=None, retention_ms=1 * _DAY_MS),
        # Reward statistics per arm (model_version|prompt_version[|tag]) for model routers.
        TopicSpec("feedback.rewards.v1", key="arm", value_schema=None, compacted=True),
        TopicSpec("feedback.triage.v1", key="triage id", value_schema=None, compacted=True),
        # `feedback forget`: one record per erased user, keyed by the user's keyed pseudonym (never the
        # id), kept for good (compacted) so `feedback dlq replay` never sends an erased user's events.
        TopicSpec("feedback.erasures.v1", key="user pseudonym", value_schema=None, compacted=True),
        # Every change to the triage queue (enqueue, label, resolve), kept a year for the audit trail.
        TopicSpec("feedback.triage-commands.v1", key="triage id", value_schema=None, retention_ms=365 * _DAY_MS),
        # track(): the context of each interaction, for feedback that arrives later. Compacted
        # (the latest context per id) and deleted after a week; the worker's table keeps what it needs.
        TopicSpec(
            "feedback.interactions.v1",
            key="interaction_id",
            value_schema="interaction_v1",
            retention_ms=7 * _DAY_MS,
            extra_config={"cleanup.policy": "compact,delete"},
        ),
        # Internal: clean events with an interaction_id, re-keyed by it so they meet their
        # interaction's context in the same partition (co-partitioned with the topic above).
        TopicSpec("feedback.enrich.v1", key="interaction_id", value_schema="feedback_event_v1", retention_ms=_DAY_MS),
    )
}


@dataclass(frozen=True)
class Topics:
    """The concrete topic names for one deployment (``prefix`` isolates tests and tenants)."""

    prefix: str = ""

    def name(self, base: str) -> str:
        if base not in TOPICS:
            raise KeyError(f"unknown topic {base!r}; known: {', '.join(TOPICS)}")
        return f"{self.prefix}{base}"

    @property
    def raw(self) -> str:
        return self.name("feedback.raw.v1")

    @property
    def clean(self) -> str:
        return self.name("feedback.clean.v1")

    @property
    def rejected(self) -> str:
        return self.name("feedback.rejected.v1")

    @property
    def dlq(self) -> str:
        return self.name("feedback.dlq.v1")

    @property
    def outcomes(self) -> str:
        return self.name("feedback.outcomes.v1")

    @property
    def bias_input(self) -> str:
        return self.name("feedback.bias-input.v1")

    @property
    def directive_bias(self) -> str:
        return self.name("feedback.directive-bias.v1")

    @property
    def reputation(self) -> str:
        return self.name("feedback.reputation.v1")

    @property
    def rewards_input(self) -> str:
        return self.name("feedback.rewards-input.v1")

    @property
    def rewards(self) -> str:
        return self.name("feedback.rewards.v1")

    @property
    def triage(self) -> str:
        return self.name("feedback.triage.v1")

    @property
    def triage_commands(self) -> str:
        return self.name("feedback.triage-commands.v1")

    @property
    def interactions(self) -> str:
        return self.name("feedback.interactions.v1")

    @property
    def erasures(self) -> str:
        return self.name("feedback.erasures.v1")

    @property
    def enrich(self) -> str:
        return self.name("feedback.enrich.v1")

    def specs(self) -> dict[str, TopicSpec]:
        """Concrete name → spec for every topic."""
        return {self.name(base): spec for base, spec in TOPICS.items()}


def topic_names(prefix: str = "") -> list[str]:
    """All concrete topic names for ``prefix``."""
    return list(Topics(prefix).specs())
