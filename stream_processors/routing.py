"""Where each decision goes, as pure functions: no Kafka, no Faust, no clock.

The gate decides an event (:func:`~stream_processors.gate_step.gate_step`); these
functions say what it produces:

* a kept event goes to ``feedback.clean.v1`` keyed by its pseudonymized user (else
  its source), or, when it names an interaction that may have been tracked, to
  ``feedback.enrich.v1`` keyed by the interaction id (:func:`route_gate`);
* an event that needs a human also gets a triage ``enqueue`` command;
* a refused event becomes a ``rejected_v1`` row (reason, no payload);
* every decoded event becomes an :class:`~stream_processors.state_steps.Outcome` for
  the reputation agent.

:func:`group_outcomes`, :func:`group_increments` and :func:`group_by_partition` turn a
batch's small records into one message per key (or per partition) instead of one per
event: the agents downstream pay Faust's per-message cost once per group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson

from schemas.envelope import pack_many
from schemas.triage_records import TriageCommand
from stream_processors.gate_step import GateResult, rejection_record
from stream_processors.state_steps import REPUTATION_OUTCOMES, BiasIncrement, Outcome
from stream_processors.triage import TriageRules, enqueue_command, needs_triage

__all__ = [
    "GateRoute",
    "clean_key",
    "decode_list",
    "group_by_partition",
    "group_increments",
    "group_outcomes",
    "route_gate",
]

Target = Literal["clean", "enrich", "rejected", "sampled_out"]


@dataclass(frozen=True)
class GateRoute:
    """What one decided event produces."""

    target: Target
    key: bytes = b""  # clean: the clean key; enrich: the interaction id; rejected: the source
    event: dict[str, Any] | None = None  # clean / enrich: the record to encode
    rejection: dict[str, Any] | None = None  # rejected: the rejected_v1 row
    triage: TriageCommand | None = None
    outcome: Outcome | None = None
    reason: str = ""  # rejected: invalid | duplicate | rate_limited


def clean_key(record: Mapping[str, Any]) -> bytes:
    """The clean topic's key: the (pseudonymized) user id, else the source."""
    return str(record.get("user_id") or record["source"]).encode()


def route_gate(
    record: Mapping[str, Any],
    result: GateResult,
    *,
    topic: str,
    partition: int,
    offset: int,
    position: int,
    envelope: bool,
    now: datetime,
    rules: TriageRules,
    enrich: bool = True,
    hash_key: bytes = b"",
) -> GateRoute:
    """Route one decided event. ``offset`` is the raw message's, ``position`` the event's
    (:func:`schemas.envelope.position`); ``envelope``: the event came in an envelope, so its
    rejection row names its position (one message, many rows). ``enrich``: send events with an
    ``interaction_id`` through the join (False: no interaction can have been tracked)."""
    source, etype = str(record["source"]), str(record["type"])
    outcome = Outcome(
        source=source,
        type=etype,
        severity=str(record.get("severity") or "info"),
        outcome=REPUTATION_OUTCOMES.get(result.outcome, result.reason),
        kept=result.outcome == "clean",
        ts_s=record["ts"].timestamp() if isinstance(record.get("ts"), datetime) else now.timestamp(),
        model_version=record.get("model_version"),
        partition=partition,
        offset=position,
    )
    if result.outcome == "clean":
        out = result.event
        assert out is not None
        why = needs_triage(out, rules)
        triage = None if why is None else enqueue_command(out, why, arrived_s=now.timestamp())
        if enrich and out.get("interaction_id"):
            return GateRoute("enrich", str(out["interaction_id"]).encode(), out, triage=triage, outcome=outcome)
        return GateRoute("clean", clean_key(out), out, triage=triage, outcome=outcome)
    if result.outcome == "sampled_out":
        return GateRoute("sampled_out", outcome=outcome)
    reason = "duplicate" if result.outcome == "duplicate" else result.reason
    rejected = GateResult(result.outcome, reason=reason, field=result.field, rule=result.rule)
    row = rejection_record(
        record, rejected, topic=topic, partition=partition, offset=position if envelope else offset, now=now,
        hash_key=hash_key,
    )
    return GateRoute("rejected", source.encode(), rejection=row, outcome=outcome, reason=reason)


#: Records per grouped message: ~200 bytes each, so a message stays far below Kafka's 1 MB limit.
GROUP_MAX = 1000


def _grouped(by_key: dict[str, list[Any]]) -> list[tuple[bytes, bytes]]:
    return [
        (key.encode(), orjson.dumps(items[at : at + GROUP_MAX]))
        for key, items in by_key.items()
        for at in range(0, len(items), GROUP_MAX)
    ]


def group_outcomes(outcomes: Iterable[Outcome]) -> list[tuple[bytes, bytes]]:
    """Outcomes messages per source: (key, JSON list of at most GROUP_MAX outcomes, in order)."""
    by_source: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        by_source.setdefault(outcome.source, []).append(outcome)
    return _grouped(by_source)


def group_increments(increments: Iterable[BiasIncrement]) -> list[tuple[bytes, bytes]]:
    """Bias-input messages per directive key: (key, JSON list of at most GROUP_MAX increments, in order)."""
    by_key: dict[str, list[BiasIncrement]] = {}
    for inc in increments:
        by_key.setdefault(inc.key, []).append(inc)
    return _grouped(by_key)


def group_by_partition(
    messages: Iterable[tuple[bytes, bytes]],
    partitions: int,
    partition_for: Callable[[bytes, int], int],
    pack: Callable[[Iterable[bytes]], Iterable[tuple[bytes, int]]] = pack_many,
) -> list[tuple[int, bytes, bytes]]:
    """Messages (key, value) regrouped, one or more per partition of their key: (partition, the
    first message's key, ``pack``'s bytes for a run of values: an envelope by default), in the
    order of each partition's messages."""
    by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
    for key, value in messages:
        by_partition.setdefault(partition_for(key, partitions), []).append((key, value))
    out: list[tuple[int, bytes, bytes]] = []
    for p, items in sorted(by_partition.items()):
        at = 0
        for envelope, n in pack(value for _, value in items):
            out.append((p, items[at][0], envelope))
            at += n
    return out


def decode_list(value: bytes, build: Callable[[dict[str, Any]], Any]) -> list[Any]:
    """A JSON object or a JSON list of objects (a grouped message), each built with ``build``.
    Raises ValueError (or TypeError from ``build``) for anything else."""
    data = orjson.loads(value)
    if isinstance(data, dict):
        return [build(data)]
    if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        return [build(item) for item in data]
    raise ValueError("not a JSON object or a non-empty list of objects")
