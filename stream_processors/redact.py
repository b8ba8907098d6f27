"""PII redaction with typed placeholders.

Finds e-mail addresses, phone numbers (international and national formats),
payment card numbers (Luhn-checked), IBANs (mod-97-checked), IPv4/IPv6
addresses, US social security numbers and secrets (JWTs, bearer tokens, API
keys), and replaces each with ``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ``[IBAN]``,
``[IP]``, ``[SSN]``, ``[JWT]``, ``[TOKEN]`` or ``[SECRET]``. Things that only look
similar — versions, dates, times, prices, order and ISBN numbers — are left
alone: candidates are validated (checksums, address parsing) and checked for
context words before they are replaced.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

__all__ = ["KINDS", "pseudonymize", "redact_payload", "redact_text"]

_NOT_PII_CONTEXT = re.compile(
    r"(?i)(isbn|order|invoice|tracking|ticket|ref(erence)?|version|ver\.|v)\W{0,3}(no\.?|number|#)?\W{0,3}$"
)


def _luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    try:
        return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1
    except ValueError:
        return False


def _context_says_not_pii(text: str, start: int) -> bool:
    return bool(_NOT_PII_CONTEXT.search(text[max(0, start - 20) : start]))


def _card(m: re.Match[str], text: str) -> bool:
    digits = re.sub(r"\D", "", m.group())
    if not 13 <= len(digits) <= 19 or digits[0] not in "23456":
        return False
    return _luhn_ok(digits) and not _context_says_not_pii(text, m.start())


def _ipv6(m: re.Match[str], _text: str) -> bool:
    candidate = m.group()
    if "::" not in candidate and candidate.count(":") != 7:
        return False  # "10:30:00" is a time, not an address
    try:
        ipaddress.IPv6Address(candidate)
        return True
    except ValueError:
        return False


def _ipv4(m: re.Match[str], text: str) -> bool:
    return not _context_says_not_pii(text, m.start())


def _ssn(m: re.Match[str], text: str) -> bool:
    area, group, serial = m.group().split("-")
    valid = area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"
    return valid and not _context_says_not_pii(text, m.start())


def _phone(m: re.Match[str], text: str) -> bool:
    digits = re.sub(r"\D", "", m.group())
    # National numbers (leading 0) have 9-12 digits; longer runs are account or reference numbers.
    low, high = (9, 12) if m.group().startswith("0") else (7, 15)
    return low <= len(digits) <= high and not _context_says_not_pii(text, m.start())


_Validator = Callable[[re.Match[str], str], bool]
#: A rule's pre-screen: False only when its pattern cannot match the text (derived from the
#: regular expression, not its validator), so the pattern runs on few strings.
_Screen = Callable[[str], bool]
# After a number: no word character, and no '.', '-' or ' ' that continues it with another digit.
_END = r"(?![\w]|[.\-]\d| \d)"
_BEARER = re.compile(r"(?i)bearer").search  # the TOKEN rule's lookbehind word, matched as it matches it
_DIGIT = re.compile(r"\d").search  # \d as the patterns read it (any Unicode decimal digit)
# kind, pattern, validator, needs a digit (\d) to match, screen (None: no other requirement).
_RULES: tuple[tuple[str, re.Pattern[str], _Validator | None, bool, _Screen | None], ...] = (
    (
        "JWT",
        re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]+"),
        None,
        False,
        lambda t: "eyJ" in t,
    ),
    ("TOKEN", re.compile(r"(?i)(?<=\bbearer\s)[A-Za-z0-9._~+/=-]{12,}"), None, False, lambda t: _BEARER(t) is not None),
    (
        "SECRET",
        re.compile(
            r"\b(?:sk|pk|rk)[-_](?:live|test|proj|ant)?[-_]?[A-Za-z0-9_-]{16,}"
            r"|\bAKIA[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{30,}\b|\bxox[abprs]-[A-Za-z0-9-]{10,}"
            r"|\bAIza[0-9A-Za-z_-]{35}\b"
            r"|(?i:(?<=api[_-]key[=:])|(?<=api[_-]key\s[=:]\s)|(?<=secret[=:])|(?<=password[=:]))\s*[^\s,;]{6,}"
        ),
        None,
        False,
        # Each alternative's literal: "k-" or "k_", "AKIA", "_", "xox", "AIza", "=" or ":".
        lambda t: "_" in t or "k-" in t or "=" in t or ":" in t or "AKIA" in t or "AIza" in t or "xox" in t,
    ),
    (
        "EMAIL",
        re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
        None,
        False,
        lambda t: "@" in t,
    ),
    (
        "IBAN",
        re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"),
        lambda m, _t: _iban_ok(m.group()),
        True,
        None,
    ),
    ("CARD", re.compile(r"(?<![\w.])(?:\d[ -]?){12,18}\d" + _END), _card, True, None),
    ("SSN", re.compile(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])"), _ssn, True, lambda t: "-" in t),
    # At least two ':' ({2,7} of them), hex digits optional: no \d needed.
    (
        "IP",
        re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"),
        _ipv6,
        False,
        lambda t: t.count(":") > 1,
    ),
    (
        "IP",
        re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)" + _END),
        _ipv4,
        True,
        lambda t: "." in t,
    ),
    (
        "PHONE",
        re.compile(
            # +41 44 668 18 00
            r"(?<![\w+])\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]?\d{2,4}){1,4}(?![\w])"
            r"|(?<![\w(])\(\d{3}\)\s?\d{3}[\s.-]\d{4}(?!\w)"  # (415) 555-0132
            r"|(?<![\w.-])\d{3}[.-]\d{3}[.-]\d{4}" + _END + "|"  # 415-555-0132
            r"(?<![\w.+-])(?<!\d )0\d{1,4}(?:[ /-]\d{2,4}){1,4}" + _END  # 030 1234 5678, 020 7946 0958
        ),
        _phone,
        True,
        None,
    ),
)

KINDS = tuple(dict.fromkeys(kind for kind, *_ in _RULES))


def redact_text(text: str, counts: Counter[str] | None = None) -> str:
    """``text`` with every PII match replaced by its placeholder; adds to ``counts`` per kind."""
    digits: bool | None = None  # whether the text holds a digit, found out when a rule needs it
    for kind, pattern, valid, needs_digit, screen in _RULES:
        if needs_digit:
            if digits is None:
                digits = _DIGIT(text) is not None
            if not digits:
                continue
        if screen is not None and not screen(text):
            continue

        def replace(m: re.Match[str], kind: str = kind, valid: _Validator | None = valid, source: str = text) -> str:
            if valid is not None and not valid(m, source):
                return m.group()
            if counts is not None:
                counts[kind] += 1
            return f"[{kind}]"

        out = pattern.sub(replace, text)
        if out is not text:  # something was replaced (or rebuilt as it was): screen the new text
            text, digits = out, None
    return text


def redact_payload(payload: dict[str, Any], counts: Counter[str] | None = None) -> dict[str, Any]:
    """A copy of an Avro-form payload with every string (free text and map values) redacted."""
    out = dict(payload)
    for key in ("text", "comment", "corrected_response"):
        if isinstance(out.get(key), str):
            out[key] = redact_text(out[key], counts)
    out["extra"] = {k: redact_text(v, counts) if isinstance(v, str) else v for k, v in payload["extra"].items()}
    return out


@functools.lru_cache(maxsize=65_536)  # the gate asks twice per event (subject, stored id); users recur
def pseudonymize(user_id: str, key: bytes) -> str:
    """A stable keyed pseudonym (HMAC-SHA256) for ``user_id``: same input and key, same output."""
    return "u_" + hmac.digest(key, user_id.encode("utf-8"), "sha256").hex()[:32]
