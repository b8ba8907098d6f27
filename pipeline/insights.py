"""The statistics behind ``feedback insights``: weighted group sums, intervals, comparisons and
the findings they give. Pure functions, no I/O: :mod:`pipeline.insights_query` fetches the sums
from ClickHouse, :mod:`pipeline.insights_cli` prints them.

The rules, in one place (``docs/analytics.md`` says the same for users):

- **Weight.** An opinion with a value weighs ``confidence`` (NULL: 1) x ``1 / sample_rate``
  (NULL: 1; a kept event stands for the ones sampling dropped) x its source's reputation weight
  (the latest ``weight`` in ``reputation_history``; a source never seen there: 1). A
  session-level opinion (a session_id, no interaction_id) reaching an interaction also carries
  its ``propagation_weight`` (see :mod:`pipeline.insights_query`).
- **Per group:** ``n`` opinions; mean value = Σw·value / Σw; success rate = Σw·[value > 0] / Σw.
  Intervals use the Kish effective sample size n_eff = (Σw)² / Σw², so that a few heavy events
  do not pass for many: Wilson for the rate, Student-t (df = n_eff - 1) for the mean.
- **Comparisons.** Within a dimension (and, for a pair such as prompt_version/tag, within one
  value of the second part) every group with at least ``min_samples`` opinions is compared with
  the group that has the most (ties: the name), and every such group with its own previous
  period. Means: Welch's t test on n_eff. Rates: the Agresti-Caffo interval (one success and
  one failure added to each side) and its z test.
- **Multiple comparisons.** All comparisons of one run are one family, corrected with
  Benjamini-Hochberg at ``fdr`` (0.05): with no real effect anywhere, a run reports any
  significant difference at most 5% of the time. A significant finding's interval is the
  false-coverage-rate adjusted one (level 1 - R·fdr/m for R findings out of m comparisons), so
  it excludes 0; other comparisons show their plain 95% interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

__all__ = [
    "ALL",
    "CHANGE",
    "DIMENSIONS",
    "METRICS",
    "Comparison",
    "Finding",
    "Group",
    "Insights",
    "Sums",
    "analyse",
    "benjamini_hochberg",
    "compare_means",
    "compare_rates",
    "event_weight",
    "parse_dimension",
    "student_t_cdf",
    "student_t_ppf",
    "sums_of",
    "t_interval",
    "wilson",
]

#: The single dimensions, in the order pairs are formed (a pair compares its first part within its second).
SINGLE: tuple[str, ...] = ("model_version", "prompt_version", "tag", "source", "type")
PAIRS: tuple[tuple[str, str], ...] = tuple((a, b) for i, a in enumerate(SINGLE) for b in SINGLE[i + 1 :])
#: Every dimension name: ``model_version`` ... and pairs such as ``prompt_version/tag``.
DIMENSIONS: tuple[str, ...] = SINGLE + tuple(f"{a}/{b}" for a, b in PAIRS)
ALL = "all"  # the dimension (and group) of every opinion together
CHANGE = "previous period"  # compared_to of a change against the previous period
METRICS = ("success_rate", "mean_value")
_NORMAL = NormalDist()


def parse_dimension(text: str) -> str:
    """The canonical name of a dimension (``tag/prompt_version`` -> ``prompt_version/tag``).

    Raises ``ValueError`` naming the allowed names."""
    parts = [p.strip() for p in text.replace(",", "/").split("/")]
    if len(parts) == 1 and parts[0] in SINGLE:
        return parts[0]
    if len(parts) == 2 and parts[0] in SINGLE and parts[1] in SINGLE and parts[0] != parts[1]:
        a, b = sorted(parts, key=SINGLE.index)
        return f"{a}/{b}"
    raise ValueError(f"{text!r} is not a dimension: use one of {', '.join(SINGLE)} or two of them as a/b")


def event_weight(
    confidence: float | None, sample_rate: float | None, reputation: float = 1.0, propagation: float = 1.0
) -> float:
    """An opinion's weight: confidence (None: 1) / sample_rate (None: 1) x reputation x propagation."""
    return (
        (1.0 if confidence is None else confidence)
        / (1.0 if sample_rate is None else sample_rate)
        * (reputation * propagation)
    )


