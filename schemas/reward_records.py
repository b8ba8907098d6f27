"""The records on ``feedback.rewards.v1``: reward statistics per arm, for model routers.

Key: the arm, :func:`arm_key` of ``(model_version, prompt_version, tag)``. The parts are
joined by ``|``; a ``|`` or ``%`` inside a part is written ``%7C`` / ``%25``, so every key
splits back into the arm it names. Value: compact JSON :class:`RewardRecord`.

A record is a Beta posterior as of ``updated_s`` (event time): ``alpha``/``beta`` are the
prior plus the decayed evidence. A subscriber may decay it further to any later moment with
:meth:`RewardRecord.at` (the evidence halves every ``half_life_s``; the prior stays).

Intervals come from :func:`beta_interval`, exact to about 1e-9 by bisection on the
regularized incomplete beta function while the evidence is under
:data:`NORMAL_ABOVE`, and from the normal approximation above it (where the Beta's skew is
under 1% and the error under 1e-4). No SciPy needed, and the same numbers on every machine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

__all__ = [
    "NORMAL_ABOVE",
    "Arm",
    "RewardRecord",
    "arm_key",
    "beta_interval",
    "beta_quantile",
    "decode_reward",
    "encode_reward",
    "split_arm_key",
]

_SEPARATOR = "|"
#: alpha + beta above which :func:`beta_interval` uses the normal approximation.
NORMAL_ABOVE = 10_000.0


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace(_SEPARATOR, "%7C")


def _unescape(part: str) -> str:
    return part.replace("%7C", _SEPARATOR).replace("%25", "%")


def arm_key(model_version: str, prompt_version: str | None = None, tag: str | None = None) -> str:
    """The topic key of an arm: ``model|prompt`` or ``model|prompt|tag`` (no prompt: empty)."""
    if not model_version:
        raise ValueError("model_version: an arm needs a non-empty model_version")
    parts = [_escape(model_version), _escape(prompt_version or "")]
    if tag:
        parts.append(_escape(tag))
    return _SEPARATOR.join(parts)


def split_arm_key(key: str) -> tuple[str, str | None, str | None]:
    """``(model_version, prompt_version or None, tag or None)``; ValueError for anything else."""
    parts = key.split(_SEPARATOR)
    if len(parts) not in (2, 3) or not parts[0]:
        raise ValueError(f"not an arm key: {len(parts)} parts (expected model|prompt or model|prompt|tag)")
    model, prompt = _unescape(parts[0]), _unescape(parts[1]) or None
    tag = _unescape(parts[2]) or None if len(parts) == 3 else None
    return model, prompt, tag


class Arm(NamedTuple):
    """What a router chooses between: a model version, a prompt version, optionally a context tag."""

    model_version: str
    prompt_version: str | None = None
    tag: str | None = None

    @property
    def key(self) -> str:
        return arm_key(self.model_version, self.prompt_version, self.tag)

    @classmethod
    def of(cls, arm: Arm | tuple[str, ...] | str) -> Arm:
        """An arm from an :class:`Arm`, a tuple ``(model, prompt?, tag?)`` or a topic key."""
        if isinstance(arm, str):
            return cls(*split_arm_key(arm))
        return cls(*arm)


# --- the Beta distribution, without SciPy --------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_001):  # converges in O(sqrt(max(a, b))) steps; a, b are bounded by NORMAL_ABOVE
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


_Z = {0.90: 1.6448536269514722, 0.95: 1.959963984540054, 0.99: 2.5758293035489004}


def beta_quantile(p: float, a: float, b: float) -> float:
    """The ``p`` quantile of Beta(a, b), by bisection (60 halvings: below 1e-15 in x)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: must be in [0, 1], got {p}")
    if a <= 0 or b <= 0:
        raise ValueError("alpha and beta: must be positive")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _beta_cdf(mid, a, b) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def beta_interval(a: float, b: float, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of Beta(a, b): (low, high) in [0, 1].

    Exact quantiles while ``a + b`` is at most :data:`NORMAL_ABOVE`; above it the normal
    approximation (mean ± z·sd, clamped), for ``level`` 0.90, 0.95 or 0.99 there."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    if a + b <= NORMAL_ABOVE:
        tail = (1.0 - level) / 2
        return beta_quantile(tail, a, b), beta_quantile(1.0 - tail, a, b)
    z = _Z.get(round(level, 2))
    if z is None:
        raise ValueError(f"level: with this much evidence only {sorted(_Z)} are supported, got {level}")
    n = a + b
    mean = a / n
    sd = math.sqrt(a * b / (n * n * (n + 1.0)))
    return max(0.0, mean - z * sd), min(1.0, mean + z * sd)


@dataclass(frozen=True)
class RewardRecord:
    """One arm's Beta posterior of the reward (in [0, 1]) as of ``updated_s``."""

    model_version: str
    prompt_version: str | None
    tag: str | None
    alpha: float  # prior_alpha + decayed weighted rewards
    beta: float  # prior_beta + decayed weighted (1 - reward)
    prior_alpha: float
    prior_beta: float
    half_life_s: float
    updated_s: float  # event time (Unix s) the evidence is decayed to: the newest event applied
    events: int  # events applied so far (not decayed)

    @property
    def key(self) -> str:
        return arm_key(self.model_version, self.prompt_version, self.tag)

    @property
    def updated_at(self) -> datetime:
        return datetime.fromtimestamp(self.updated_s, UTC)

    @property
    def weight(self) -> float:
        """The evidence: decayed sum of the events' weights (alpha + beta minus the prior)."""
        return max(0.0, self.alpha + self.beta - self.prior_alpha - self.prior_beta)

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        return beta_interval(self.alpha, self.beta, level)

    def at(self, when: datetime | float) -> RewardRecord:
        """The posterior at ``when`` (datetime or Unix s): the evidence decayed from ``updated_s``
        (never grown: an earlier ``when`` gives the record as it is)."""
        when_s = when.timestamp() if isinstance(when, datetime) else float(when)
        elapsed = when_s - self.updated_s
        if elapsed <= 0:
            return self
        k = 0.5 ** (elapsed / self.half_life_s)
        return replace(
            self,
            alpha=self.prior_alpha + (self.alpha - self.prior_alpha) * k,
            beta=self.prior_beta + (self.beta - self.prior_beta) * k,
            updated_s=when_s,
        )

    def to_json(self) -> dict[str, Any]:
        """The record with its key, mean, 95% interval, weight and ``updated_at`` (ISO 8601)."""
        low, high = self.interval()
        return {
            **asdict(self),
            "key": self.key,
            "mean": round(self.mean, 6),
            "ci_low": round(low, 6),
            "ci_high": round(high, 6),
            "weight": round(self.weight, 6),
            "updated_at": self.updated_at.isoformat(),
        }


def encode_reward(record: RewardRecord) -> bytes:
    return orjson.dumps(asdict(record))


def decode_reward(value: bytes) -> RewardRecord:
    """A :class:`RewardRecord` from a topic value; raises ``ValueError`` on anything else."""
    try:
        data = orjson.loads(value)
        record = RewardRecord(
            model_version=str(data["model_version"]),
            prompt_version=None if data.get("prompt_version") is None else str(data["prompt_version"]),
            tag=None if data.get("tag") is None else str(data["tag"]),
            alpha=float(data["alpha"]),
            beta=float(data["beta"]),
            prior_alpha=float(data["prior_alpha"]),
            prior_beta=float(data["prior_beta"]),
            half_life_s=float(data["half_life_s"]),
            updated_s=float(data["updated_s"]),
            events=int(data["events"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a reward record: {type(exc).__name__}") from None
    if not (record.alpha > 0 and record.beta > 0 and record.half_life_s > 0 and record.model_version):
        raise ValueError("not a reward record: alpha, beta and half_life_s must be positive, model_version set")
    return record
