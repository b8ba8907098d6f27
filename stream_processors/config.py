"""The pure stages' configuration, built from :class:`~pipeline.settings.Settings`."""

from __future__ import annotations

import secrets
from datetime import timedelta
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.settings import Settings, local_secret
from stream_processors.gate_step import GateConfig
from stream_processors.ratelimit import RateLimit
from stream_processors.reputation import ReputationPolicy
from stream_processors.rewards import RewardConfig
from stream_processors.state_steps import BiasConfig
from stream_processors.triage import TriageRules
from stream_processors.validate import Limits

__all__ = [
    "bias_config",
    "gate_config",
    "hash_key",
    "pseudonym_key",
    "reputation_policy",
    "reward_config",
    "triage_rules",
]

PSEUDONYM_KEY_FILE = "pseudonym.key"


def pseudonym_key(settings: Settings) -> bytes | None:
    """The HMAC key for user_id pseudonyms; None when pseudonymization is off (see :func:`hash_key`)."""
    if not settings.pseudonymize_user_id:
        return None
    return hash_key(settings)


def hash_key(settings: Settings) -> bytes:
    """The worker's secret HMAC key: user_id pseudonyms, the stored content hashes and the dedup
    table's keys are all keyed with it, so no stored value is a plain hash of raw content or ids.

    With the local stack and no key set, a random key is generated once and kept in
    ``state_dir`` (mode 0600), so pseudonyms and hashes stay stable across restarts. Against a
    real cluster the key must be set: workers on different machines must agree.
    """
    if settings.pseudonym_key is not None:
        key = settings.pseudonym_key.get_secret_value().encode()
        if len(key) < 16:
            raise ConfigError("FEEDBACK_PSEUDONYM_KEY: must be at least 16 characters")
        return key
    if not settings.uses_local_kafka:
        raise ConfigError(
            "FEEDBACK_PSEUDONYM_KEY: required with an external Kafka cluster, so every worker derives the same "
            "pseudonyms, stored content hashes and dedup keys"
        )
    return _local_key(Path(settings.state_dir) / PSEUDONYM_KEY_FILE)


def _local_key(path: Path) -> bytes:
    """Read the key file, creating it first if absent (see :func:`pipeline.settings.local_secret`)."""
    return local_secret(path, lambda: secrets.token_hex(32)).encode()


def gate_config(settings: Settings) -> GateConfig:
    burst = settings.rate_limit_burst
    return GateConfig(
        limits=Limits(
            max_payload_bytes=settings.max_payload_bytes,
            max_text_chars=settings.max_text_chars,
            max_future=timedelta(seconds=settings.max_future_s),
            max_age=timedelta(days=settings.max_age_days),
        ),
        rate_limit=RateLimit.per_minute(settings.rate_limit_per_minute, burst),
        # An override's burst is its own per-minute rate.
        source_limits={source: RateLimit.per_minute(rate) for source, rate in settings.rate_limit_overrides.items()},
        dedup_window_s=settings.dedup_window_s,
        sample_rates=dict(settings.sample_rates),
        allow_text=settings.allow_text,
        pseudonym_key=pseudonym_key(settings),
        hash_key=hash_key(settings),
    )


def triage_rules(settings: Settings) -> TriageRules:
    return TriageRules(
        types=frozenset(settings.triage_types),
        min_severity=None if settings.triage_min_severity == "off" else settings.triage_min_severity,
        noise_labels=frozenset(settings.triage_noise_labels),
    )


def reputation_policy(settings: Settings) -> ReputationPolicy:
    return ReputationPolicy(
        alpha=settings.reputation_alpha,
        threshold=settings.reputation_threshold,
        min_observations=settings.reputation_min_observations,
    )


def bias_config(settings: Settings) -> BiasConfig:
    return BiasConfig(
        step=settings.bias_step,
        half_life_s=settings.bias_half_life_s,
        directives=dict(settings.bias_directives),
        by_model_version=settings.bias_by_model_version,
    )


def reward_config(settings: Settings) -> RewardConfig:
    return RewardConfig(
        half_life_s=settings.rewards_half_life_s,
        prior_alpha=settings.rewards_prior_alpha,
        prior_beta=settings.rewards_prior_beta,
        context_tags=tuple(settings.rewards_context_tags),
    )
