"""The statistics of ``feedback insights`` on planted data: intervals, weights, effects, and no
more false findings than the stated rate when nothing differs."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.insights import (
    CHANGE,
    Group,
    Sums,
    analyse,
    benjamini_hochberg,
    compare_means,
    event_weight,
    parse_dimension,
    student_t_cdf,
    student_t_ppf,
    sums_of,
    t_interval,
    wilson,
)


# --- distributions and intervals ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("df", "q975"), [(1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (30, 2.0423), (1000, 1.9623)]
)
def test_student_t_quantiles_match_the_tables(df: int, q975: float) -> None:
    assert student_t_ppf(0.975, df) == pytest.approx(q975, abs=1e-4)
    assert student_t_cdf(q975, df) == pytest.approx(0.975, abs=1e-5)
    assert student_t_ppf(0.025, df) == pytest.approx(-q975, abs=1e-4)


def test_wilson_matches_the_textbook_values_and_stays_in_0_1() -> None:
    lo, hi = wilson(0.5, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    lo, hi = wilson(0.0, 10)  # no successes: a real upper bound, not 0
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson(1.0, 10)[1] == 1.0


def test_t_interval_of_an_unweighted_sample_is_the_classic_one() -> None:
    xs = [0.2, -0.4, 1.0, 0.6, -1.0, 0.0, 0.4, 0.8]
    lo, hi = t_interval(sums_of(xs, [1.0] * len(xs)))  # type: ignore[misc]
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = 2.3646 * sd / math.sqrt(len(xs))  # t(0.975, 7)
    assert lo == pytest.approx(mean - half, abs=1e-4) and hi == pytest.approx(mean + half, abs=1e-4)
    assert t_interval(sums_of([1.0], [1.0])) is None  # one value has no variance


# --- weights --------------------------------------------------------------------------------
def test_event_weight_follows_the_rule() -> None:
    assert event_weight(None, None) == 1.0
    assert event_weight(0.5, None) == 0.5
    assert event_weight(None, 0.25) == 4.0
    assert event_weight(0.8, 0.5, reputation=0.3, propagation=0.5) == pytest.approx(0.8 / 0.5 * 0.3 * 0.5)


values = st.lists(st.sampled_from([-1.0, -0.5, 0.0, 0.5, 1.0]), min_size=2, max_size=30)


@settings(max_examples=200, deadline=None)
@given(values, st.data())
def test_a_sampled_event_counts_as_the_events_it_stands_for(xs: list[float], data: st.DataObject) -> None:
    """Rate 1/k: the mean and the success rate are those of the list with the event k times."""
    ks = data.draw(st.lists(st.integers(1, 5), min_size=len(xs), max_size=len(xs)))
    weighted = sums_of(xs, [event_weight(None, 1 / k) for k in ks])
    repeated = [x for x, k in zip(xs, ks, strict=True) for _ in range(k)]
    plain = sums_of(repeated, [1.0] * len(repeated))
    assert weighted.mean == pytest.approx(plain.mean) and weighted.rate == pytest.approx(plain.rate)
    assert weighted.n == len(xs)
    # ... but not as that many independent observations: n_eff is Kish's, never above n.
    assert weighted.n_eff == pytest.approx(sum(ks) ** 2 / sum(k * k for k in ks))
    assert weighted.n_eff <= len(xs) + 1e-9


@settings(max_examples=200, deadline=None)
@given(values, st.data())
def test_confidence_weights_the_mean_and_the_rate(xs: list[float], data: st.DataObject) -> None:
    cs = data.draw(st.lists(st.floats(0.05, 1.0), min_size=len(xs), max_size=len(xs)))
    s = sums_of(xs, [event_weight(c, None) for c in cs])
    assert s.mean == pytest.approx(sum(c * x for c, x in zip(cs, xs, strict=True)) / sum(cs))
    assert s.rate == pytest.approx(sum(c for c, x in zip(cs, xs, strict=True) if x > 0) / sum(cs))
    # Equal confidences change nothing: only their ratios matter.
    same = sums_of(xs, [0.4] * len(xs))
    assert same.mean == pytest.approx(sum(xs) / len(xs)) and same.n_eff == pytest.approx(len(xs))


def test_a_heavy_event_widens_the_interval() -> None:
    xs = [1.0, -1.0] * 20
    even = t_interval(sums_of(xs, [1.0] * 40))
    skewed = t_interval(sums_of(xs, [10.0] + [1.0] * 39))
    assert even is not None and skewed is not None
    assert skewed[1] - skewed[0] > even[1] - even[0]


# --- multiple comparisons ------------------------------------------------------------------------
def test_benjamini_hochberg_step_up() -> None:
    # m = 5, q = 0.05: thresholds 0.01 0.02 0.03 0.04 0.05; the last p under its threshold is 0.03 (rank 3).
    assert benjamini_hochberg([0.045, 0.001, 0.03, 0.5, 0.02], 0.05) == [False, True, True, False, True]
    assert benjamini_hochberg([0.2, 0.3], 0.05) == [False, False]
    assert benjamini_hochberg([], 0.05) == []


def test_parse_dimension_names_and_pairs() -> None:
    assert parse_dimension("tag") == "tag"
    assert parse_dimension("tag/prompt_version") == "prompt_version/tag"
    assert parse_dimension("prompt_version,tag") == "prompt_version/tag"
    for bad in ("user", "tag/tag", "a/b/c"):
        with pytest.raises(ValueError, match="not a dimension"):
            parse_dimension(bad)


# --- planted data -------------------------------------------------------------------------------
def _group(dim: str, key: tuple[str, ...], xs: list[float], prev: list[float] | None = None) -> Group:
    prev = prev or []
    return Group(dim, key, sums_of(xs, [1.0] * len(xs)), sums_of(prev, [1.0] * len(prev)))


def test_a_planted_effect_is_found_with_its_sign_size_and_n() -> None:
    rng = random.Random(7)
    # p-a on math: 212 values with mean 0.40; p-b: 212 with mean 0.09 (exactly 0.31 lower).
    a = [0.4 + d for d in (0.5, -0.5) * 106]
    b = [0.09 + d for d in (0.5, -0.5) * 106]
    rng.shuffle(a)
    groups = [
        _group("prompt_version/tag", ("p-a", "math"), [*a, 0.4]),  # one more: p-a is the reference
        _group("prompt_version/tag", ("p-b", "math"), b),
        _group("prompt_version/tag", ("p-b", "geo"), [0.1] * 5),  # too few
    ]
    found = analyse(groups, min_samples=30)
    (hit,) = [f for f in found.significant if f.metric == "mean_value"]
    assert (hit.dimension, hit.group, hit.compared_to) == ("prompt_version/tag", "p-b/math", "p-a/math")
    assert hit.effect == pytest.approx(-0.31) and hit.n == 212 and hit.n_compared_to == 213
    assert hit.ci_low < -0.31 < hit.ci_high < 0
    assert hit.level == pytest.approx(1 - 1 * 0.05 / 2)  # FCR-adjusted: 1 finding of 2 comparisons (mean, rate)
    assert [g.name for g in found.insufficient] == ["p-b/geo"]
    assert all(f.group != "p-b/geo" for f in found.findings)


def test_a_decline_against_the_previous_period_is_a_decline() -> None:
    now = [1.0] * 60 + [-1.0] * 60  # success 50%
    before = [1.0] * 96 + [-1.0] * 24  # success 80%
    found = analyse([_group("model_version", ("m1",), now, before)], min_samples=30)
    (decline,) = found.declines
    assert decline.compared_to == CHANGE and decline.metric == "success_rate"
    assert decline.effect == pytest.approx(-0.3) and decline.ci_high < 0
    steady = analyse([_group("model_version", ("m1",), now, now)], min_samples=30)
    assert steady.declines == [] and not steady.significant


def test_with_no_effect_at_most_the_stated_share_of_runs_find_anything() -> None:
    """200 seeded datasets, 4 models x 3 tags and a previous period, all from one distribution."""
    runs_with_a_finding, comparisons, significant = 0, 0, 0
    for seed in range(200):
        rng = random.Random(seed)
        groups = []
        for dim, keys in (("model_version", [("m1",), ("m2",), ("m3",), ("m4",)]),
                          ("model_version/tag", [(m, t) for m in ("m1", "m2") for t in ("a", "b", "c")])):  # fmt: skip
            for key in keys:
                draw = [rng.choice((1.0, 0.5, -0.5, -1.0, 1.0)) for _ in range(160)]
                groups.append(_group(dim, key, draw[:80], draw[80:]))
        found = analyse(groups, min_samples=30, fdr=0.05)
        comparisons += found.comparisons
        significant += len(found.significant)
        runs_with_a_finding += bool(found.significant)
    # BH at 5% under the complete null bounds the share of runs with any finding by 5% (10 of 200);
    # 19 is that plus three binomial standard deviations.
    assert runs_with_a_finding <= 19, runs_with_a_finding
    assert significant / comparisons <= 0.05
    assert comparisons == 200 * (3 * 2 + 3 * 2 + 10 * 2)  # vs reference, within tag, and 10 changes


def test_welch_sees_unequal_spread() -> None:
    tight = sums_of([0.1, 0.2] * 50, [1.0] * 100)
    wide = sums_of([1.0, -0.7] * 50, [1.0] * 100)
    c = compare_means(wide, tight)
    assert c is not None and c.df is not None and c.df < 150  # nearer n - 1 of the wide side than 198
    assert Sums().mean is None and compare_means(Sums(), tight) is None


# --- suggestions ------------------------------------------------------------------------------
def test_suggestions_cite_their_numbers_and_the_hook_sees_only_aggregates() -> None:
    from pipeline.suggest import HOOK_FIELDS, hook_input, load_hook, suggest

    a = [0.4 + d for d in (0.5, -0.5) * 106]
    b = [0.09 + d for d in (0.5, -0.5) * 106]
    found = analyse([_group("prompt_version/tag", ("p-a", "math"), [*a, 0.4]),
                     _group("prompt_version/tag", ("p-b", "math"), b)], min_samples=30)  # fmt: skip
    (s,) = suggest(found)
    f = s.finding
    assert s.text == (f"prompt p-b scores 0.31 lower than p-a on tag math (n=212, 97.5% CI "
                      f"{-f.ci_high:.2f}–{-f.ci_low:.2f}): route tag math to p-a or revise p-b")  # fmt: skip  # noqa: RUF001
    assert s.impact == pytest.approx(0.31 / 2 * 212)
    (given,) = hook_input([s])
    assert tuple(given) == HOOK_FIELDS and given["group"] == "p-b/math"
    assert all(isinstance(v, int | float | str | bool) for v in given.values())
    assert load_hook("json:dumps") is __import__("json").dumps
    for bad, why in (("json", "module:callable"), ("no_such_mod:f", "cannot import"), ("json:nope", "not a callable")):
        with pytest.raises(ValueError, match=why):
            load_hook(bad)


def test_opinions_come_from_feedback_current_when_it_exists() -> None:
    from pipeline.insights_query import opinions_table

    class Tables:  # answers EXISTS TABLE for the tables it holds
        def __init__(self, *names: str) -> None:
            self.names = names

        def command(self, sql: str) -> int:
            return int(any(sql.endswith(f"`db`.{n}") for n in self.names))

    assert opinions_table(Tables("feedback_events", "feedback_current"), "db") == "`db`.feedback_current"
    assert opinions_table(Tables("feedback_events"), "db") == "`db`.feedback_events"
    # A cluster: the Distributed tables, and feedback_events_all while there is no feedback_current_all.
    assert opinions_table(Tables("feedback_current", "feedback_events_all"), "db", "c") == "`db`.feedback_events_all"
    assert opinions_table(Tables("feedback_current_all"), "db", "c") == "`db`.feedback_current_all"


def test_a_name_with_a_slash_stays_whole_in_a_suggestion() -> None:
    from pipeline.suggest import suggest

    good = [1.0, 0.5] * 60
    bad = [-1.0, 0.5] * 50
    found = analyse([_group("model_version/tag", ("org/m-a", "math"), good),
                     _group("model_version/tag", ("org/m-b", "math"), bad)], min_samples=30)  # fmt: skip
    texts = [s.text for s in suggest(found)]
    assert texts and texts[0].startswith("model org/m-b ")
    assert "lower than org/m-a on tag math" in texts[0]
    assert texts[0].endswith("route tag math to org/m-a or revise org/m-b")
