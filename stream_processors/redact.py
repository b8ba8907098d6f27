"""PII redaction with typed placeholders.

Finds e-mail addresses (plain, internationalized and obfuscated: ``john dot doe at
example dot com``), phone numbers (international and the common national formats),
payment card numbers (Luhn-checked), IBANs (mod-97-checked), IPv4/IPv6 addresses, US
social security numbers and secrets (PEM private keys, JWTs, bearer tokens, vendor API
keys and webhook URLs, AWS secret keys, credentials in connection strings, values of
``password=``-like keys), and replaces each with ``[EMAIL]``, ``[PHONE]``, ``[CARD]``,
``[IBAN]``, ``[IP]``, ``[SSN]``, ``[JWT]``, ``[TOKEN]`` or ``[SECRET]``. Things that only
look similar — versions, dates, times, prices, order and ISBN numbers, UUIDs, commit
SHAs, model names — are left alone: candidates are validated (checksums, address
parsing) and checked for context words before they are replaced.

Every rule runs in time linear in the text (see :mod:`stream_processors.redact_rules`).
"""

from __future__ import annotations

import functools
import hmac
import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from stream_processors.redact_rules import RULES, Rule

__all__ = [
    "ID_FIELDS",
    "KINDS",
    "TEXT_KEYS",
    "guard_text",
    "pseudonymize",
    "redact_event",
    "redact_extra",
    "redact_payload",
    "redact_text",
]

_RULES: tuple[Rule, ...] = RULES
_DIGIT = re.compile(r"\d").search  # \d as the patterns read it (any Unicode decimal digit)

KINDS = tuple(dict.fromkeys(rule.kind for rule in _RULES))

#: Payload keys whose values are free text, like ``payload.text``: the text guard removes them
#: unless text is allowed, as ``track()`` leaves out prompt and response snapshots.
TEXT_KEYS = frozenset(
    {
        "text", "prompt", "response", "output", "completion", "answer", "input", "query", "question",
        "message", "content", "transcript", "system", "system_prompt", "user_message", "assistant_message",
        "prompt_text", "response_text", "output_text", "completion_text", "interaction_prompt",
        "interaction_response", "raw_text", "conversation", "chat", "messages", "context",
    }
)  # fmt: skip

#: Top-level string fields that are redacted like payload text.
ID_FIELDS = ("session_id", "idempotency_key")


def _placeholder(m: re.Match[str], kind: str) -> str:
    """``[KIND]`` for the match, or the match with only its ``v``/``w`` groups replaced."""
    if not m.re.groupindex:
        return f"[{kind}]"
    whole, base, pos = m.group(), m.start(), 0
    parts: list[str] = []
    for name in m.re.groupindex:
        start, end = m.span(name)
        if start < 0:
            continue
        parts += (whole[pos : start - base], f"[{kind}]")
        pos = end - base
    parts.append(whole[pos:])
    return "".join(parts)


#: Short strings seen to hold nothing to redact. Payload keys and enum values ("direction",
#: "up", "signal", "copy"...) come with nearly every event; looking one up here costs a string
#: hash instead of the rules' screens (~5 us). Redaction is a function of the text alone, so a
#: string that redacted to itself always will; the set is cleared when full.
_CLEAN: set[str] = set()
_CLEAN_MAX_CHARS = 64
_CLEAN_MAX = 20_000


def redact_text(text: str, counts: Counter[str] | None = None) -> str:
    """``text`` with every PII match replaced by its placeholder; adds to ``counts`` per kind."""
    if text in _CLEAN:
        return text
    original = text
    digits: bool | None = None  # whether the text holds a digit, found out when a rule needs it
    for kind, pattern, valid, needs_digit, screen, _name in _RULES:
        if needs_digit:
            if digits is None:
                digits = _DIGIT(text) is not None
            if not digits:
                continue
        if screen is not None and not screen(text):
            continue

        def replace(m: re.Match[str], kind: str = kind, valid: Any = valid, source: str = text) -> str:
            if valid is not None and not valid(m, source):
                return m.group()
            if counts is not None:
                counts[kind] += 1
            return _placeholder(m, kind)

        out = pattern.sub(replace, text)
        if out is not text:  # something was replaced (or rebuilt as it was): screen the new text
            text, digits = out, None
    if len(original) <= _CLEAN_MAX_CHARS and text == original:
        if len(_CLEAN) >= _CLEAN_MAX:
            _CLEAN.clear()
        _CLEAN.add(original)
    return text


