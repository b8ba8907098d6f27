"""The state agents' steps, pure: reputation per source, directive bias per directive.

The gate tells the state agents what it decided about each raw event with an
:class:`Outcome` (keyed by source). The reputation step folds it into the
source's EWMA score and, for a kept event whose type feeds a directive, forwards
a :class:`BiasIncrement` (keyed by directive) carrying the source's weight. The
bias step decays and raises the directive's bias.

Effectively-once: every message carries the coordinates of the raw event it
came from. A table value remembers, per origin, the last raw offset it applied
(origin = raw partition for reputation; source and raw partition for bias,
since a directive hears from many sources). Messages from one origin arrive in
raw-offset order, so anything at or below the remembered offset is a replay
and changes nothing. Replays still forward their bias increment: the bias step
drops it if it was applied, and delivers it if the crash lost it.

Table values are plain JSON objects (they live in Faust tables and changelogs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from schemas.state_records import BiasRecord, ReputationRecord, bias_key, split_bias_key
from stream_processors.bias import DEFAULT_DIRECTIVES, BiasState, bias_step, directive_for
from stream_processors.gate_step import SeenEntry, SubjectState
from stream_processors.ratelimit import BucketState
from stream_processors.reputation import ReputationPolicy, ReputationState, reputation_step, should_downweight, weight

__all__ = [
    "BiasConfig",
    "BiasIncrement",
    "Outcome",
    "Throttle",
    "bias_apply",
    "bias_record",
    "reputation_apply",
    "reputation_record",
    "seen_from_json",
    "seen_to_json",
    "subject_from_json",
    "subject_idle",
    "subject_to_json",
]

#: Gate outcomes as the reputation sees them.
REPUTATION_OUTCOMES = {"clean": "accepted", "sampled_out": "accepted", "duplicate": "duplicate"}


@dataclass(frozen=True)
class Outcome:
    """What the gate decided about one raw event (no payload, no personal data)."""

    source: str
    type: str
    severity: str
    outcome: str  # accepted | invalid | duplicate | rate_limited
    kept: bool  # accepted and not sampled out: it reached feedback.clean.v1
    ts_s: float  # event time
    model_version: str | None
    partition: int  # raw partition and offset: the origin
    offset: int
    origin: str = ""  # "": the raw topic; "triage": a noise label (partition/offset of the triage command)

    def to_bytes(self) -> bytes:
        return orjson.dumps(self)  # orjson writes a dataclass as asdict would, without the copy

    @classmethod
    def from_bytes(cls, value: bytes) -> Outcome:
        return cls(**orjson.loads(value))


@dataclass(frozen=True)
class BiasIncrement:
    key: str  # bias_key(directive, model_version?)
    source: str
    severity: str
    weight: float
    ts_s: float
    partition: int
    offset: int

    def to_bytes(self) -> bytes:
        return orjson.dumps(self)  # orjson writes a dataclass as asdict would, without the copy

    @classmethod
    def from_bytes(cls, value: bytes) -> BiasIncrement:
        return cls(**orjson.loads(value))


@dataclass(frozen=True)
class BiasConfig:
    step: float = 0.1
    half_life_s: float = 3600.0
    directives: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_DIRECTIVES))
    by_model_version: bool = False


def _replayed(applied: Mapping[str, int], origin: str, offset: int) -> bool:
    return offset <= applied.get(origin, -1)


def reputation_apply(
    value: Mapping[str, Any] | None, outcome: Outcome, policy: ReputationPolicy, bias: BiasConfig
) -> tuple[dict[str, Any] | None, BiasIncrement | None]:
    """The source's new table value (None: unchanged, a replay) and the bias increment to forward, if any."""
    applied: dict[str, int] = dict((value or {}).get("applied", {}))
    origin = f"{outcome.origin}:{outcome.partition}" if outcome.origin else str(outcome.partition)
    state = ReputationState(value["score"], value["observations"]) if value else None
    new_value: dict[str, Any] | None = None
    if not _replayed(applied, origin, outcome.offset):
        state = reputation_step(state, outcome.outcome, policy)
        applied[origin] = outcome.offset
        new_value = {"score": state.score, "observations": state.observations, "applied": applied}
    increment = None
    directive = directive_for(outcome.type, bias.directives) if outcome.kept else None
    if directive is not None:
        increment = BiasIncrement(
            key=bias_key(directive, outcome.model_version if bias.by_model_version else None),
            source=outcome.source,
            severity=outcome.severity,
            weight=weight(state, policy),
            ts_s=outcome.ts_s,
            partition=outcome.partition,
            offset=outcome.offset,
        )
    return new_value, increment


