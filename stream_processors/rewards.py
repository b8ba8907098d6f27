"""Rewards for model routers: a decayed Beta posterior of the reward per arm, pure.

An **arm** is ``model_version x prompt_version``, and optionally x one context tag: an
event counts toward its ``(model, prompt)`` arm and, for each of its tags that
:attr:`RewardConfig.context_tags` names, toward ``(model, prompt, tag)`` too. Events
without a ``model_version`` or a ``value`` name no arm and are skipped.

Each event's **reward** is ``r = (value + 1) / 2`` in [0, 1], with **weight**
``w = confidence (NULL: 1) x the source's reputation weight x propagation_weight``
(NULL: 1; session-level feedback carries its share to each interaction of the session).
The arm's evidence is ``a += w·r``, ``b += w·(1 - r)``; its posterior is
``Beta(prior_alpha + a, prior_beta + b)``.

**Decay** is by event time: the evidence is kept as of the newest event time applied
(``t``). A newer event first halves ``a`` and ``b`` once per ``half_life_s`` from ``t`` to its
time; an older one (out of order) adds its contribution already decayed to ``t``. Either
way the state is ``Σ w_i·r_i·0.5^((t - t_i)/h)``, the same whatever the order the events
came in, and nothing is ever decayed by a negative time.

**Replays are harmless**: the rewards agent's input carries each event's origin (its
``feedback.clean.v1`` partition) and position (:func:`schemas.envelope.position`); an arm's
table value remembers the last position it applied per origin, and an item at or below it
changes nothing (events of one origin arrive in position order).

Table values are plain JSON objects: ``{"a", "b", "t", "n", "applied"}``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from schemas.reward_records import RewardRecord, arm_key, split_arm_key

__all__ = [
    "ITEMS_MAX",
    "RewardConfig",
    "RewardItem",
    "context_tags",
    "decode_items",
    "event_weight",
    "group_reward_items",
    "reward_items",
    "reward_of",
    "reward_record",
    "rewards_apply",
]

#: Items per rewards-input message (~40 bytes each: a message stays far below Kafka's 1 MB).
ITEMS_MAX = 5000

#: One event's contribution to one arm: (origin partition, position, reward, weight, event time s).
RewardItem = tuple[int, int, float, float, float]


@dataclass(frozen=True)
class RewardConfig:
    half_life_s: float = 86_400.0
    prior_alpha: float = 1.0
    prior_beta: float = 1.0
    #: Tags that make a context arm: a name (``math``), or a prefix ending in ``*`` (``lang:*``; ``*``: any tag).
    context_tags: tuple[str, ...] = ()


@functools.lru_cache(maxsize=64)
def _matcher(patterns: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...]]:
    names = frozenset(p for p in patterns if not p.endswith("*"))
    return names, tuple(p[:-1] for p in patterns if p.endswith("*"))


def context_tags(tags: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """The event's tags that count as contexts under ``patterns``, distinct and sorted."""
    if not patterns:
        return []
    names, prefixes = _matcher(tuple(patterns))
    return sorted({t for t in tags if t and (t in names or (prefixes and t.startswith(prefixes)))})


def _unit(x: float | None) -> float:
    if x is None:
        return 1.0
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else float(x)


def reward_of(value: float) -> float:
    """``(value + 1) / 2``, the normalized value in [-1, 1] as a reward in [0, 1] (clamped)."""
    return _unit((value + 1.0) / 2.0)


def event_weight(confidence: float | None, reputation_weight: float, propagation_weight: float | None) -> float:
    """``confidence x reputation weight x propagation_weight``, each in [0, 1] (a NULL counts as 1)."""
    return _unit(confidence) * _unit(reputation_weight) * _unit(propagation_weight)


def _event_s(ts: Any) -> float:
    return ts.timestamp() if isinstance(ts, datetime) else float(ts)


@functools.lru_cache(maxsize=65_536)
def _arm(model: str, prompt: str | None, tag: str | None) -> str:
    return arm_key(model, prompt, tag)  # an arm's key is built once, not once per event


