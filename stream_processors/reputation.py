"""Source reputation: an EWMA of outcomes per source, in [0, 1]."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OUTCOME_SCORES", "ReputationPolicy", "ReputationState", "reputation_step", "should_downweight", "weight"]

#: How much each outcome says about a source: 1 is a useful event, 0 is noise.
OUTCOME_SCORES = {"accepted": 1.0, "invalid": 0.0, "duplicate": 0.3, "rate_limited": 0.0, "noise": 0.0}


@dataclass(frozen=True)
class ReputationPolicy:
    alpha: float = 0.05  # weight of the newest outcome
    threshold: float = 0.5  # below this, a source is down-weighted ...
    min_observations: int = 20  # ... once it has this many outcomes
    prior: float = 1.0  # sources start trusted


@dataclass(frozen=True)
class ReputationState:
    score: float
    observations: int


def reputation_step(state: ReputationState | None, outcome: str, policy: ReputationPolicy) -> ReputationState:
    """Fold one outcome (a key of :data:`OUTCOME_SCORES`) into the source's EWMA score."""
    previous = policy.prior if state is None else state.score
    x = OUTCOME_SCORES[outcome]
    score = (1 - policy.alpha) * previous + policy.alpha * x
    return ReputationState(min(1.0, max(0.0, score)), (0 if state is None else state.observations) + 1)


def should_downweight(state: ReputationState | None, policy: ReputationPolicy) -> bool:
    """True when the source has enough observations and its score is under the threshold."""
    return state is not None and state.observations >= policy.min_observations and state.score < policy.threshold


def weight(state: ReputationState | None, policy: ReputationPolicy) -> float:
    """The weight a source's events carry: its score once it is down-weighted, else 1."""
    return state.score if state is not None and should_downweight(state, policy) else 1.0
