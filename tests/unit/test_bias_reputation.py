"""Directive bias decay and source reputation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_processors.bias import BiasState, bias_step, decayed, directive_for
from stream_processors.reputation import (
    ReputationPolicy,
    reputation_step,
    should_downweight,
    weight,
)

HL = 3600.0


@settings(max_examples=200, deadline=None)
@given(value=st.floats(0.0, 1.0), t0=st.floats(0, 1e6), a=st.floats(0, 1e5), b=st.floats(0, 1e5))
def test_decay_is_monotonic(value: float, t0: float, a: float, b: float) -> None:
    state = BiasState(value, t0)
    early, late = sorted((a, b))
    assert decayed(state, t0 + late, HL) <= decayed(state, t0 + early, HL) <= value


@settings(max_examples=200, deadline=None)
@given(value=st.floats(0.001, 1.0), half_life=st.floats(1.0, 1e6), n=st.integers(1, 5))
def test_half_life_is_exact(value: float, half_life: float, n: int) -> None:
    state = BiasState(value, 0.0)
    assert math.isclose(decayed(state, n * half_life, half_life), value / 2**n, rel_tol=1e-12)


def test_step_scales_with_severity_and_weight_and_stays_in_range() -> None:
    a = bias_step(None, 0.0, step=0.1, severity="info", weight=1.0, half_life_s=HL)
    b = bias_step(None, 0.0, step=0.1, severity="critical", weight=1.0, half_life_s=HL)
    c = bias_step(None, 0.0, step=0.1, severity="critical", weight=0.5, half_life_s=HL)
    assert a.value == pytest.approx(0.05) and b.value == pytest.approx(0.15) and c.value == pytest.approx(0.075)
    state = None
    for i in range(100):
        state = bias_step(state, float(i), step=0.5, severity="critical", weight=1.0, half_life_s=HL)
    assert state is not None and state.value == 1.0


@settings(max_examples=100, deadline=None)
@given(times=st.lists(st.floats(0, 10_000), min_size=1, max_size=20))
def test_replay_in_any_order_ends_in_the_same_state(times: list[float]) -> None:
    def run(order: list[float]) -> BiasState:
        state = None
        for t in order:
            state = bias_step(state, t, step=0.01, severity="info", weight=1.0, half_life_s=HL)
        assert state is not None
        return state

    forward, backward = run(sorted(times)), run(sorted(times, reverse=True))
    assert forward.updated_s == backward.updated_s
    assert math.isclose(forward.value, backward.value, rel_tol=1e-9)


def test_directive_mapping() -> None:
    assert directive_for("bad_output") == "increase_grounding"
    assert directive_for("latency") == "reduce_novelty"
    assert directive_for("safety") == directive_for("veto") == "boost_safety"
    assert directive_for("thumbs") is None


def test_reputation_downweights_noisy_sources_only_after_enough_observations() -> None:
    policy = ReputationPolicy(alpha=0.1, threshold=0.5, min_observations=10)
    state = None
    for _ in range(9):
        state = reputation_step(state, "invalid", policy)
    assert state is not None and state.score < 0.5
    assert not should_downweight(state, policy) and weight(state, policy) == 1.0
    state = reputation_step(state, "rate_limited", policy)
    assert should_downweight(state, policy)
    assert weight(state, policy) == state.score
    good = None
    for _ in range(50):
        good = reputation_step(good, "accepted", policy)
    assert good is not None and good.score == 1.0 and not should_downweight(good, policy)
