"""Directive bias: feedback complaints raise a directive's bias, which decays with a half-life.

Pure and clock-free: decay is computed from event time, so a replay ends in the
same state. Values stay in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DEFAULT_DIRECTIVES", "SEVERITY_SCALE", "BiasState", "bias_step", "decayed", "directive_for"]

#: Which feedback type raises which directive (configurable through settings).
DEFAULT_DIRECTIVES: Mapping[str, str] = {
    "bad_output": "increase_grounding",
    "latency": "reduce_novelty",
    "safety": "boost_safety",
    "veto": "boost_safety",
}
SEVERITY_SCALE: Mapping[str, float] = {"debug": 0.25, "info": 0.5, "warn": 0.75, "error": 1.0, "critical": 1.5}


@dataclass(frozen=True)
class BiasState:
    value: float
    updated_s: float


def directive_for(event_type: str, mapping: Mapping[str, str] = DEFAULT_DIRECTIVES) -> str | None:
    """The directive an event type feeds, or None."""
    return mapping.get(event_type)


def decayed(state: BiasState | None, at_s: float, half_life_s: float) -> float:
    """The bias at time ``at_s``: ``value * 0.5 ** (elapsed / half_life)`` (never grows with time)."""
    if state is None:
        return 0.0
    elapsed = max(0.0, at_s - state.updated_s)
    return state.value * 0.5 ** (elapsed / half_life_s)


def bias_step(
    state: BiasState | None, event_s: float, *, step: float, severity: str, weight: float, half_life_s: float
) -> BiasState:
    """Apply one event: decay to the event's time, add ``step x severity scale x reputation weight``, clamp to 1.

    An event older than the state (out of order) adds its increment already decayed to
    the state's time, so the result does not depend on arrival order (until the clamp).
    """
    increment = step * SEVERITY_SCALE.get(severity, 0.5) * max(0.0, min(1.0, weight))
    if state is not None and event_s < state.updated_s:
        late = increment * 0.5 ** ((state.updated_s - event_s) / half_life_s)
        return BiasState(min(1.0, state.value + late), state.updated_s)
    return BiasState(min(1.0, decayed(state, event_s, half_life_s) + increment), event_s)
