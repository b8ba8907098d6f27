"""Redaction figures: texts/s beside one precompiled regex, and each rule's worst case.

``python -m stream_processors.redact_bench`` prints texts/s of :func:`redact_text` on a
realistic mix (mostly short clean texts, some with PII), the texts/s of a single
precompiled e-mail regex over the same mix (the baseline), and for every rule its worst
time per 100 KB over :data:`ADVERSARIAL` inputs. tests/unit/test_redact_linear.py uses the
same inputs; tests/unit/test_redact_corpus.py reports recall and kept.
"""

from __future__ import annotations

import argparse
import random
import re
import time
from collections.abc import Callable

from stream_processors.redact import redact_text
from stream_processors.redact_rules import RULES, Rule

__all__ = ["ADVERSARIAL", "adversarial_text", "realistic_mix", "rule_seconds", "texts_per_second"]

#: Repeating units that make a backtracking pattern do the most work per character: runs a
#: pattern's leading part accepts with the one character it needs next missing or misplaced.
ADVERSARIAL: tuple[str, ...] = (
    "a.", "a", "a@", "@a.", "a.a@", "a@a.", "a-", "_a", "%+",
    "1", "1 ", "1-", "12-", "01 ", "0", "+1 ", "+", "+1", "(1)", "(0", "(01) ", "0 ", "1.", "1:", ":", "a:", "ff:",
    "1/", "0/1", "1  ", "1 -", "+1 (1", "123 456 ", "1-800-", "01 23 ", "4111 ", "123-45-", "1.1.1.",
    "eyJ", "-eyJ", "eyJaaaaa.", "eyJaaaaa.eyJaaaaa.", "bearer ", "Bearer aaaaaaaaaaaaa ", "authorization: basic ",
    "password=", "token:", "password=aaaaaa", "secret: ", "api_key=", "a://", "postgres://a:", "x://a:b",
    "a://:", "sk_", "sk-", "ghp_", "github_pat_", "xoxb-", "xapp-", "AKIA", "ya29.", "1//0", "SG.", "whsec_",
    "https://hooks.slack.com/services/", "A", "Aa1/", "Aa1+", "-----BEGIN PRIVATE KEY-----", "-----BEGIN ",
    "-----BEGIN RSA PRIVATE KEY-----\nAAAA", "-----", "a at ", "a dot ", "a [at] ", "a [dot] ", "a dot a at a dot ",
    " ", "a (at) a (dot) ", "a@a dot ", "a.a.a at ", "at ", "dot ", "[at]", "[dot]", "a  at  a  dot  ",
    "DE89 ", "AA11", "DE89 3704 ", "é", "日本", "a\n",
)  # fmt: skip


def adversarial_text(unit: str, size: int) -> str:
    """``unit`` repeated to ``size`` characters, then one '@' (the issue's quadratic case)."""
    return (unit * (size // len(unit) + 1))[: size - 1] + "@"


def _rule_runner(rule: Rule) -> Callable[[str], str]:
    """The rule alone, no screen: its pattern and validator over the whole text."""

    def replace(m: re.Match[str], text: str) -> str:
        return m.group() if rule.valid is not None and not rule.valid(m, text) else f"[{rule.kind}]"

    return lambda text: rule.pattern.sub(lambda m: replace(m, text), text)


def rule_seconds(rule: Rule, text: str, repeat: int = 3) -> float:
    """Best-of-``repeat`` CPU seconds of this process for ``rule`` over ``text`` (CPU time:
    the machine's other work does not count, as it would in wall-clock time)."""
    run = _rule_runner(rule)
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        run(text)
        best = min(best, time.process_time() - start)
    return best


_CLEAN = (
    "nice answer, thanks", "up", "down", "the model was wrong", "copy", "Überraschend gut!", "too slow",
    "great, exactly what I needed", "it cited the wrong paper", "answer was cut off at the end",
    "works on version 1.2.3 but not 1.3.0", "the date should be 2024-08-06", "meeting at 10:30 tomorrow",
    "it costs $19.99, not $29.99", "order #123456 arrived late", "gpt-4o-2024-08-06 did better",
    "see commit 9fceb02d0ae598e95dc970b74767f19372d61af8", "refund for ISBN 978-3-16-148410-0",
    "日本語の回答が良かった", "la réponse était correcte", "thumbs down, hallucinated a citation",
    "id 550e8400-e29b-41d4-a716-446655440000", "", "ok", "meh", "please add more examples",
)  # fmt: skip
_WITH_PII = (
    "mail me at alice@example.com", "call 415 555 0132 please", "my card 4111 1111 1111 1111 was charged",
    "token Bearer abcdefghijklmnop1234", "from 203.0.113.9", "password=hunter22 leaked",
)  # fmt: skip


def realistic_mix(n: int, seed: int = 7) -> list[str]:
    """``n`` texts: 95% short clean feedback (with look-alikes), 5% with PII."""
    rng = random.Random(seed)
    return [rng.choice(_WITH_PII) if rng.random() < 0.05 else rng.choice(_CLEAN) for _ in range(n)]


def texts_per_second(function: Callable[[str], object], texts: list[str], repeat: int = 3) -> float:
    """Texts per CPU second of this process, best of ``repeat`` passes over ``texts``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for text in texts:
            function(text)
        best = min(best, time.process_time() - start)
    return len(texts) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=100_000, help="adversarial input size, characters")
    args = parser.parse_args()
    texts = realistic_mix(args.texts)
    baseline = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
    print(f"redact_text: {texts_per_second(redact_text, texts):,.0f} texts/s")
    print(f"one precompiled regex (sub): {texts_per_second(lambda t: baseline.sub('[EMAIL]', t), texts):,.0f} texts/s")
    print(f"worst case per rule, ms per {args.size // 1000} KB of adversarial input:")
    for rule in RULES:
        worst, unit_of = 0.0, ""
        for unit in ADVERSARIAL:
            seconds = rule_seconds(rule, adversarial_text(unit, args.size), repeat=2)
            if seconds > worst:
                worst, unit_of = seconds, unit
        print(f"  {rule.name:18} {worst * 1000:7.1f} ms  (unit {unit_of!r})")


if __name__ == "__main__":
    main()
