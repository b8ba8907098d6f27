"""Every redaction rule runs in time linear in its input, on adversarial text.

No tight timing asserts: the checks are that doubling the input at most about doubles the
time (a quadratic rule quadruples it), and a per-KB bound five times above the measured
worst case (docs/performance.md, "Redaction"). The issue's quadratic e-mail pattern fails
both, which shows the checks can fail.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_processors.redact_bench import ADVERSARIAL, adversarial_text, rule_seconds
from stream_processors.redact_rules import RULES, Rule

QUADRATIC_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_OLD = Rule("EMAIL", QUADRATIC_EMAIL, None, False, None, "old_email")
# Measured worst case is under 50 ms per 100 KB per rule; allow 5x that on a loaded machine.
MS_PER_KB = 2.5


def worst_units(rule: Rule, n: int = 3, size: int = 10_000) -> list[str]:
    """The ``n`` adversarial units that cost ``rule`` the most at ``size`` characters."""
    timed = sorted(ADVERSARIAL, key=lambda unit: rule_seconds(rule, adversarial_text(unit, size), repeat=1))
    return timed[-n:]


def growth(rule: Rule, unit: str, size: int) -> tuple[float, float]:
    """Seconds at ``size`` and the ratio of seconds at ``2 * size`` to them (best of 3)."""
    small = rule_seconds(rule, adversarial_text(unit, size))
    large = rule_seconds(rule, adversarial_text(unit, 2 * size))
    return small, large / max(small, 1e-5)


def test_the_check_catches_the_quadratic_email_pattern() -> None:
    small, ratio = growth(_OLD, "a.", 8_000)
    assert ratio > 3
    assert small * 1000 / 8 > MS_PER_KB


@pytest.mark.parametrize("rule", RULES, ids=[rule.name for rule in RULES])
def test_rule_time_grows_linearly_on_its_worst_inputs(rule: Rule) -> None:
    for unit in worst_units(rule):
        seconds, ratio = growth(rule, unit, 100_000)
        assert seconds * 1000 / 100 < MS_PER_KB, (rule.name, unit, seconds)
        # Under 5 ms both sizes are mostly noise; linear work stays small there anyway.
        assert ratio < 3 or seconds < 0.005, (rule.name, unit, ratio)


units = st.text(alphabet="a1. -@:/+()_=[]\nAeyJ0#%", min_size=1, max_size=6) | st.sampled_from(ADVERSARIAL)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=units, second=units)
def test_no_rule_is_slow_on_generated_repetitions(first: str, second: str) -> None:
    """Any text made of two repeating units: every rule stays under the per-KB bound."""
    text = adversarial_text(first, 10_000) + adversarial_text(second, 10_000)
    for rule in RULES:
        seconds = rule_seconds(rule, text, repeat=2)
        assert seconds * 1000 / 20 < MS_PER_KB, (rule.name, first, second, seconds)


def test_clean_short_strings_are_remembered_and_pii_is_redacted_every_time() -> None:
    from collections import Counter

    from stream_processors import redact

    redact._CLEAN.clear()
    assert redact.redact_text("direction") == "direction"
    assert "direction" in redact._CLEAN  # the next one costs a lookup
    counts: Counter[str] = Counter()
    for _ in range(3):  # never remembered: counted and replaced each time
        assert redact.redact_text("mail bob@example.com", counts) == "mail [EMAIL]"
    assert counts["EMAIL"] == 3
    assert "mail bob@example.com" not in redact._CLEAN
    long_clean = "fine " * 20
    assert redact.redact_text(long_clean) == long_clean and long_clean not in redact._CLEAN  # only short ones