def reward_items(
    record: Mapping[str, Any], *, partition: int, position: int, reputation_weight: float, config: RewardConfig
) -> list[tuple[str, RewardItem]]:
    """The arms one clean event counts toward, each with its item; [] when it names no arm."""
    model, value = record.get("model_version"), record.get("value")
    if not model or value is None:
        return []
    prompt = record.get("prompt_version") or None
    item: RewardItem = (
        partition,
        position,
        reward_of(value),
        event_weight(record.get("confidence"), reputation_weight, record.get("propagation_weight")),
        _event_s(record["ts"]),
    )
    out = [(_arm(model, prompt, None), item)]
    tags = record.get("tags")
    if tags and config.context_tags:
        out += [(_arm(model, prompt, tag), item) for tag in context_tags(tags, config.context_tags)]
    return out


def group_reward_items(items: Iterable[tuple[str, RewardItem]]) -> list[tuple[bytes, bytes]]:
    """Rewards-input messages: one per arm (more past :data:`ITEMS_MAX`), items in order."""
    by_arm: dict[str, list[RewardItem]] = {}
    for arm, item in items:
        by_arm.setdefault(arm, []).append(item)
    return [
        (arm.encode(), orjson.dumps(arm_items[at : at + ITEMS_MAX]))
        for arm, arm_items in by_arm.items()
        for at in range(0, len(arm_items), ITEMS_MAX)
    ]


def decode_items(value: bytes | None) -> list[RewardItem]:
    """A rewards-input message's items; ValueError for anything else."""
    if value is None:
        raise ValueError("a rewards-input message has a value")
    data = orjson.loads(value)
    if not isinstance(data, list) or not data:
        raise ValueError("not a non-empty JSON list of reward items")
    items: list[RewardItem] = []
    for entry in data:
        if not isinstance(entry, list) or len(entry) != 5:
            raise ValueError("a reward item is [partition, position, reward, weight, ts_s]")
        p, pos, r, w, ts = entry
        if not (isinstance(p, int) and isinstance(pos, int)):
            raise ValueError("a reward item's partition and position are integers")
        r, w, ts = float(r), float(w), float(ts)
        if not (0.0 <= r <= 1.0 and 0.0 <= w <= 1.0):
            raise ValueError("a reward item's reward and weight are in [0, 1]")
        items.append((p, pos, r, w, ts))
    return items


def rewards_apply(
    value: Mapping[str, Any] | None, items: Iterable[RewardItem], config: RewardConfig
) -> dict[str, Any] | None:
    """The arm's new table value after ``items`` (in order), or None when every item was applied already."""
    applied: dict[str, int] = dict((value or {}).get("applied", {}))
    a = float((value or {}).get("a", 0.0))
    b = float((value or {}).get("b", 0.0))
    t: float | None = None if value is None else float(value["t"])
    n = int((value or {}).get("n", 0))
    changed = False
    h = config.half_life_s
    for partition, pos, r, w, ts in items:
        origin = str(partition)
        if pos <= applied.get(origin, -1):
            continue
        applied[origin] = pos
        if t is None or ts >= t:
            if t is not None and ts > t:
                k = 0.5 ** ((ts - t) / h)
                a, b = a * k, b * k
            t = ts
            a, b = a + w * r, b + w * (1.0 - r)
        else:  # out of order: its contribution decayed to the state's time
            k = 0.5 ** ((t - ts) / h)
            a, b = a + w * r * k, b + w * (1.0 - r) * k
        n += 1
        changed = True
    if not changed:
        return None
    return {"a": a, "b": b, "t": t, "n": n, "applied": applied}


def reward_record(key: str, value: Mapping[str, Any], config: RewardConfig) -> RewardRecord:
    """The published form of an arm's table value."""
    model, prompt, tag = split_arm_key(key)
    return RewardRecord(
        model_version=model,
        prompt_version=prompt,
        tag=tag,
        alpha=round(config.prior_alpha + value["a"], 9),
        beta=round(config.prior_beta + value["b"], 9),
        prior_alpha=config.prior_alpha,
        prior_beta=config.prior_beta,
        half_life_s=config.half_life_s,
        updated_s=value["t"],
        events=value["n"],
    )