def redact_extra(
    extra: dict[str, Any], counts: Counter[str] | None = None, *, text: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """A copy of the payload map with keys and string values redacted (by ``text``, default
    :func:`redact_text` counting into ``counts``); a key that redacts to one already there
    gets ``#2``, ``#3``... so no value is lost."""
    redact: Callable[[str], str] = text or (lambda s: redact_text(s, counts))
    out: dict[str, Any] = {}
    for key, value in extra.items():
        new_key = redact(key) if isinstance(key, str) else key
        if new_key != key:
            n = 2
            base = new_key
            while new_key in out or new_key in extra:
                new_key, n = f"{base}#{n}", n + 1
        out[new_key] = redact(value) if isinstance(value, str) else value
    return out


def redact_payload(payload: dict[str, Any], counts: Counter[str] | None = None) -> dict[str, Any]:
    """A copy of an Avro-form payload with every string (free text, map keys and map values)
    redacted."""
    out = dict(payload)
    for key in ("text", "comment", "corrected_response"):
        if isinstance(out.get(key), str):
            out[key] = redact_text(out[key], counts)
    out["extra"] = redact_extra(payload["extra"], counts)
    return out


def _redact_id(value: str, counts: Counter[str] | None, pseudonym_key: bytes | None) -> str:
    out = redact_text(value, counts)
    if out != value and pseudonym_key is not None:
        return "p_" + hmac.digest(pseudonym_key, value.encode("utf-8"), "sha256").hex()[:32]  # still distinct
    return out


def redact_event(
    event: dict[str, Any], counts: Counter[str] | None = None, *, pseudonym_key: bytes | None = None
) -> dict[str, Any]:
    """A copy of an Avro-form event with its payload (keys and values), ``tags``,
    ``session_id`` and ``idempotency_key`` redacted. With ``pseudonym_key``, an id in which
    PII was found becomes a keyed pseudonym instead (so two sessions stay two)."""
    out = dict(event)
    if isinstance(out.get("payload"), dict):
        out["payload"] = redact_payload(out["payload"], counts)
    tags: Iterable[Any] | None = out.get("tags")
    if tags:
        out["tags"] = [redact_text(t, counts) if isinstance(t, str) else t for t in tags]
    for name in ID_FIELDS:
        value = out.get(name)
        if isinstance(value, str):
            out[name] = _redact_id(value, counts, pseudonym_key)
    return out


def guard_text(payload: dict[str, Any], allow_text: bool) -> tuple[dict[str, Any], bool]:
    """The text guard: unless ``allow_text``, ``payload.text`` and every free-text key of the
    map (:data:`TEXT_KEYS`, any case) are removed. Returns the payload and whether anything
    was removed. ``comment`` and ``corrected_response`` are the feedback itself, and stay."""
    if allow_text:
        return payload, False
    extra = payload.get("extra") or {}
    drop = [k for k in extra if isinstance(k, str) and k.lower() in TEXT_KEYS]
    if payload.get("text") is None and not drop:
        return payload, False
    out = {**payload, "text": None}
    if drop:
        out["extra"] = {k: v for k, v in extra.items() if k not in drop}
    return out, True


@functools.lru_cache(maxsize=65_536)  # the gate asks twice per event (subject, stored id); users recur
def pseudonymize(user_id: str, key: bytes) -> str:
    """A stable keyed pseudonym (HMAC-SHA256) for ``user_id``: same input and key, same output."""
    return "u_" + hmac.digest(key, user_id.encode("utf-8"), "sha256").hex()[:32]