# --- weighted sums -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Sums:
    """Weighted sums of one group's values; everything the statistics need, and additive."""

    n: int = 0
    w: float = 0.0  # Σw
    w2: float = 0.0  # Σw²
    wx: float = 0.0  # Σw·x
    wx2: float = 0.0  # Σw·x²
    wpos: float = 0.0  # Σw·[x > 0]

    def __add__(self, other: Sums) -> Sums:
        return Sums(self.n + other.n, self.w + other.w, self.w2 + other.w2, self.wx + other.wx,
                    self.wx2 + other.wx2, self.wpos + other.wpos)  # fmt: skip

    @property
    def n_eff(self) -> float:
        """Kish's effective sample size (Σw)² / Σw² (equals n when all weights are equal)."""
        return self.w * self.w / self.w2 if self.w2 > 0 else 0.0

    @property
    def mean(self) -> float | None:
        return self.wx / self.w if self.w > 0 else None

    @property
    def rate(self) -> float | None:
        return self.wpos / self.w if self.w > 0 else None

    @property
    def variance(self) -> float | None:
        """The weighted variance of the values, corrected for n_eff (None under 2 effective samples)."""
        if self.w <= 0 or self.n_eff <= 1:
            return None
        m = self.wx / self.w
        return max(0.0, self.wx2 / self.w - m * m) * self.n_eff / (self.n_eff - 1)


def sums_of(values: Iterable[float], weights: Iterable[float]) -> Sums:
    """The :class:`Sums` of values with their weights (a zero weight still counts in ``n``)."""
    out = Sums()
    for x, w in zip(values, weights, strict=True):
        out += Sums(1, w, w * w, w * x, w * x * x, w if x > 0 else 0.0)
    return out


# --- distributions and intervals -----------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Lentz), at most 300 terms."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 301):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # fmt: skip
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (> 0, not necessarily whole) degrees of freedom."""
    if df <= 0:
        raise ValueError("df must be > 0")
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def _student_t_pdf(t: float, df: float) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))


def student_t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t: a bracket doubled until it holds (at most 64 times), then
    Newton steps that fall back to halving when they leave it (at most 100, to 1e-12)."""
    if not 0 < q < 1:
        raise ValueError("q must be in (0, 1)")
    if q < 0.5:
        return -student_t_ppf(1 - q, df)
    lo, hi = 0.0, 1.0
    for _ in range(64):
        if student_t_cdf(hi, df) >= q:
            break
        lo, hi = hi, 2 * hi
    x = min(max(_NORMAL.inv_cdf(q), lo), hi)
    for _ in range(100):
        err = student_t_cdf(x, df) - q
        if abs(err) < 1e-13:
            break
        if err < 0:
            lo = x
        else:
            hi = x
        step = x - err / _student_t_pdf(x, df)
        x = step if lo < step < hi else (lo + hi) / 2
        if hi - lo < 1e-12:
            break
    return x


