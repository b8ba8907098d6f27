"""The redaction rules: one pattern, validator and pre-screen per family of PII.

Every pattern runs in time linear in the text (tests/unit/test_redact_linear.py measures
each on adversarial input). Two habits make that hold with a backtracking engine:

* a pattern's leading run is anchored at the start of the run (a negative lookbehind on
  the run's own characters), so a failed attempt is never repeated from inside the run;
* what follows is possessive (``*+``, ``{m,n}+``) or bounded (``{m,n}``), so a failed
  attempt costs at most the run it scanned, or a constant.

A rule may replace only part of its match: named groups ``v``/``w`` are the spans replaced
(a connection string keeps its scheme and host, ``password=`` keeps its key).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["RULES", "Rule", "context_says_not_pii"]

Validator = Callable[[re.Match[str], str], bool]
#: A rule's pre-screen: False only when its pattern cannot match the text (derived from the
#: regular expression, not its validator), so the pattern runs on few strings.
Screen = Callable[[str], bool]


class Rule(NamedTuple):
    kind: str  # the placeholder, [KIND]
    pattern: re.Pattern[str]
    valid: Validator | None
    needs_digit: bool  # the pattern cannot match without a \d
    screen: Screen | None  # None: no other requirement
    name: str  # names the rule in tests and figures


# Words that, just before a number, say it is a reference, not PII. Each is a whole word
# (Chinese or Japanese may touch it): "Petrov: 123-45-6789" is not "v: 123-45-6789".
_NOT_PII_CONTEXT = re.compile(
    r"(?i)(?<![a-z0-9_])(?:isbn(?:-1[03])?|order|invoice|tracking|ticket|ref(?:erence)?|version|ver\.|v|sku|build|serial"
    r"|case|confirmation|booking|po|epoch|timestamp|ts|issue|pr|bug)"
    r"\W{0,3}(?:no\.?|number|num|id|#)?\W{0,3}$"
)


def context_says_not_pii(text: str, start: int) -> bool:
    """Whether the 24 characters before ``start`` end with a reference word (order, ISBN...)."""
    return _NOT_PII_CONTEXT.search(text, max(0, start - 24), start) is not None


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


_NON_DIGIT = re.compile(r"\D")


def _card(m: re.Match[str], text: str) -> bool:
    digits = _NON_DIGIT.sub("", m.group())
    if not 13 <= len(digits) <= 19 or digits[0] not in "23456":
        return False
    return _luhn_ok(digits) and not context_says_not_pii(text, m.start())


def _ipv6(m: re.Match[str], _text: str) -> bool:
    import ipaddress

    candidate = m.group()
    if "::" not in candidate and candidate.count(":") != 7:
        return False  # "10:30:00" is a time, not an address
    try:
        ipaddress.IPv6Address(candidate)
        return True
    except ValueError:
        return False


def _ipv4(m: re.Match[str], text: str) -> bool:
    """An address that says something of someone: not 0.0.0.0, loopback, broadcast or multicast."""
    first = m.group().split(".", 1)[0]
    if first in ("0", "127") or int(first) >= 224:
        return False
    return not context_says_not_pii(text, m.start())


def _ssn_screen(t: str) -> bool:
    if t.isascii():
        low = t.lower()
        return "ssn" in low or "social security" in low
    return _SSN_WORD(t) is not None


def _ssn(m: re.Match[str], text: str) -> bool:
    area, group, serial = m.group().split("-")
    valid = area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"
    return valid and not context_says_not_pii(text, m.start())


_EXTENSION = re.compile(r"(?i)\s*(?:x|ext\.?|extension)\s*\d+$")


def _phone(m: re.Match[str], text: str) -> bool:
    number = _EXTENSION.sub("", m.group())
    digits = _NON_DIGIT.sub("", number)
    # National numbers (leading 0) have 9-12 digits, 00 and a country code 10-17; longer runs
    # are account or reference numbers.
    if number.startswith("00"):
        low, high = 10, 17
    elif number.startswith(("0", "(0")):
        low, high = 9, 12
    else:
        low, high = 7, 15
    return low <= len(digits) <= high and not context_says_not_pii(text, m.start())


_HEX = re.compile(r"[0-9a-fA-F]+")


def _aws_secret(m: re.Match[str], text: str) -> bool:
    """40 characters of base64 that mix cases and digits: an AWS secret access key, not a
    commit SHA (hex, one case) nor a word."""
    s = m.group()
    if _HEX.fullmatch(s):
        return False
    upper = sum(c.isupper() for c in s)
    lower = sum(c.islower() for c in s)
    digits = sum(c.isdigit() for c in s)
    return upper >= 2 and lower >= 2 and (digits >= 1 or "/" in s or "+" in s)


# After a number: no word character, and no '.', '-' or ' ' that continues it with another digit.
# A word character of a script written with spaces between words: a number may touch
# Chinese, Japanese or Korean text ("電話は03-1234-5678です"), not a Latin word.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f"
_WB = rf"[^\W{_CJK}]"
# After a number: no word character, and no '.', '-' or ' ' that continues it with another digit.
_END = rf"(?!{_WB}|[.\-]\d| \d)"
# Just after a number's first digit: it starts the number (no word, '+', '.', '-' or '/'
# before it, nor a digit and a separator).
_DIGIT_START = rf"(?<!(?:{_WB}|[+.\-/])\d)(?<!\d[\s.-]\d)"
# The same, except that a number and a space may come before.
_LOOSE_DIGIT_START = rf"(?<!(?:{_WB}|[+.\-/])\d)(?<!\d[.-]\d)"
# A phone extension: "x123", " ext. 12".
_EXT = r"(?:\s{0,2}(?:x|ext\.?|extension)\s{0,2}\d{1,6})?"
# Screens of the case-insensitive rules: on ASCII text, plain substring tests of its lower
# case (several times faster than a (?i) search); otherwise the (?i) search itself, since
# (?i) also matches letters that lower() leaves alone ("\u017f" matches "s").
_BEARER = re.compile(r"(?i)bearer|authorization").search  # the TOKEN rule's lookbehind words
_KEYWORD = re.compile(r"(?i)pass|pwd|secret|key|token").search
_SSN_WORD = re.compile(r"(?i)ssn|social security").search
_AT_OR_DOT = re.compile(r"(?i)[\s\[({<](?:at|dot)[\s\])}>]").search
_AT_OR_DOT_LOWER = re.compile(r"[\s\[({<](?:at|dot)[\s\])}>]").search


def _bearer_screen(t: str) -> bool:
    if t.isascii():
        low = t.lower()
        return "bearer" in low or "authorization" in low
    return _BEARER(t) is not None


def _keyword_screen(t: str) -> bool:
    if t.isascii():
        low = t.lower()
        return "pass" in low or "pwd" in low or "secret" in low or "key" in low or "token" in low
    return _KEYWORD(t) is not None


def _at_or_dot_screen(t: str) -> bool:
    if "@" in t:
        return True
    if t.isascii():
        return _AT_OR_DOT_LOWER(t.lower()) is not None
    return _AT_OR_DOT(t) is not None


def _uppercase_ascii(t: str) -> bool:
    """Whether ``t`` may hold an ASCII capital (IBANs start with two): False only when not."""
    return not t.isascii() or t != t.lower()


# Word characters, with the combining marks \w leaves out (Devanagari vowel signs, accents).
_W = r"\w\u0300-\u036f\u0591-\u05c7\u064b-\u065f\u0670\u0900-\u0dff\u0e00-\u0e7f"
# Separators of an obfuscated address: " dot ", "[dot]", "(dot)"; " at ", "[at]", "(at)".
_SPELLED_DOT = r"(?:\s{0,2}[\[({<]\s{0,2}dot\s{0,2}[\])}>]\s{0,2}|\s{1,3}dot\s{1,3}|\s{1,2}\.\s{1,2})"
_BRACKET_AT = r"(?:\s{0,2}[\[({<]\s{0,2}at\s{0,2}[\])}>]\s{0,2})"
_ANY_DOT = rf"(?:{_SPELLED_DOT}|\.)"
_TLDS = (
    r"(?:com|org|net|edu|gov|mil|int|info|biz|io|ai|app|dev|me|co|uk|de|fr|es|it|nl|be|ch|at|se|no|dk|fi"
    r"|pl|pt|ie|cz|ru|ua|jp|cn|kr|in|br|mx|ar|au|nz|ca|us|za|sg|hk|tw|il|tr)(?![A-Za-z0-9_-])"
)
# "we met at the dot com bubble": a domain is not an article or a pronoun.
_NOT_A_WORD = r"(?!(?:the|a|an|my|our|your|his|her|their|this|that|its|one|some|any)\b)"
_LOCAL_PIECE = r"[\w%+-]{1,64}+"
_LABEL = r"[^\W_][\w-]{0,62}+"


def _obfuscated(local_sep: str, at: str, last_dot: str) -> str:
    # Bounded piece counts: at most 4 parts before the "at", 4 labels after it.
    return (
        rf"(?<![\w.%+-]){_LOCAL_PIECE}(?:{local_sep}{_LOCAL_PIECE}){{0,3}}{at}"
        rf"{_NOT_A_WORD}{_LABEL}(?:{_ANY_DOT}{_LABEL}){{0,3}}{last_dot}{_TLDS}"
    )


RULES: tuple[Rule, ...] = (
    Rule(
        "SECRET",
        # The whole block, header to footer; a block cut short is redacted to the end of its body.
        re.compile(
            # The body may be JSON-escaped ("\\n" between lines).
            r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY-----(?:[A-Za-z0-9+/=\s:,.\\]|-(?!----))*+"
            r"(?:-----END[A-Z0-9 ]{0,40}PRIVATE KEY-----)?"
        ),
        None,
        False,
        lambda t: "PRIVATE KEY-----" in t,
        "pem_private_key",
    ),
    Rule(
        "JWT",
        re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{5,}+\.eyJ[A-Za-z0-9_-]{5,}+\.[A-Za-z0-9_-]++"),
        None,
        False,
        lambda t: "eyJ" in t,
        "jwt",
    ),
    Rule(
        "TOKEN",
        re.compile(r"(?i)(?<=\bbearer\s)[A-Za-z0-9._~+/=-]{12,}+|(?<=\bauthorization:\sbasic\s)[A-Za-z0-9+/=]{8,}+"),
        None,
        False,
        _bearer_screen,
        "bearer_token",
    ),
    Rule(
        "SECRET",
        # user:password in a URL (postgres://user:secret@host): both go.
        re.compile(r"(?i)(?<![a-z0-9+.-])[a-z][a-z0-9+.-]{1,30}://(?P<v>[^\s:/@?#]{0,256}+:[^\s@/?#]{1,256}+)@"),
        None,
        False,
        lambda t: "://" in t,
        "url_credentials",
    ),
    Rule(
        "SECRET",
        # Vendor prefixes: every one but AKIA/ASIA, AIza, ya29. and SG. holds '_' or '-'.
        re.compile(
            r"(?<![A-Za-z0-9_-])(?:"
            r"(?:sk|pk|rk)[-_](?:live|test|proj|ant|svcacct|admin)?[-_]?[A-Za-z0-9_-]{16,}+"
            r"|whsec_[A-Za-z0-9+/=]{20,}+"
            r"|(?:AKIA|ASIA)[0-9A-Z]{16}(?![0-9A-Za-z])"
            r"|gh[pousr]_[A-Za-z0-9]{30,}+"
            r"|github_pat_[A-Za-z0-9_]{22,}+"
            r"|xox[abposre]-[A-Za-z0-9-]{10,}+"
            r"|xapp-[A-Za-z0-9-]{10,}+"
            r"|glpat-[A-Za-z0-9_-]{20,}+"
            r"|(?:hf|npm)_[A-Za-z0-9]{30,}+"
            r"|AIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])"
            r"|ya29\.[0-9A-Za-z_-]{20,}+"
            r"|1//0[0-9A-Za-z_-]{30,}+"
            r"|SG\.[A-Za-z0-9_-]{16,}+\.[A-Za-z0-9_-]{16,}+"
            r")"
            r"|https?://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9/_-]++"
            r"|https?://discord(?:app)?\.com/api/webhooks/[A-Za-z0-9/_-]++"
        ),
        None,
        False,
        lambda t: (
            "_" in t
            or "-" in t
            or "AKIA" in t
            or "ASIA" in t
            or "AIza" in t
            or "ya29." in t
            or "1//0" in t
            or "SG." in t
            or "://" in t
        ),
        "vendor_secret",
    ),
    Rule(
        "SECRET",
        # password=..., "api_key": "...", client_secret: ... — the value goes, the key stays.
        re.compile(
            r"(?i)(?<![a-z0-9_])(?:password|passwd|passphrase|pwd|secret|client[_-]?secret|api[_-]?key|apikey|api[_-]?secret"
            r"|access[_-]?key|access[_-]?token|auth[_-]?token|refresh[_-]?token|secret[_-]?key|private[_-]?key"
            r"|aws_secret_access_key|token)[\"']?\s{0,3}[=:]\s{0,3}[\"']?"
            r"(?!\[[A-Z]{2,6}\])(?P<v>[^\s\"',;&]{6,256}+)"  # not a placeholder already
        ),
        None,
        False,
        _keyword_screen,
        "keyword_secret",
    ),
    Rule(
        "SECRET",
        re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
        _aws_secret,
        False,
        lambda t: len(t) >= 40,
        "aws_secret_key",
    ),
    Rule(
        "EMAIL",
        # Unicode local parts and IDN domains (or their punycode, xn--).
        re.compile(
            rf"(?<![{_W}.%+-])[{_W}.%+-]++@(?:[^\W_][{_W}-]{{0,62}}+\.)+"
            rf"(?:[^\W\d_][{_W}]{{1,62}}+|xn--[a-z0-9-]{{1,59}}+)(?![{_W}-])"
        ),
        None,
        False,
        lambda t: "@" in t,
        "email",
    ),
    Rule(
        "EMAIL",
        re.compile(
            "(?i)"
            + _obfuscated(_ANY_DOT, _BRACKET_AT, _ANY_DOT)
            + "|"
            + _obfuscated(_ANY_DOT, r"(?:\s{1,3}at\s{1,3}|\s{0,2}@\s{0,2})", _SPELLED_DOT)
        ),
        None,
        False,
        _at_or_dot_screen,
        "obfuscated_email",
    ),
    Rule(
        "IBAN",
        re.compile(r"(?<![A-Za-z0-9_])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![A-Za-z0-9_])"),
        lambda m, _t: _iban_ok(m.group()),
        True,
        _uppercase_ascii,
        "iban",
    ),
    Rule("CARD", re.compile(rf"(?<!(?:{_WB}|\.))(?<!\d[ -])(?:\d[ -]?){{12,18}}\d" + _END), _card, True, None, "card"),
    Rule(
        "SSN", re.compile(rf"(?<!(?:{_WB}|-))\d{{3}}-\d{{2}}-\d{{4}}(?!{_WB}|-)"), _ssn, True, lambda t: "-" in t, "ssn"
    ),
    Rule(
        "SSN",
        # Named as one: "SSN 123 45 6789", "social security number: 123456789".
        re.compile(
            r"(?i)(?<![a-z0-9_])(?:ssn|social security(?: number| no\.?)?)\W{0,5}(?:(?:is|was)\s{1,3})?"
            r"(?P<v>\d{3}[- ]?\d{2}[- ]?\d{4})(?!\d)"
        ),
        None,
        True,
        _ssn_screen,
        "ssn_named",
    ),
    # At least two ':' ({2,7} of them), hex digits optional: no \d needed.
    Rule(
        "IP",
        re.compile(rf"(?<!(?:{_WB}|:))(?:[0-9A-Fa-f]{{0,4}}:){{2,7}}[0-9A-Fa-f]{{0,4}}(?!{_WB}|:)"),
        _ipv6,
        False,
        lambda t: t.count(":") > 1,
        "ipv6",
    ),
    Rule(
        "IP",
        re.compile(
            rf"(?<!(?:{_WB}|\.))(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){{3}}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
            + _END
            + r"(?!-[A-Za-z])"  # 1.2.3.4-beta is a version
        ),
        _ipv4,
        True,
        lambda t: "." in t,
        "ipv4",
    ),
    Rule(
        "PHONE",
        re.compile(
            # Each branch starts with the character it needs and looks behind it from there: the
            # engine then skips, in C, every position where no branch can start.
            # +1 (415) 555-0132, +44 7700 900123, +33 (0)1 23 45 67 89, +14155550132
            rf"\+(?<!(?:{_WB}|\+)\+)\d{{1,3}}(?:[\s.-]?\(\d{{0,4}}\))?[\s.-]?\d{{1,14}}+(?:[\s.-]\d{{1,10}}+){{0,6}}"
            + _EXT
            + rf"(?!{_WB})"
            # (415) 555-0132, (11) 91234-5678, (02) 9876 5432
            + rf"|\((?<!(?:{_WB}|\+)\()(?<!\d[\s.-]\()\d{{2,5}}\)[\s.-]?\d{{3,5}}[\s.-]?\d{{3,4}}"
            + _EXT
            + _END
            + "|"
            # The NANP forms with every separator are specific enough to follow another number
            # ("order 123456 1-800-555-0199"): 1-800-555-0199, 1 (800) 555-0199, 415 555 0132 x12.
            + r"\d"
            + _LOOSE_DIGIT_START
            + r"(?:"
            r"(?<=1)[\s.-]?\(\d{2,5}\)[\s.-]?\d{3,5}[\s.-]?\d{3,4}"
            r"|(?<=1)[\s.-][2-9]\d{2}[\s.-]\d{3}[\s.-]\d{4}"
            r"|(?<=[2-9])\d{2}[\s.-]\d{3}[\s.-]\d{4}"
            r")" + _EXT + _END + "|"
            # The rest only where no number comes just before: 18005550199, 4155550132, 415555-0132
            r"\d" + _DIGIT_START + r"(?:"
            r"(?<=1)[\s.-]?[2-9]\d{2}[\s.-]?\d{3}[\s.-]?\d{4}"
            + _EXT
            + r"|(?<=[2-9])\d{2}[\s.-]?\d{3}[\s.-]?\d{4}"
            + _EXT
            + r"|(?<=[6-9])\d{4}[\s-]\d{5}"  # 98765 43210 (IN)
            r"|(?<=1)[3-9]\d[\s-]\d{4}[\s-]\d{4}"  # 138 0013 8000 (CN)
            r"|(?<=[6-9])\d{2}(?: \d{2}){3}"  # 612 34 56 78 (ES)
            # 030 1234 5678, 07700 900123, 01 23 45 67 89, 03-1234-5678, 030/1234567, 07700900123
            r"|(?<=0)\d{1,5}+(?=[\s./-])(?:[\s./-]{1,2}\d{2,8}+){0,5}|(?<=0)\d{8,11}+(?:[\s./-]{1,2}\d{2,8}+){0,5}"
            r")"
            + _END
            # (030) 1234 5678
            + rf"|\((?<!(?:{_WB}|[+.\-/])\()(?<!\d[\s.-]\()0\d{{1,4}}\)(?:[\s./-]{{1,2}}\d{{2,8}}+){{0,5}}"
            + _END
        ),
        _phone,
        True,
        None,
        "phone",
    ),
)
