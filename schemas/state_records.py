"""The records on the compacted state topics, for publishers and subscribers alike.

``feedback.directive-bias.v1`` — key: the directive, or ``directive|model_version``
when bias is scoped by model version; value: JSON :class:`BiasRecord`.

``feedback.reputation.v1`` — key: the source; value: JSON :class:`ReputationRecord`.

Values are compact JSON (UTF-8) so consumers in any language can read them
without the Avro toolchain. A record's ``value``/``score`` is the state as of
``updated_at`` (event time); a bias decays from there with ``half_life_s``, so a
subscriber can compute the bias at any later moment with :meth:`BiasRecord.at`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = [
    "SCOPE_SEPARATOR",
    "BiasRecord",
    "ReputationRecord",
    "bias_key",
    "decode_bias",
    "decode_reputation",
    "encode_record",
    "split_bias_key",
]

SCOPE_SEPARATOR = "|"


def bias_key(directive: str, model_version: str | None = None) -> str:
    """The topic key for a directive, optionally scoped by model version."""
    return directive if not model_version else f"{directive}{SCOPE_SEPARATOR}{model_version}"


def split_bias_key(key: str) -> tuple[str, str | None]:
    """``(directive, model_version or None)`` for a topic key."""
    directive, _, model = key.partition(SCOPE_SEPARATOR)
    return directive, model or None


@dataclass(frozen=True)
class BiasRecord:
    directive: str
    model_version: str | None
    value: float  # in [0, 1], as of updated_s
    updated_s: float  # event time (Unix seconds) of the last event applied
    half_life_s: float
    events: int  # events applied so far

    @property
    def key(self) -> str:
        return bias_key(self.directive, self.model_version)

    @property
    def updated_at(self) -> datetime:
        return datetime.fromtimestamp(self.updated_s, UTC)

    def at(self, when: datetime | float) -> float:
        """The bias decayed to ``when`` (a datetime or Unix seconds); never above ``value``."""
        when_s = when.timestamp() if isinstance(when, datetime) else float(when)
        elapsed = max(0.0, when_s - self.updated_s)
        return self.value * 0.5 ** (elapsed / self.half_life_s)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "key": self.key, "updated_at": self.updated_at.isoformat()}


@dataclass(frozen=True)
class ReputationRecord:
    source: str
    score: float  # EWMA in [0, 1]
    observations: int
    downweighted: bool  # should_downweight(): under the threshold after the minimum observations
    weight: float  # what this source's events weigh in the directive bias

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def encode_record(record: BiasRecord | ReputationRecord) -> bytes:
    return orjson.dumps(asdict(record))


def decode_bias(value: bytes) -> BiasRecord:
    """A :class:`BiasRecord` from a topic value; raises ``ValueError`` on anything else."""
    try:
        data = orjson.loads(value)
        return BiasRecord(
            directive=str(data["directive"]),
            model_version=data.get("model_version"),
            value=float(data["value"]),
            updated_s=float(data["updated_s"]),
            half_life_s=float(data["half_life_s"]),
            events=int(data["events"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a directive-bias record: {type(exc).__name__}") from None


def decode_reputation(value: bytes) -> ReputationRecord:
    """A :class:`ReputationRecord` from a topic value; raises ``ValueError`` on anything else."""
    try:
        data = orjson.loads(value)
        return ReputationRecord(
            source=str(data["source"]),
            score=float(data["score"]),
            observations=int(data["observations"]),
            downweighted=bool(data["downweighted"]),
            weight=float(data["weight"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a reputation record: {type(exc).__name__}") from None
