"""The whole gate for one decoded event, as one pure step.

validate → normalize → dedup → rate limit → redact PII → text guard → sample → revision.

State comes in and goes out as values (the agent keeps them in Faust tables):
the subject's token bucket, the dedup entry for the event's resend key and, for an
explicit signal on an interaction, the entry of its opinion (the latest revision).
Each value remembers the source positions that changed it, so an event replayed
after a crash makes the same decision and changes nothing twice.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

from pipeline.errors import InvalidEvent
from schemas.avro_binary import micros
from stream_processors.dedup import client_pseudonym, keyed_hash
from stream_processors.dedup import dedup_key as _dedup_key
from stream_processors.dedup import opinion_key as _opinion_key
from stream_processors.normalize import normalize
from stream_processors.ratelimit import BucketState, RateLimit, take_token
from stream_processors.redact import guard_text, pseudonymize, redact_event
from stream_processors.sample import keep, sample_rate_for
from stream_processors.validate import Limits, validate

__all__ = [
    "GateConfig",
    "GateResult",
    "OpinionEntry",
    "SeenEntry",
    "SubjectState",
    "gate_step",
    "opinion_from_json",
    "opinion_step",
    "opinion_to_json",
    "rejection_record",
    "subject_key",
    "subject_of",
]

Outcome = Literal["clean", "rejected", "duplicate", "sampled_out"]
_RECENT_REJECTIONS = 256
_RECENT_REVISIONS = 8  # decisions an opinion entry remembers, so a replayed batch repeats them
#: Payload keys only the stream sets (a producer's own value is removed): see :func:`opinion_step`.
STREAM_KEYS = frozenset({"supersedes", "superseded_by", "rater"})


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


class OpinionEntry(NamedTuple):
    """An opinion's latest revision (its ts in µs since the epoch, then its event id, orders them),
    when the entry ends, and the last decisions taken: (position, supersedes, superseded_by).
    A NamedTuple: built once per explicit signal on the hot path, at a third of a dataclass's cost."""

    expires_s: float
    ts_us: int
    event_id: str
    decisions: tuple[tuple[int, str, str], ...] = ()


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
    opinion_key: str = ""  # set for an explicit signal on an interaction
    opinion: OpinionEntry | None = None  # new value to store under opinion_key; None: unchanged
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
    opinion: OpinionEntry | None = None,
    opinion_key: str | None = None,
) -> GateResult:
    """Decide one event. ``now`` is the message's timestamp, so a replay decides the same.
    ``dedup_key``: the event's resend key as the caller looked ``seen`` up (computed here if None);
    ``opinion_key`` likewise for ``opinion`` ("" for an event that revises no opinion)."""
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
        return GateResult("sampled_out", **common)  # not landed: it revises no opinion
    event["sample_rate"] = rate
    extra = event["payload"].get("extra") or {}
    okey = _opinion_key(record, config.hash_key) if opinion_key is None else opinion_key
    if not okey and STREAM_KEYS.isdisjoint(extra):
        return GateResult("clean", event=event, **common)
    extra = dict(extra) if STREAM_KEYS.isdisjoint(extra) else {k: v for k, v in extra.items() if k not in STREAM_KEYS}
    new_opinion = None
    if okey:
        ts = event["ts"]  # decoded: a datetime; a record built in Python: µs since the epoch
        ts_us = ts if isinstance(ts, int) else micros(ts)
        new_opinion, supersedes, superseded_by = opinion_step(
            opinion, offset, now_s, ts_us, event["event_id"], config.dedup_window_s
        )
        if supersedes:
            extra["supersedes"] = supersedes
        if superseded_by:
            extra["superseded_by"] = superseded_by
        if event.get("user_id") and config.pseudonym_key is None:
            extra["rater"] = pseudonymize(record["user_id"], config.hash_key)  # never the id in clear
        elif not event.get("user_id") and not event.get("session_id"):
            extra["rater"] = client_pseudonym(record, config.hash_key)
    event["payload"] = {**event["payload"], "extra": extra}
    return GateResult("clean", event=event, opinion_key=okey or "", opinion=new_opinion, **common)


def opinion_step(
    entry: OpinionEntry | None, position: int, now_s: float, ts_us: int, event_id: str, window_s: float
) -> tuple[OpinionEntry | None, str, str]:
    """One landed explicit signal against its opinion's entry: returns (new entry or None when
    unchanged, the event id it supersedes or "", the event id it is superseded by or "").

    Revisions are ordered by event time (ts, then event id): the newest is current. A signal newer
    than the entry's latest supersedes it and becomes the latest; one older (it arrived late) is
    kept in the history but superseded by the latest, and supersedes nothing. An entry ends
    ``window_s`` after its latest revision arrived; after that a signal starts the opinion afresh.
    A position the entry has decided before (a replay) gets the same answer and changes nothing.
    """
    if entry is not None:
        for decided, supersedes, superseded_by in entry.decisions:
            if decided == position:
                return None, supersedes, superseded_by
    live = entry if entry is not None and now_s < entry.expires_s else None
    if live is None or (ts_us, event_id) > (live.ts_us, live.event_id):
        supersedes = "" if live is None or live.event_id == event_id else live.event_id
        superseded_by = ""
        expires_s, latest_ts, latest_id = now_s + window_s, ts_us, event_id
    else:
        supersedes, superseded_by = "", ("" if live.event_id == event_id else live.event_id)
        expires_s, latest_ts, latest_id = live.expires_s, live.ts_us, live.event_id
    decisions = (() if entry is None else entry.decisions[-_RECENT_REVISIONS + 1 :]) + (
        (position, supersedes, superseded_by),
    )
    return OpinionEntry(expires_s, latest_ts, latest_id, decisions), supersedes, superseded_by


def opinion_to_json(entry: OpinionEntry, partition: int) -> dict[str, Any]:
    """The dedup table's value for an opinion key (``expires_s`` and ``partition`` as for a resend
    key, so the expiry sweep treats both alike)."""
    return {
        "expires_s": entry.expires_s, "ts_us": entry.ts_us, "id": entry.event_id,
        "decisions": [list(d) for d in entry.decisions], "partition": partition,
    }  # fmt: skip


def opinion_from_json(value: Mapping[str, Any] | None) -> OpinionEntry | None:
    if value is None or "ts_us" not in value:  # an entry of the rule before revisions: none
        return None
    return OpinionEntry(value["expires_s"], value["ts_us"], value["id"], tuple(tuple(d) for d in value["decisions"]))


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
