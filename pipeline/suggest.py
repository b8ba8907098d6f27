"""``feedback suggest``: recommendations drawn from the significant findings of the insights.

Rules, one suggestion per compared pair of groups (its most telling metric):

- a group that scores significantly **lower** than the reference of its dimension: route its
  traffic (on the pair's context, e.g. a tag) to the reference, or revise it;
- a group that scores significantly **higher**: prefer it over the reference;
- a significant **decline** against the previous period: find what changed for that group;
  a significant rise: keep what changed.

Each suggestion cites its effect, n and interval. Impact, which ranks them, is the effect as a
share of its metric's range (2 for a mean value in [-1, 1], 1 for a rate) times the group's n.

An optional text-generation hook (the setting ``suggest_text_hook``, ``module:callable``, off
by default) may add a summary. It receives only :func:`hook_input`: the aggregates of each
suggestion (names of groups, numbers), never an event or its text.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.insights import Finding, Insights

__all__ = ["HOOK_FIELDS", "Suggestion", "hook_input", "load_hook", "suggest"]

_NOUN = {"model_version": "model", "prompt_version": "prompt", "tag": "tag", "source": "source", "type": "type",
         "all": "all feedback"}  # fmt: skip
_RANGE = {"mean_value": 2.0, "success_rate": 1.0}
#: The only keys the text hook sees, per suggestion.
HOOK_FIELDS = ("rule", "dimension", "group", "compared_to", "metric", "effect", "n", "ci_low", "ci_high", "level",
               "impact")  # fmt: skip


@dataclass(frozen=True)
class Suggestion:
    rule: str  # worse_than_reference | better_than_reference | decline | improvement
    text: str
    impact: float
    finding: Finding

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "text": self.text, "impact": round(self.impact, 4), **self.finding.to_json()}


def _amount(f: Finding) -> str:
    return f"{abs(f.effect) * 100:.1f} pp" if f.metric == "success_rate" else f"{abs(f.effect):.2f}"


def _evidence(f: Finding) -> str:
    lo, hi = (f.ci_low, f.ci_high) if f.effect >= 0 else (-f.ci_high, -f.ci_low)
    scale, unit = (100.0, " pp") if f.metric == "success_rate" else (1.0, "")
    digits = 1 if f.metric == "success_rate" else 2
    return f"n={f.n}, {f.level * 100:.4g}% CI {lo * scale:.{digits}f}–{hi * scale:.{digits}f}{unit}"  # noqa: RUF001


def _names(f: Finding) -> tuple[str, str, str, str]:
    """(noun, group, reference, " on <context>") of a finding; a pair's context is its second part."""
    parts = f.dimension.split("/")
    keys, ref_keys = f.keys or (f.group,), f.compared_keys or (f.compared_to,)
    context = f" on {_NOUN[parts[1]]} {keys[1]}" if len(parts) == 2 and len(keys) == 2 else ""
    return _NOUN.get(parts[0], parts[0]), keys[0], ref_keys[0], context


def _text(f: Finding) -> tuple[str, str]:
    what = "has a success rate" if f.metric == "success_rate" else "scores"
    noun, group, ref, context = _names(f)
    subject = "all feedback" if f.dimension == "all" else f"{noun} {group}"
    if f.is_change:
        where = subject + context
        look = "find what changed" + ("" if f.dimension == "all" else f" for {where}")
        if f.effect < 0:
            return "decline", f"{where} {what} {_amount(f)} lower than in the previous period ({_evidence(f)}): {look}"
        return "improvement", (f"{where} {what} {_amount(f)} higher than in the previous period ({_evidence(f)}): "
                               "keep what changed")  # fmt: skip
    target = context.removeprefix(" on ") or "its traffic"
    if f.effect < 0:
        return "worse_than_reference", (f"{subject} {what} {_amount(f)} lower than {ref}{context} ({_evidence(f)}): "
                                        f"route {target} to {ref} or revise {group}")  # fmt: skip
    return "better_than_reference", (f"{subject} {what} {_amount(f)} higher than {ref}{context} ({_evidence(f)}): "
                                     f"prefer {group} over {ref}{context}")  # fmt: skip


def suggest(insights: Insights) -> list[Suggestion]:
    """The suggestions of the significant findings, highest impact first (ties: the text)."""
    best: dict[tuple[str, str, str], Suggestion] = {}
    for f in insights.significant:
        rule, text = _text(f)
        s = Suggestion(rule, text, abs(f.effect) / _RANGE[f.metric] * f.n, f)
        key = (f.dimension, f.group, f.compared_to)
        if key not in best or (s.impact, s.text) > (best[key].impact, best[key].text):
            best[key] = s
    return sorted(best.values(), key=lambda s: (-s.impact, s.text))


def hook_input(suggestions: Sequence[Suggestion]) -> list[dict[str, Any]]:
    """What the text hook gets: per suggestion, only :data:`HOOK_FIELDS` (aggregates, no event text)."""
    out = []
    for s in suggestions:
        record = s.to_json()
        out.append({k: record[k] for k in HOOK_FIELDS})
    return out


def load_hook(spec: str) -> Callable[[list[dict[str, Any]]], str | None]:
    """The callable ``module:attribute`` names. Raises ``ValueError`` saying what is wrong with it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"suggest_text_hook {spec!r} must be module:callable, e.g. mypkg.summaries:summarize")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"suggest_text_hook: cannot import {module_name!r} ({exc})") from None
    for part in attr.split("."):
        target = getattr(target, part, None)
    if not callable(target):
        raise ValueError(f"suggest_text_hook: {spec!r} is not a callable")
    return target  # type: ignore[no-any-return]