def bias_apply(value: Mapping[str, Any] | None, inc: BiasIncrement, config: BiasConfig) -> dict[str, Any] | None:
    """The directive's new table value, or None when ``inc`` was applied already."""
    applied: dict[str, int] = dict((value or {}).get("applied", {}))
    origin = f"{inc.source}|{inc.partition}"
    if _replayed(applied, origin, inc.offset):
        return None
    state = BiasState(value["value"], value["updated_s"]) if value else None
    new = bias_step(
        state, inc.ts_s, step=config.step, severity=inc.severity, weight=inc.weight, half_life_s=config.half_life_s
    )
    applied[origin] = inc.offset
    events = (value or {}).get("events", 0) + 1
    return {"value": new.value, "updated_s": new.updated_s, "events": events, "applied": applied}


def bias_record(key: str, value: Mapping[str, Any], config: BiasConfig) -> BiasRecord:
    """The published form of a directive's table value."""
    directive, model_version = split_bias_key(key)
    return BiasRecord(
        directive=directive,
        model_version=model_version,
        value=round(value["value"], 9),
        updated_s=value["updated_s"],
        half_life_s=config.half_life_s,
        events=value["events"],
    )


def reputation_record(source: str, value: Mapping[str, Any], policy: ReputationPolicy) -> ReputationRecord:
    """The published form of a source's table value."""
    state = ReputationState(value["score"], value["observations"])
    return ReputationRecord(
        source=source,
        score=round(state.score, 9),
        observations=state.observations,
        downweighted=should_downweight(state, policy),
        weight=round(weight(state, policy), 9),
    )


class Throttle:
    """Which keys to publish: those changed since their last publish, each at most once per interval."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._dirty: set[str] = set()
        self._last: dict[str, float] = {}

    def mark(self, key: str) -> None:
        self._dirty.add(key)

    def due(self, now: float, *, force: bool = False, known: Iterable[str] = ()) -> list[str]:
        """Keys to publish at ``now`` (monotonic s); ``force``: every ``known`` key too, ignoring the interval."""
        if force:
            keys = self._dirty | set(known)
            self._dirty.clear()
        else:
            keys = {k for k in self._dirty if now - self._last.get(k, float("-inf")) >= self.interval_s}
            self._dirty -= keys
        for key in keys:
            self._last[key] = now
        return sorted(keys)


# --- the gate's table values -----------------------------------------------------
def subject_to_json(state: SubjectState) -> dict[str, Any]:
    bucket = None if state.bucket is None else [state.bucket.tokens, state.bucket.updated_s]
    return {"bucket": bucket, "offset": state.offset, "limited": list(state.limited)}


def subject_idle(value: Mapping[str, Any], now_s: float, idle_s: float) -> bool:
    """Whether a subjects-table entry can be swept: its bucket was last touched ``idle_s`` or more
    before ``now_s`` (so it has long refilled and a new event finds what a missing entry gives)."""
    bucket = value.get("bucket")
    return bucket is not None and now_s - float(bucket[1]) >= idle_s


def subject_from_json(value: Mapping[str, Any] | None) -> SubjectState | None:
    if value is None:
        return None
    bucket = value.get("bucket")
    return SubjectState(
        bucket=None if bucket is None else BucketState(bucket[0], bucket[1]),
        offset=value["offset"],
        limited=tuple(value.get("limited", ())),
    )


def seen_to_json(entry: SeenEntry, partition: int) -> dict[str, Any]:
    # The partition lets the expiry sweep send the tombstone to the right changelog partition.
    return {"expires_s": entry.expires_s, "offset": entry.offset, "partition": partition}


def seen_from_json(value: Mapping[str, Any] | None) -> SeenEntry | None:
    return None if value is None else SeenEntry(value["expires_s"], value["offset"])
