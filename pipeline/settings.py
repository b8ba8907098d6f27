"""One frozen settings object for every process; nothing else reads ``os.environ``.

Every field can be set with an environment variable named ``FEEDBACK_<FIELD>``
(for example ``FEEDBACK_BOOTSTRAP_SERVERS``). ``FEEDBACK_PATH`` is the folder
for the daily JSONL files, as in the original spec.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.errors import ConfigError

__all__ = ["Settings", "get_settings"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Settings shared by the CLI, the producers, the worker and the sinks."""

    model_config = SettingsConfigDict(env_prefix="FEEDBACK_", frozen=True, extra="ignore")

    # --- Kafka -------------------------------------------------------------
    bootstrap_servers: str | None = Field(
        default=None,
        description="Kafka bootstrap servers of an existing cluster. Unset: the local broker.",
    )
    kafka_port: int = Field(default=9092, ge=1, le=65535, description="Local broker port.")
    kafka_controller_port: int = Field(default=9093, ge=1, le=65535)
    topic_prefix: str = Field(default="", description="Prepended to every topic name (isolates tests and tenants).")
    topic_partitions: int = Field(default=6, ge=1, le=1024)
    schema_registry_url: str | None = Field(
        default=None, description="Confluent Schema Registry URL; unset: single-object encoding."
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

    # --- logging -----------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = False

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_topic_safe(cls, value: str) -> str:
        if value and not all(c.isalnum() or c in "._-" for c in value):
            raise ValueError("may contain only letters, digits, '.', '_' and '-'")
        return value

    def to_env(self) -> dict[str, str]:
        """These settings as ``FEEDBACK_*`` variables, to hand to a child process."""
        return {
            f"FEEDBACK_{name.upper()}": str(value) for name, value in self.model_dump().items() if value is not None
        }

    @property
    def kafka_bootstrap(self) -> str:
        """The bootstrap servers every Kafka client uses."""
        return self.bootstrap_servers or f"127.0.0.1:{self.kafka_port}"

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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings. Raises :class:`ConfigError` naming the bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"FEEDBACK_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None
