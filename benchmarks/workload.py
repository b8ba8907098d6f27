"""The benchmark's event mix, in the gateway's JSON form (what ``emit_many`` takes).

Deterministic for a seed, standard library only: ``benchmarks/publish.py`` imports it
while running under another source tree (``feedback bench --worker-src``), so both trees
publish the same events.

The mix: mostly thumbs, ratings and implicit signals, some corrections, bad_output,
latency and vetoes; most events name a user (distinct users by default, so the gate's
rate limit and dedup tables grow one entry per event, as with real traffic), a share an
interaction (those go through the join); a few comments carry an e-mail address or a
phone number for the redactor; ``duplicate_share`` of the events repeat an earlier
thumbs on the same interaction (same user, a new event id), which the gate refuses as
``duplicate``.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["BIAS_TYPES", "TYPES", "events"]

# (type, weight, severity)
TYPES: tuple[tuple[str, int, str], ...] = (
    ("thumbs", 30, "info"),
    ("rating", 20, "info"),
    ("implicit", 28, "info"),
    ("correction", 3, "info"),
    ("bad_output", 7, "warn"),
    ("latency", 7, "warn"),
    ("veto", 3, "critical"),
    ("task_success", 2, "info"),
)
BIAS_TYPES = frozenset({"bad_output", "latency", "safety", "veto"})  # stream_processors.bias.DEFAULT_DIRECTIVES
_SOURCES = ("dream_ui", "oracle", "mesh", "oneiric")
_COMMENTS = ("fine", "Too long", "Wrong citation in the second paragraph", "Exactly what I needed", "slow")
_PII_COMMENTS = ("mail me at jane.doe@example.com", "call +44 20 7946 0958 please")


def _payload(kind: str, rng: random.Random) -> dict[str, Any]:
    r = rng.random()
    if kind == "thumbs":
        payload: dict[str, Any] = {"direction": "up" if r < 0.7 else "down"}
        if r < 0.12:
            payload["comment"] = _PII_COMMENTS[int(r * 100) % 2] if r < 0.01 else rng.choice(_COMMENTS)
        return payload
    if kind == "rating":
        return {"stars": rng.randint(1, 5)}
    if kind == "implicit":
        signal = ("copy", "citation_click", "read_time", "follow_up")[int(r * 4)]
        return {"signal": signal, "read_time_ms": rng.randint(200, 90_000)} if signal == "read_time" else {
            "signal": signal}  # fmt: skip
    if kind == "correction":
        return {"corrected_response": "The capital of Australia is Canberra."}
    if kind == "latency":
        return {"latency_ms": rng.randint(800, 12_000)}
    if kind == "veto":
        return {"reason_code": ("pii_leak", "unsafe_advice", "policy")[int(r * 3)]}
    if kind == "task_success":
        return {"success": r < 0.8}
    return {"detail": rng.choice(_COMMENTS)}


def events(
    n: int,
    *,
    seed: int = 1,
    users: int | None = None,
    user_share: float = 0.9,
    interaction_share: float = 0.3,
    duplicate_share: float = 0.02,
    tag: str | None = None,
    start: datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """``n`` events of the mix. ``users``: None gives every event with a user a distinct
    user id (``u-<seed>-<i>``); a number cycles through that many. ``tag``, if given, is
    set as every event's ``model_version`` (the latency stage finds batches by it).

    Each event has its own ``ts``, ``start`` (default: now) plus ``i`` microseconds: with
    the time left to the client (one "now" per batch), two events of the same source,
    type and payload without a user or interaction would have the same content hash, and
    the gate would drop the second as a duplicate nobody meant."""
    base = start or datetime.now(UTC)
    rng = random.Random(seed)
    names = [t for t, _, _ in TYPES]
    weights = [w for _, w, _ in TYPES]
    severity = {t: s for t, _, s in TYPES}
    recent: list[dict[str, Any]] = []  # thumbs on an interaction: what a duplicate repeats
    for i in range(n):
        event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if recent and rng.random() < duplicate_share:
            original = recent[rng.randrange(len(recent))]
            yield {**original, "event_id": event_id}
            continue
        kind = rng.choices(names, weights)[0]
        event: dict[str, Any] = {
            "event_id": event_id,
            "source": "guardian" if kind == "veto" else _SOURCES[i % len(_SOURCES)],
            "type": kind,
            "severity": severity[kind],
            "ts": (base + timedelta(microseconds=i)).isoformat().replace("+00:00", "Z"),
            "payload": _payload(kind, rng),
        }
        if rng.random() < user_share:
            event["user_id"] = f"u-{seed}-{i}" if users is None else f"u-{seed}-{i % users}"
        if rng.random() < interaction_share:
            event["interaction_id"] = f"i-{seed}-{i}"
        if tag is not None:
            event["model_version"] = tag
        if kind == "thumbs" and "interaction_id" in event:
            if len(recent) < 256:
                recent.append(event)
            else:
                recent[rng.randrange(256)] = event
        yield event
