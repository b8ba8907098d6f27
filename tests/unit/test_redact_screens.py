"""redact_text's pre-screens only skip a rule whose pattern cannot match: the output (and the
counts) are those of the same rules run on every string, on generated text that mixes
PII-like fragments with plain words."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_processors import redact as redact_module
from stream_processors.redact import redact_payload, redact_text


def reference_redact_text(text: str, counts: Counter[str] | None = None) -> str:
    """``redact_text`` as it was before the screens (only the '@' test before EMAIL), over the
    module's rules: it keeps checking the screens when the rules themselves change."""
    for kind, pattern, valid, *_screens in redact_module._RULES:

        def replace(m: re.Match[str], kind: str = kind, valid: Any = valid, source: str = text) -> str:
            if valid is not None and not valid(m, source):
                return m.group()
            if counts is not None:
                counts[kind] += 1
            return redact_module._placeholder(m, kind)

        text = pattern.sub(replace, text)
    return text


def reference_redact_payload(payload: dict[str, Any], counts: Counter[str] | None = None) -> dict[str, Any]:
    out = dict(payload)
    for key in ("text", "comment", "corrected_response"):
        if isinstance(out.get(key), str):
            out[key] = reference_redact_text(out[key], counts)
    extra: dict[str, Any] = {}
    for k, v in payload["extra"].items():
        new = reference_redact_text(k, counts)
        base, n = new, 2
        while new != k and (new in extra or new in payload["extra"]):
            new, n = f"{base}#{n}", n + 1
        extra[new] = reference_redact_text(v, counts) if isinstance(v, str) else v
    out["extra"] = extra
    return out


# --- text --------------------------------------------------------------------------------

FRAGMENTS = [
    # e-mail
    "alice@example.com", "bob.smith+tag@mail.example.co.uk", "a@b", "x@y.z", "@", "user@localhost", "mail me:",
    # phones
    "+41 44 668 18 00", "+1 (415) 555-0132", "(415) 555-0132", "415-555-0132", "415.555.0132", "030 1234 5678",
    "020 7946 0958", "0800 123", "+44", "+", "0 12", "call 079 123 45 67",
    # cards, IBANs, order numbers
    "4111 1111 1111 1111", "5500-0000-0000-0004", "4111111111111111", "378282246310005", "1234 5678 9012 3456",
    "DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "CH93 0076 2011 6238 5295 7", "DE00 0000 0000 0000",
    "order #", "ISBN 978-3-16-148410-0", "invoice no. 4111111111111111", "ref", "v",
    # addresses, times, versions
    "203.0.113.9", "10.0.0.1", "256.1.1.1", "1.2.3", "v1.2.3.4", "2001:db8::1", "fe80::1", "::", "::1", "a:b:c",
    "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "10:30:00", "12:00", "1:2:3:4:5:6:7:8", "ff::gg",
    # SSNs, dates, prices
    "123-45-6789", "000-12-3456", "666-12-3456", "912-34-5678", "123-00-4567", "2026-11-23", "$19.99", "3.5",
    # secrets
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dBjftJeZ4CVP", "eyJ", "eyJabc.eyJ", "Bearer abcdefghijklmnop",
    "BEARER abc.def-ghi_jkl", "bearer\tXXXXXXXXXXXXXXXX", "bearer short", "Authorization: Bearer",
    "sk_live_abcdefghijklmnop1234", "pk-test-0123456789abcdefgh", "rk_0123456789abcdef", "sk-proj-",
    "AKIAIOSFODNN7EXAMPLE", "AKIA", "ghp_" + "a" * 36, "gho_abc", "xoxb-1234567890-abc", "xox",
    "AIza" + "B" * 35, "AIza", "api_key=supersecret123", "API-KEY : hunter22222", "secret=abcdef", "password:hunter2",
    "password=", "key=value",
    # families added with the linear-time rules (and their (?i) look-alike letters)
    "-----BEGIN RSA PRIVATE KEY-----\nMIIE+/=\n-----END RSA PRIVATE KEY-----", "-----BEGIN PRIVATE KEY-----",
    "postgres://user:pw@db", "redis://:secret1@h", "x://a:b", "github_pat_" + "A" * 30, "xapp-1-A012345678-1",
    "https://hooks.slack.com/services/T0/B0/x", "whsec_" + "a" * 24, "ya29." + "a" * 24, "1//0" + "a" * 30,
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "john dot doe at example dot com", "a [at] b [dot] com",
    "a(at)b(dot)org", " AT ", " DOT ", "josé@exämple.de", "用户@例子.广告", "pa\u017fsword=hunter22",
    "\u212aey: abcdefgh", "tok\u212aen=abcdefgh", "BE\u212aRER", "be\u0430rer", "at", "dot", "(at)", "[dot]",
    "+49 30 12345678", "07700 900123", "01 23 45 67 89", "(11) 91234-5678", "98765 43210", "Petrov: ",
    # digits that are not ASCII, look-alikes, separators
    " ".join(["\u0664\u0661\u0661\u0661", *["\u0661" * 4] * 3]),  # Arabic-Indic digits
    "\u0967\u0968\u0969-\u096a\u096b-\u096c\u096d\u096e\u096f", "\uff10\uff11\uff12\uff13",  # Devanagari, full-width
    "\u017fk_live", "\uff21\uff2b\uff29\uff21", "\u212aey", "BEAR\u0130R", "be\u0430rer",  # look-alike letters
]  # fmt: skip
WORDS = ["nice", "answer", "thanks", "the", "model", "was", "wrong", "see", "at", "call", "my", "é", "ß", "日本"]
SEPARATORS = ["", " ", "  ", ",", ", ", ".", "-", ":", "\n", "\t", "/", "(", ")", "+", "=", "_", "#", "@", "'"]

