"""Map each signal to ``value`` in [-1, 1] and a ``confidence`` in [0, 1].

An adapter per signal type reads the event's payload and returns
``(value, confidence)``, or raises :class:`InvalidEvent` naming the payload field
and the rule. New signal types are added with :func:`register_adapter`; the
agent never changes. A value the producer set itself is kept as it is.

Formulas (all results clamped to [-1, 1]):

| type | payload | value | confidence |
|---|---|---|---|
| thumbs | ``direction`` (or ``value``) up/down, or ``up`` bool | +1 / -1 | 1.0 |
| rating | ``stars`` (or ``rating``) 1-5 | (stars - 3) / 2 | 1.0 |
| task_success | ``success`` bool | +1 / -1 | 1.0 |
| regeneration | (``regenerated`` bool, default true) | -1 (0 if false) | 0.8 |
| quality_score | ``score`` in [0, 1] | 2q - 1 | 1.0 |
| correction | ``corrected_response`` kept | -1 | 0.9 |
| implicit copy | ``signal="copy"`` | +0.6 | 0.5 |
| implicit citation_click | ``signal="citation_click"`` | +0.4 | 0.4 |
| implicit read_time | ``read_time_ms`` | clamp((s - 15) / 45, -1, 1) x 0.5 | 0.3 |
| implicit follow_up | ``signal="follow_up"`` | -0.3 | 0.3 |
| bad_output, safety, veto | — | -1 | 1.0 |
| regret | — | -1 | 0.9 |
| regret_signal (regret tap) | ``valence`` in [-1, 1] | valence | 0.7 |
| latency | — | -0.5 | 1.0 |

Session-level feedback (``session_id`` set, no ``interaction_id``) also gets a
``propagation_weight``: the share of its weight each interaction of the session
receives (payload ``propagation_weight`` in [0, 1], default 0.5); feedback on one
interaction has weight 1.0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.errors import InvalidEvent

__all__ = [
    "SESSION_PROPAGATION_WEIGHT",
    "Adapter",
    "adapters",
    "normalize",
    "propagation_weight",
    "register_adapter",
    "unregister_adapter",
]

Adapter = Callable[[dict[str, Any]], tuple[float, float]]
_ADAPTERS: dict[str, Adapter] = {}
SESSION_PROPAGATION_WEIGHT = 0.5


def register_adapter(signal_type: str, adapter: Adapter) -> None:
    """Register (or replace) the adapter for ``signal_type``; it receives the Avro-form payload."""
    _ADAPTERS[signal_type] = adapter


def unregister_adapter(signal_type: str) -> None:
    """Remove the adapter for ``signal_type`` (events of that type then keep their value as sent)."""
    _ADAPTERS.pop(signal_type, None)


def adapters() -> dict[str, Adapter]:
    """The registered adapters by signal type (a copy)."""
    return dict(_ADAPTERS)


def _clamp(x: float, low: float = -1.0, high: float = 1.0) -> float:
    return max(low, min(high, x))


def _number(extra: dict[str, Any], *names: str) -> float:
    for name in names:
        value = extra.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    raise InvalidEvent(f"payload.{names[0]}", "required: a number")


def _flag(extra: dict[str, Any], name: str, default: bool | None = None) -> bool:
    value = extra.get(name, default)
    if isinstance(value, bool):
        return value
    raise InvalidEvent(f"payload.{name}", "required: true or false")


def _thumbs(payload: dict[str, Any]) -> tuple[float, float]:
    extra = payload["extra"]
    if isinstance(extra.get("up"), bool):
        return (1.0 if extra["up"] else -1.0), 1.0
    direction = extra.get("direction", extra.get("value"))
    if direction in ("up", "down"):
        return (1.0 if direction == "up" else -1.0), 1.0
    raise InvalidEvent("payload.direction", "required: 'up' or 'down'")


def _rating(payload: dict[str, Any]) -> tuple[float, float]:
    stars = _number(payload["extra"], "stars", "rating")
    if not 1 <= stars <= 5:
        raise InvalidEvent("payload.stars", "must be between 1 and 5")
    return (stars - 3) / 2, 1.0


def _quality(payload: dict[str, Any]) -> tuple[float, float]:
    q = _number(payload["extra"], "score", "quality_score")
    if not 0 <= q <= 1:
        raise InvalidEvent("payload.score", "must be between 0 and 1")
    return 2 * q - 1, 1.0


def _implicit(payload: dict[str, Any]) -> tuple[float, float]:
    extra = payload["extra"]
    signal = extra.get("signal")
    if signal == "copy":
        return 0.6, 0.5
    if signal == "citation_click":
        return 0.4, 0.4
    if signal == "follow_up":
        return -0.3, 0.3
    if signal == "read_time" or "read_time_ms" in extra:
        seconds = _number(extra, "read_time_ms") / 1000
        return _clamp((seconds - 15) / 45) * 0.5, 0.3
    raise InvalidEvent("payload.signal", "required: copy, citation_click, read_time or follow_up")


for _type, _adapter in {
    "thumbs": _thumbs,
    "rating": _rating,
    "task_success": lambda p: ((1.0 if _flag(p["extra"], "success") else -1.0), 1.0),
    "regeneration": lambda p: ((-1.0 if _flag(p["extra"], "regenerated", True) else 0.0), 0.8),
    "quality_score": _quality,
    "correction": lambda p: (-1.0, 0.9),
    "implicit": _implicit,
    "bad_output": lambda p: (-1.0, 1.0),
    "safety": lambda p: (-1.0, 1.0),
    "veto": lambda p: (-1.0, 1.0),
    "regret": lambda p: (-1.0, 0.9),
    "regret_signal": lambda p: (_number(p["extra"], "valence"), 0.7),
    "latency": lambda p: (-0.5, 1.0),
}.items():
    register_adapter(_type, _adapter)


def propagation_weight(event: dict[str, Any]) -> float:
    """1.0 for feedback on one interaction. Session-level feedback (a session_id and no
    interaction_id) applies to every interaction of the session at a reduced weight: the
    payload's ``propagation_weight`` in [0, 1], else :data:`SESSION_PROPAGATION_WEIGHT`."""
    if not event.get("session_id") or event.get("interaction_id"):
        return 1.0
    weight = event["payload"]["extra"].get("propagation_weight")
    if weight is None:
        return SESSION_PROPAGATION_WEIGHT
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0.0 <= weight <= 1.0:
        raise InvalidEvent("payload.propagation_weight", "must be a number in [0, 1]")
    return float(weight)


def normalize(event: dict[str, Any]) -> dict[str, Any]:
    """The event with ``value``, ``confidence`` and ``propagation_weight`` set (a copy).

    Raises :class:`InvalidEvent`. A producer-set value is kept (confidence defaults to
    1.0); a type without an adapter keeps ``value`` as it came (possibly null).
    """
    out = dict(event)
    out["propagation_weight"] = propagation_weight(out)
    if out.get("value") is not None:
        out["confidence"] = 1.0 if out.get("confidence") is None else out["confidence"]
        return out
    adapter = _ADAPTERS.get(out["type"])
    if adapter is None:
        return out
    value, confidence = adapter(out["payload"])
    out["value"] = _clamp(value)
    out["confidence"] = _clamp(confidence, 0.0, 1.0)
    return out