def wilson(p: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``p`` seen in ``n`` (effective) samples."""
    if n <= 0:
        return 0.0, 1.0
    z = _NORMAL.inv_cdf(0.5 + level / 2)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def t_interval(s: Sums, level: float = 0.95) -> tuple[float, float] | None:
    """The Student-t interval of the weighted mean (df = n_eff - 1), or None under 2 effective samples."""
    var = s.variance
    if var is None or s.mean is None:
        return None
    half = student_t_ppf(0.5 + level / 2, s.n_eff - 1) * math.sqrt(var / s.n_eff)
    return s.mean - half, s.mean + half


# --- comparisons -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """``a`` minus ``b``: the effect, the interval's centre and standard error, and its test."""

    effect: float
    centre: float
    se: float
    df: float | None  # None: the normal distribution

    def p_value(self) -> float:
        if self.se <= 0:
            return 1.0 if self.centre == 0 else 0.0
        z = abs(self.centre) / self.se
        return 2 * (1 - (_NORMAL.cdf(z) if self.df is None else student_t_cdf(z, self.df)))

    def interval(self, level: float) -> tuple[float, float]:
        q = 0.5 + level / 2
        half = self.se * (_NORMAL.inv_cdf(q) if self.df is None else student_t_ppf(q, self.df))
        return self.centre - half, self.centre + half


def compare_means(a: Sums, b: Sums) -> Comparison | None:
    """Welch's comparison of two weighted means on their n_eff; None if either side has < 2."""
    va, vb = a.variance, b.variance
    if va is None or vb is None or a.mean is None or b.mean is None:
        return None
    ea, eb = va / a.n_eff, vb / b.n_eff
    se = math.sqrt(ea + eb)
    df = (ea + eb) ** 2 / (ea * ea / (a.n_eff - 1) + eb * eb / (b.n_eff - 1)) if ea + eb > 0 else a.n_eff + b.n_eff - 2
    return Comparison(a.mean - b.mean, a.mean - b.mean, se, max(df, 1.0))


def compare_rates(a: Sums, b: Sums) -> Comparison | None:
    """Agresti-Caffo comparison of two weighted success rates on their n_eff (None if a side is empty)."""
    if a.rate is None or b.rate is None or a.n_eff <= 0 or b.n_eff <= 0:
        return None
    pa = (a.rate * a.n_eff + 1) / (a.n_eff + 2)
    pb = (b.rate * b.n_eff + 1) / (b.n_eff + 2)
    se = math.sqrt(pa * (1 - pa) / (a.n_eff + 2) + pb * (1 - pb) / (b.n_eff + 2))
    return Comparison(a.rate - b.rate, pa - pb, se, None)


def benjamini_hochberg(p_values: Sequence[float], fdr: float) -> list[bool]:
    """Which hypotheses Benjamini-Hochberg rejects at false-discovery rate ``fdr``."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: (p_values[i], i))
    cut = 0
    for rank, i in enumerate(order, start=1):
        if p_values[i] <= rank * fdr / m:
            cut = rank
    rejected = [False] * m
    for i in order[:cut]:
        rejected[i] = True
    return rejected


# --- groups and findings ---------------------------------------------------------------------
@dataclass(frozen=True)
class Group:
    """One group of a dimension: ``key`` has one part, or two for a pair; current and previous sums."""

    dimension: str
    key: tuple[str, ...]
    current: Sums
    previous: Sums = Sums()

    @property
    def name(self) -> str:
        return "/".join(self.key)

    @property
    def context(self) -> tuple[str, ...]:
        """What a pair's groups are compared within (the second part); () for a single dimension."""
        return self.key[1:]


@dataclass(frozen=True)
class Finding:
    """One comparison: ``effect`` is group minus compared_to, with its interval at ``level``."""

    dimension: str
    group: str
    compared_to: str
    metric: str
    effect: float
    n: int
    n_compared_to: int
    ci_low: float
    ci_high: float
    level: float
    p_value: float
    significant: bool
    #: The parts of ``group`` (and of ``compared_to``; a change: the group's), never split from the names.
    keys: tuple[str, ...] = ()
    compared_keys: tuple[str, ...] = ()

    @property
    def is_change(self) -> bool:
        return self.compared_to == CHANGE

    def to_json(self) -> dict[str, object]:
        return {
            "dimension": self.dimension, "group": self.group, "compared_to": self.compared_to,
            "metric": self.metric, "effect": round(self.effect, 6), "n": self.n, "n_compared_to": self.n_compared_to,
            "ci_low": round(self.ci_low, 6), "ci_high": round(self.ci_high, 6), "level": round(self.level, 6),
            "p_value": self.p_value, "significant": self.significant,
            "keys": list(self.keys), "compared_keys": list(self.compared_keys),
        }  # fmt: skip


@dataclass
class Insights:
    """What :func:`analyse` found: the groups, those under ``min_samples``, every comparison."""

    groups: list[Group]
    insufficient: list[Group]
    findings: list[Finding]
    min_samples: int
    fdr: float
    comparisons: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def significant(self) -> list[Finding]:
        """The significant findings, largest effect first (ties: dimension, group, metric)."""
        hits = [f for f in self.findings if f.significant]
        return sorted(hits, key=lambda f: (-abs(f.effect), f.dimension, f.group, f.metric))

    @property
    def declines(self) -> list[Finding]:
        """Significant falls of the success rate against the previous period."""
        return [f for f in self.significant if f.is_change and f.metric == "success_rate" and f.effect < 0]


_Pending = tuple[Group, Group | None, str, int, Comparison]  # group, reference (None: a change), metric, n of it


def _reference(groups: list[Group]) -> Group:
    """The group others are compared with: the most opinions, then the name (never the data's order)."""
    return min(groups, key=lambda g: (-g.current.n, g.key))


def _pending(groups: Sequence[Group], min_samples: int) -> list[_Pending]:
    out: list[_Pending] = []
    by_context: dict[tuple[str, tuple[str, ...]], list[Group]] = {}
    for g in groups:
        if g.current.n >= min_samples and g.dimension != ALL:
            by_context.setdefault((g.dimension, g.context), []).append(g)
    for (_dim, _ctx), members in sorted(by_context.items()):
        if len(members) < 2:
            continue
        ref = _reference(members)
        for g in sorted(members, key=lambda g: g.key):
            if g is ref:
                continue
            for metric, compare in (("success_rate", compare_rates), ("mean_value", compare_means)):
                c = compare(g.current, ref.current)
                if c is not None:
                    out.append((g, ref, metric, ref.current.n, c))
    for g in sorted(groups, key=lambda g: (g.dimension, g.key)):
        if g.current.n >= min_samples and g.previous.n >= min_samples:
            for metric, compare in (("success_rate", compare_rates), ("mean_value", compare_means)):
                c = compare(g.current, g.previous)
                if c is not None:
                    out.append((g, None, metric, g.previous.n, c))
    return out


def analyse(groups: Sequence[Group], min_samples: int = 30, fdr: float = 0.05) -> Insights:
    """Compare the groups as the module docstring says; every comparison becomes a :class:`Finding`.

    Raises ``ValueError`` for ``min_samples`` under 2 or ``fdr`` outside (0, 1)."""
    if min_samples < 2:
        raise ValueError("min_samples must be at least 2 (a variance needs two values)")
    if not 0 < fdr < 1:
        raise ValueError("fdr must be in (0, 1)")
    pending = _pending(groups, min_samples)
    p_values = [c.p_value() for *_, c in pending]
    rejected = benjamini_hochberg(p_values, fdr)
    m, r = len(pending), sum(rejected)
    adjusted = 1 - r * fdr / m if r else 1 - fdr
    findings = []
    for (g, ref, metric, n_ref, c), p, hit in zip(pending, p_values, rejected, strict=True):
        level = adjusted if hit else 0.95
        lo, hi = c.interval(level)
        other = CHANGE if ref is None else ref.name
        findings.append(Finding(g.dimension, g.name, other, metric, c.effect, g.current.n, n_ref, lo, hi, level, p, hit,
                                g.key, g.key if ref is None else ref.key))  # fmt: skip
    insufficient = sorted((g for g in groups if g.current.n < min_samples and g.dimension != ALL),
                          key=lambda g: (g.dimension, g.key))  # fmt: skip
    ordered = sorted(groups, key=lambda g: (DIMENSIONS.index(g.dimension) if g.dimension in DIMENSIONS else -1,
                                            -g.current.n, g.key))  # fmt: skip
    return Insights(ordered, insufficient, findings, min_samples, fdr, m)