fragments = st.sampled_from(FRAGMENTS)
matches = st.one_of(*(st.from_regex(pattern) for _, pattern, *_ in redact_module._RULES))
digits_and_marks = st.text(alphabet="0123456789 -.:/()+@_=ABCDEFabcdef", max_size=24)
pieces = st.one_of(fragments, fragments, matches, st.sampled_from(WORDS), digits_and_marks, st.text(max_size=8))
texts = st.builds(
    lambda parts, seps: "".join(p + s for p, s in zip(parts, seps, strict=False)),
    st.lists(pieces, max_size=8),
    st.lists(st.sampled_from(SEPARATORS), min_size=8, max_size=8),
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
def test_redact_text_is_the_unscreened_result_for_any_text(text: str) -> None:
    counts: Counter[str] = Counter()
    expected_counts: Counter[str] = Counter()
    assert redact_text(text, counts) == reference_redact_text(text, expected_counts)
    assert counts == expected_counts


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts | matches)
def test_every_screen_only_skips_a_pattern_that_cannot_match(text: str) -> None:
    """Rule by rule, on the same text: a screen that says "skip" means no match at all."""
    for kind, pattern, _valid, needs_digit, screen, _name in redact_module._RULES:
        skipped = (needs_digit and redact_module._DIGIT(text) is None) or (screen is not None and not screen(text))
        if skipped:
            assert pattern.search(text) is None, (kind, text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.fixed_dictionaries(
        {
            "text": st.none() | texts,
            "comment": st.none() | texts,
            "corrected_response": st.none() | texts,
            "extra": st.dictionaries(
                st.text(max_size=5), st.none() | st.integers() | st.booleans() | texts, max_size=4
            ),
        }
    )
)
def test_redact_payload_is_the_unscreened_result(payload: dict[str, Any]) -> None:
    counts: Counter[str] = Counter()
    expected_counts: Counter[str] = Counter()
    assert redact_payload(payload, counts) == reference_redact_payload(payload, expected_counts)
    assert counts == expected_counts


def test_plain_text_runs_no_pattern(monkeypatch: Any) -> None:
    """Not vacuous: a typical comment passes every screen's "skip"."""

    class Refuse:
        def __init__(self, kind: str) -> None:
            self.kind = kind

        def sub(self, *_: Any) -> str:
            raise AssertionError(f"{self.kind} ran")

    rules = tuple(rule._replace(pattern=Refuse(rule.kind)) for rule in redact_module._RULES)
    monkeypatch.setattr(redact_module, "_RULES", rules)
    for text in ["nice answer, thanks", "up", "the model was wrong", "Überraschend gut!", ""]:
        assert redact_text(text) == text


def test_screened_rules_still_find_their_pii() -> None:
    cases = {
        "mail me: alice@example.com": "mail me: [EMAIL]",
        "token Bearer abcdefghijklmnop ok": "token Bearer [TOKEN] ok",
        "BEARER abcdefghijklmnopqrst": "BEARER [TOKEN]",
        "key sk_live_abcdefghijklmnop1234": "key [SECRET]",
        "from 2001:db8::1 today": "from [IP] today",
        "ssn 123-45-6789": "ssn [SSN]",
        "card 4111 1111 1111 1111": "card [CARD]",
        "ip 203.0.113.9": "ip [IP]",
        "call +41 44 668 18 00": "call [PHONE]",
        "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dBjftJeZ4CVP": "jwt [JWT]",
        "pay DE89 3704 0044 0532 0130 00": "pay [IBAN]",
    }
    for text, redacted in cases.items():
        assert redact_text(text) == redacted == reference_redact_text(text)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts | matches)
def test_redacting_twice_changes_and_counts_nothing_more(text: str) -> None:
    """The export checks redacted text again: a placeholder is never found a second time."""
    once = redact_text(text)
    counts: Counter[str] = Counter()
    assert redact_text(once, counts) == once
    assert counts == Counter()
