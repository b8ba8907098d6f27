"""The whole gate for one decoded event, as one pure step.

validate → normalize → dedup → rate limit → redact PII → text guard → sample.

State comes in and goes out as values (the agent keeps them in Faust tables):
the subject's token bucket and the dedup entry for the event's key. Each value
remembers the source offset that last changed it, so an event replayed after a
crash (same offset) makes the same decision and changes nothing twice.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pipeline.errors import InvalidEvent
from stream_processors.dedup import dedup_key as _dedup_key
from stream_processors.dedup import keyed_hash
from stream_processors.normalize import normalize
from stream_processors.ratelimit import BucketState, RateLimit, take_token
from stream_processors.redact import guard_text, pseudonymize, redact_event
from stream_processors.sample import keep, sample_rate_for
from stream_processors.validate import Limits, validate

__all__ = [
    "GateConfig",
    "GateResult",
    "SeenEntry",
    "SubjectState",
    "gate_step",
    "rejection_record",
    "subject_key",
    "subject_of",
]

Outcome = Literal["clean", "rejected", "duplicate", "sampled_out"]
_RECENT_REJECTIONS = 256


@dataclass(frozen=True)
class GateConfig:
    limits: Limits = dataclasses.field(default_factory=Limits)
    rate_limit: RateLimit = dataclasses.field(default_factory=lambda: RateLimit.per_minute(60))
    source_limits: Mapping[str, RateLimit] = dataclasses.field(default_factory=dict)
    dedup_window_s: float = 24 * 3600.0
    sample_rates: Mapping[str, float] = dataclasses.field(default_factory=dict)
    allow_text: bool = False
    pseudonym_key: bytes | None = None  # None: user_id kept as sent
    hash_key: bytes = b""  # keys the stored hash and dedup keys (config.hash_key); tests may leave it empty


@dataclass(frozen=True)
class SubjectState:
    """A subject's token bucket, the last offset applied, and recent rate-limited offsets."""

    bucket: BucketState | None = None
    offset: int = -1
    limited: tuple[int, ...] = ()


@dataclass(frozen=True)
class SeenEntry:
    """A dedup key's window end and the offset of the event that opened it."""

    expires_s: float
    offset: int


@dataclass(frozen=True)
class GateResult:
    outcome: Outcome
    event: dict[str, Any] | None = None  # the clean record (Avro form) when outcome == "clean"
    reason: str = ""
    field: str = ""
    rule: str = ""
    subject: str = ""
    subject_state: SubjectState | None = None  # new value to store; None: unchanged
    dedup_key: str = ""
    seen: SeenEntry | None = None  # new value to store; None: unchanged
    redactions: Counter[str] = dataclasses.field(default_factory=Counter)
    text_dropped: bool = False


def subject_of(record: Mapping[str, Any]) -> str:
    """The rate-limit subject, the same precedence as the partition key: user_id, client ip, source."""
    return str(record.get("user_id") or record.get("client_ip") or record["source"])


def subject_key(record: Mapping[str, Any], key: bytes | None) -> str:
    """The rate-limit table's key for ``record``'s subject, keyed with ``key`` (the pseudonym
    key, else the hash key): a user id becomes the same pseudonym as the stored ``user_id``, and a
    client ip or source is keyed the same way, so neither the table nor its compacted changelog
    holds a user id or an IP address in clear. ``None`` (unit tests only): the subject as is."""
    subject = subject_of(record)
    return subject if key is None else pseudonymize(subject, key)


def gate_step(
    record: dict[str, Any],
    *,
    offset: int,
    now: datetime,
    config: GateConfig,
    subject_state: SubjectState | None,
    seen: SeenEntry | None,
    dedup_key: str | None = None,
) -> GateResult:
    """Decide one event. ``now`` is the message's timestamp, so a replay decides the same.
    ``dedup_key``: the event's key as the caller looked ``seen`` up (computed here if None)."""
    now_s = now.timestamp()
    subject = subject_of(record)
    try:
        validate(record, now, config.limits)
        event = normalize(record)
    except InvalidEvent as exc:
        return GateResult("rejected", reason="invalid", field=exc.field, rule=exc.rule, subject=subject)

    key = dedup_key if dedup_key is not None else _dedup_key(event, config.hash_key)
    if seen is not None and now_s < seen.expires_s and seen.offset != offset:
        return GateResult("duplicate", subject=subject, dedup_key=key)

    state = subject_state or SubjectState()
    if offset <= state.offset:
        # Replayed after a crash: the bucket already counted it; repeat the decision made then.
        new_state = None
        allowed = offset not in state.limited
    else:
        limit = config.source_limits.get(record["source"], config.rate_limit)
        bucket, allowed = take_token(state.bucket, now_s, limit)
        limited = state.limited if allowed else (*state.limited[-_RECENT_REJECTIONS + 1 :], offset)
        new_state = SubjectState(bucket, offset, limited)
    if not allowed:
        return GateResult(
            "rejected", reason="rate_limited", rule="over the subject's rate limit", subject=subject,
            subject_state=new_state,
        )  # fmt: skip
    new_seen = seen if seen is not None and seen.offset == offset else SeenEntry(now_s + config.dedup_window_s, offset)

    counts: Counter[str] = Counter()
    event = redact_event(event, counts, pseudonym_key=config.pseudonym_key)
    event["payload"], text_dropped = guard_text(event["payload"], config.allow_text)
    if config.pseudonym_key is not None and event.get("user_id"):
        event["user_id"] = pseudonymize(event["user_id"], config.pseudonym_key)
    event["client_ip"] = None  # used for rate limiting only; never stored downstream in clear
    event["hash"] = keyed_hash(str(event.get("hash") or ""), config.hash_key)  # see dedup.keyed_hash
    event["text_dropped"] = text_dropped

    rate = sample_rate_for(event["type"], config.sample_rates)
    common = {
        "subject": subject, "subject_state": new_state, "dedup_key": key, "seen": new_seen,
        "redactions": counts, "text_dropped": text_dropped,
    }  # fmt: skip
    if not keep(event["event_id"], rate):
        return GateResult("sampled_out", **common)
    event["sample_rate"] = rate
    return GateResult("clean", event=event, **common)


def rejection_record(
    record: Mapping[str, Any], result: GateResult, *, topic: str, partition: int, offset: int, now: datetime,
    hash_key: bytes = b"",
) -> dict[str, Any]:
    """A ``rejected_v1`` record: reason and metadata, never the payload or personal data (its
    ``hash`` is keyed like a clean event's)."""
    ts = record.get("ts")
    return {
        "event_id": str(record.get("event_id", "")),
        "source": str(record.get("source", "")),
        "type": str(record.get("type", "")),
        "ts": ts if isinstance(ts, datetime) else None,
        "hash": keyed_hash(str(record.get("hash", "")), hash_key),
        "reason": result.reason,
        "field": result.field,
        "rule": result.rule[:300],
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "rejected_at": now.astimezone(UTC),
    }
