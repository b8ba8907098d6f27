"""One frozen settings object for every process; nothing else reads ``os.environ``.

Every field can be set with an environment variable named ``FEEDBACK_<FIELD>``
(for example ``FEEDBACK_BOOTSTRAP_SERVERS``). ``FEEDBACK_PATH`` is the folder
for the daily JSONL files, as in the original spec.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Literal

import orjson
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.errors import ConfigError
from stream_processors.bias import DEFAULT_DIRECTIVES

__all__ = ["Settings", "get_settings"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Settings shared by the CLI, the producers, the worker and the sinks."""

    model_config = SettingsConfigDict(env_prefix="FEEDBACK_", frozen=True, extra="ignore", populate_by_name=True)

    # --- Kafka -------------------------------------------------------------
    bootstrap_servers: str | None = Field(
        default=None,
        description="Kafka bootstrap servers of an existing cluster. Unset: the local broker.",
    )
    kafka_port: int = Field(default=9092, ge=1, le=65535, description="Local broker port.")
    kafka_controller_port: int = Field(default=9093, ge=1, le=65535)
    kafka_brokers: int = Field(
        default=1,
        ge=1,
        le=5,
        description="Local brokers `feedback up` runs (`--brokers`), each a KRaft broker and controller; broker "
        "n (from 0) listens on FEEDBACK_KAFKA_PORT + 2n, its controller on FEEDBACK_KAFKA_CONTROLLER_PORT + 2n.",
    )
    topic_replication_factor: int | None = Field(
        default=None,
        ge=1,
        description="Replicas of each topic the pipeline creates. Unset: min(3, FEEDBACK_KAFKA_BROKERS) with the "
        "local stack, the cluster's default.replication.factor with FEEDBACK_BOOTSTRAP_SERVERS.",
    )
    topic_min_insync_replicas: int | None = Field(
        default=None,
        ge=1,
        description="min.insync.replicas of those topics: acks=all writes fail below it. Unset: the replication "
        "factor minus one (at least 1) with the local stack, the cluster's default otherwise.",
    )
    topic_prefix: str = Field(default="", description="Prepended to every topic name (isolates tests and tenants).")
    topic_partitions: int = Field(default=6, ge=1, le=1024)
    schema_registry_url: str | None = Field(
        default=None, description="Confluent Schema Registry URL; unset: single-object encoding."
    )
    envelopes: bool = Field(
        default=True,
        description="Bulk producers (emit_many, the gateway's batch endpoint) publish one envelope of many events "
        "per partition. Off: one message per event, for a worker that does not read envelopes yet.",
    )

    # --- ClickHouse --------------------------------------------------------
    clickhouse_url: str | None = Field(
        default=None,
        description="URL of a real ClickHouse server. Unset: the embedded chDB server.",
    )
    clickhouse_port: int = Field(default=8123, ge=1, le=65535, description="Embedded server port.")
    clickhouse_database: str = "feedback"
    clickhouse_user: str = "default"
    clickhouse_password: str = ""
    clickhouse_retention_days: int = Field(
        default=90, ge=0, description="TTL of feedback_events and the other event tables (0: keep forever)."
    )
    clickhouse_cluster: str | None = Field(
        default=None, description="Cluster name: tables become Replicated* with ON CLUSTER DDL. Unset: one server."
    )

    # --- files and state ---------------------------------------------------
    state_dir: Path = Field(
        default=PROJECT_ROOT / ".local",
        description="Local stack data, logs and jars (Kafka log dirs, chDB data).",
    )
    path: Path = Field(
        default=PROJECT_ROOT / ".local" / "feedback",
        description="Folder of the daily JSONL files (FEEDBACK_PATH).",
    )

    # --- worker and sink ---------------------------------------------------
    worker_id: str = "feedback-gate"
    worker_web_port: int = Field(default=6066, ge=1, le=65535)
    sink_group: str = "feedback-sink"
    sink_batch_rows: int = Field(default=50_000, ge=1)
    sink_batch_ms: int = Field(default=500, ge=1)
    sink_idle_ms: int = Field(
        default=50,
        ge=0,
        description="A sink batch with rows is written once nothing new arrived for this long (0: wait the whole "
        "FEEDBACK_SINK_BATCH_MS).",
    )
    sink_side_batch_ms: int = Field(
        default=2000,
        ge=1,
        description="The longest batch of the side-table sinks (rejected, dead letters, state history, triage, "
        "interactions); feedback_events and the JSONL files keep FEEDBACK_SINK_BATCH_MS.",
    )
    sink_side_idle_ms: int = Field(
        default=500,
        ge=0,
        description="A side-table sink's batch with rows is written once nothing new arrived for this long.",
    )
    jsonl_compress_after_days: int = Field(
        default=1,
        ge=0,
        description="Gzip a day's JSONL file once it is this many days old (late events: a new member).",
    )
    jsonl_retention_days: int = Field(default=90, ge=0, description="Delete JSONL days older than this (0: keep).")
    jsonl_compress_quiet_s: float = Field(
        default=3600.0, ge=0, description="Gzip a closed day only once its file has not been written for this long."
    )
    jsonl_housekeeping_interval_s: float = Field(
        default=300.0, gt=0, description="How often the JSONL sink compresses and expires days (and on start)."
    )

    worker_metrics_port: int = Field(
        default=9108, ge=0, le=65535, description="Prometheus endpoint of the worker on 127.0.0.1 (0: off)."
    )
    kafka_session_timeout_s: float = Field(
        default=30.0,
        ge=6,
        le=300,
        description="Consumer group session timeout: how soon a dead worker's partitions move.",
    )
    table_store: Literal["rocksdb", "memory"] = Field(
        default="rocksdb", description="Faust table store; the changelogs in Kafka are the source of truth."
    )
    table_memory_mb: int = Field(
        default=128,
        ge=16,
        description="RocksDB memory for all of a worker's tables together: one block cache, which also "
        "accounts for the write buffers (memtables).",
    )

    # --- the HTTP gateway --------------------------------------------------
    internal_tokens: SecretStr = Field(
        default=SecretStr(""), description="Comma-separated X-Internal-Token values the gateway accepts (rotation)."
    )
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8080, ge=1, le=65535)
    gateway_max_body_bytes: int = Field(default=256 * 1024, ge=1024, description="Single-event body limit (413).")
    gateway_max_batch_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, description="Batch body limit (413).")
    gateway_max_batch: int = Field(default=1000, ge=1, description="Events per batch request.")
    gateway_publish_timeout_s: float = Field(
        default=10.0, gt=0, description="How long to wait for Kafka's acknowledgement before answering 503."
    )
    trusted_proxies: str = Field(
        default="",
        description="Comma-separated addresses or networks (CIDR) of proxies whose requests may name the "
        "client in the body (`client_ip`); from any other peer, the peer's address is the rate-limit subject.",
    )

    # --- the gate ----------------------------------------------------------
    allow_text: bool = Field(
        default=False,
        validation_alias=AliasChoices("FEEDBACK_ALLOW_TEXT", "ALLOW_TEXT"),
        description="Keep free text: payload.text and free-text map keys such as prompt/response "
        "(ALLOW_TEXT is accepted too). Off: they are dropped and the event says so.",
    )
    rate_limit_per_minute: float = Field(default=60.0, gt=0, description="Token-bucket rate per subject.")
    rate_limit_burst: float | None = Field(default=None, ge=1, description="Bucket size; unset: the per-minute rate.")
    rate_limit_overrides: dict[str, float] = Field(
        default_factory=dict, description='Per-source events per minute, JSON: {"oracle": 600}.'
    )
    dedup_window_s: float = Field(default=24 * 3600.0, gt=0, description="How long a dedup key is remembered.")
    dlq_retention_hours: float = Field(
        default=24.0,
        gt=0,
        description="How long dead letters stay in Kafka. They hold the raw, unredacted bytes, so by default "
        "no longer than the raw topic (1 day). `feedback up` and the worker apply it to an existing topic too.",
    )
    rate_limit_idle_s: float = Field(
        default=3600.0,
        gt=0,
        description="A rate-limit bucket untouched this long (by event time; at least its full refill time) "
        "is swept from the table.",
    )
    interaction_ttl_s: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description="How long after track() feedback is enriched with the interaction's context; later: 'expired'.",
    )
    interaction_index: bool = Field(
        default=True,
        description="The worker indexes tracked interaction ids, and feedback naming an interaction that was "
        "never tracked goes straight to the clean topic instead of through the enrich join.",
    )
    interaction_index_capacity: int = Field(
        default=2_000_000,
        ge=1000,
        description="Interaction ids per Bloom generation of that index (1% false positives, ~1.2 MB per "
        "million; past it, more feedback takes the join, never less).",
    )
    interaction_index_wait_ms: float = Field(
        default=200.0,
        ge=0,
        description="How long a gate batch may wait for the interaction index to read as far as its freshest "
        "feedback; what it cannot decide by then takes the enrich join.",
    )
    interaction_clock_skew_ms: float = Field(
        default=50.0,
        ge=0,
        description="How far producers' clocks may lag the worker's: feedback whose Kafka timestamp is not "
        "at least this far behind what the interaction index has read takes the enrich join.",
    )
    sample_rates: dict[str, float] = Field(
        default_factory=dict, description='Per-type keep rate in [0, 1], JSON: {"implicit": 0.1}. Default 1.0.'
    )
    pseudonymize_user_id: bool = Field(default=True, description="Replace user_id by a keyed HMAC downstream.")
    pseudonym_key: SecretStr | None = Field(
        default=None,
        description="HMAC key for user_id pseudonyms. Unset with the local stack: generated once under state_dir.",
    )
    max_payload_bytes: int = Field(default=64 * 1024, ge=1)
    max_text_chars: int = Field(default=32 * 1024, ge=1)
    max_future_s: float = Field(default=300.0, ge=0, description="How far ahead of arrival an event's ts may be.")
    max_age_days: float = Field(default=90.0, gt=0, description="Older events are rejected (the retention).")

    # --- state: directive bias and reputation -------------------------------
    bias_half_life_s: float = Field(default=3600.0, gt=0)
    bias_step: float = Field(default=0.1, gt=0, le=1, description="Raise per event before severity and reputation.")
    bias_directives: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_DIRECTIVES), description="Feedback type → directive, JSON."
    )
    bias_by_model_version: bool = Field(default=False, description="Scope directive bias by model_version.")
    bias_publish_interval_s: float = Field(
        default=0.5, ge=0, description="At most one published update per key per interval."
    )
    reputation_alpha: float = Field(default=0.05, gt=0, le=1)
    reputation_threshold: float = Field(default=0.5, ge=0, le=1)
    reputation_min_observations: int = Field(default=20, ge=1)

    # --- rewards for model routers ---------------------------------------------
    rewards_half_life_s: float = Field(
        default=86_400.0, gt=0, description="An arm's reward evidence halves over this much event time."
    )
    rewards_prior_alpha: float = Field(default=1.0, gt=0, description="Every arm's Beta prior: pseudo-successes.")
    rewards_prior_beta: float = Field(default=1.0, gt=0, description="Every arm's Beta prior: pseudo-failures.")
    rewards_context_tags: list[str] = Field(
        default_factory=list,
        description='Tags that also make a context arm, JSON: ["math", "lang:*"] (a trailing * makes a prefix).',
    )

    # --- the triage queue ----------------------------------------------------
    triage_types: list[str] = Field(
        default_factory=lambda: ["veto", "safety", "bad_output", "correction"],
        description='Event types that always need a human, JSON: ["veto", "safety"].',
    )
    triage_min_severity: Literal["debug", "info", "warn", "error", "critical", "off"] = Field(
        default="warn", description="Events this severe or worse are triaged too ('off': by type only)."
    )
    triage_noise_labels: list[str] = Field(
        default_factory=lambda: ["noise"], description="Labels that count against the source's reputation."
    )

    # --- insights and suggestions --------------------------------------------
    suggest_text_hook: str | None = Field(
        default=None,
        description="`feedback suggest`: an importable callable, module:function, that gets the suggestions' "
        "aggregates (never event text) and returns a summary. Unset: rules only.",
    )

    # --- logging -----------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = False

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_topic_safe(cls, value: str) -> str:
        if value and not all(c.isalnum() or c in "._-" for c in value):
            raise ValueError("may contain only letters, digits, '.', '_' and '-'")
        return value

    @field_validator("sample_rates")
    @classmethod
    def _rates_are_probabilities(cls, value: dict[str, float]) -> dict[str, float]:
        for event_type, rate in value.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"rate for {event_type!r} must be in [0, 1], got {rate}")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, value: str) -> str:
        for entry in (e.strip() for e in value.split(",")):
            if entry:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(f"{entry!r} is not an IP address or network (e.g. 10.0.0.5, 10.0.0.0/8)") from None
        return value

    @field_validator("rate_limit_overrides")
    @classmethod
    def _overrides_are_positive(cls, value: dict[str, float]) -> dict[str, float]:
        for source, rate in value.items():
            if rate <= 0:
                raise ValueError(f"rate for source {source!r} must be > 0, got {rate}")
        return value

    @field_validator("rewards_context_tags")
    @classmethod
    def _context_tags_are_names_or_prefixes(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not entry.strip() or "*" in entry[:-1]:
                raise ValueError(f"{entry!r}: each entry is a tag name, or a prefix ending in one '*' (e.g. lang:*)")
        return value

    @model_validator(mode="after")
    def _local_cluster_fits(self) -> Settings:
        ports = [port for node in range(self.kafka_brokers) for port in self.kafka_node_ports(node)]
        if self.kafka_brokers > 1 and (len(set(ports)) != len(ports) or max(ports) > 65535):
            raise ValueError(
                f"FEEDBACK_KAFKA_PORT {self.kafka_port} and FEEDBACK_KAFKA_CONTROLLER_PORT "
                f"{self.kafka_controller_port} give {self.kafka_brokers} brokers overlapping or out-of-range ports "
                f"{ports}: each broker n takes both plus 2n, so choose two ports that differ by an odd number"
            )
        rf, isr = self.topic_replication_factor, self.topic_min_insync_replicas
        if rf is not None and isr is not None and isr > rf:
            raise ValueError(
                f"FEEDBACK_TOPIC_MIN_INSYNC_REPLICAS {isr} is above FEEDBACK_TOPIC_REPLICATION_FACTOR {rf}: "
                "no write could ever succeed"
            )
        return self

    def kafka_node_ports(self, node: int) -> tuple[int, int]:
        """(client port, controller port) of local broker ``node`` (0-based): both settings plus 2·node,
        so every process computes the same layout without reading the state folder."""
        return self.kafka_port + 2 * node, self.kafka_controller_port + 2 * node

    def to_env(self) -> dict[str, str]:
        """These settings as ``FEEDBACK_*`` variables, to hand to a child process."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            structured = isinstance(value, dict | list)
            env[f"FEEDBACK_{name.upper()}"] = orjson.dumps(value).decode() if structured else str(value)
        return env

    @property
    def kafka_bootstrap(self) -> str:
        """The bootstrap servers every Kafka client uses."""
        if self.bootstrap_servers:
            return self.bootstrap_servers
        return ",".join(f"127.0.0.1:{self.kafka_node_ports(n)[0]}" for n in range(self.kafka_brokers))

    @property
    def uses_local_kafka(self) -> bool:
        return self.bootstrap_servers is None

    @property
    def clickhouse_endpoint(self) -> str:
        """The HTTP URL every ClickHouse client uses."""
        return self.clickhouse_url or f"http://127.0.0.1:{self.clickhouse_port}"

    @property
    def uses_embedded_clickhouse(self) -> bool:
        return self.clickhouse_url is None

    @property
    def clickhouse_password_file(self) -> Path:
        """Where the embedded ClickHouse server's password is kept (mode 0600)."""
        return Path(self.state_dir) / "clickhouse" / "password"

    def clickhouse_secret(self) -> str:
        """The password every ClickHouse client sends.

        ``FEEDBACK_CLICKHOUSE_PASSWORD`` when set. Otherwise, with the embedded server, the one
        in :attr:`clickhouse_password_file`, generated there on first use (by the server's
        launcher or by whichever client comes first; concurrent first uses agree).
        """
        if self.clickhouse_password or not self.uses_embedded_clickhouse:
            return self.clickhouse_password
        return local_secret(self.clickhouse_password_file, lambda: secrets.token_urlsafe(24))


def local_secret(path: Path, generate: Callable[[], str]) -> str:
    """The secret in ``path``, created first from ``generate()`` if absent (0600, atomically:
    the first writer wins, so concurrent processes agree). The ClickHouse password and the
    worker's pseudonym/hash key both live in such files."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(generate() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # fails if another process won the race; then use theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def _env_name(loc: tuple[int | str, ...]) -> str:
    name = str(loc[0]).upper() if loc else "?"
    if not name.startswith("FEEDBACK_") and name != "ALLOW_TEXT":
        name = f"FEEDBACK_{name}"
    return "_".join([name, *(str(p).upper() for p in loc[1:])])


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings. Raises :class:`ConfigError` naming the bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{_env_name(err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"invalid settings: {problems}") from None
