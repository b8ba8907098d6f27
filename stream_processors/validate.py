"""Validation beyond the schema: sizes and time bounds, with the field and the rule named.

Building the :class:`FeedbackEvent` model costs ~12 µs per event, most of it in the model's
Python validators, and the gate only needs the verdict. :func:`validate` therefore first
checks a decoded record in plain Python with the model's own rules (field types, lengths,
ranges and enum values read from ``FeedbackEvent.model_fields`` at import; the payload's
scalar map and the ``ts`` bounds as the model's validators state them), and accepts it only
when the model would certainly accept it. Anything else — a value of another type than
Avro decodes to, a broken constraint, a missing or unknown field, an empty ``hash`` (the
model would compute it), a string pydantic might refuse to read — goes through the model
itself (:func:`_validate_reference`), which names the field and the rule as before. The
limits after the model (payload size, reserved keys, text length, ``ts`` window) are one
function used by both paths. ``tests/unit/test_validate_fast.py`` compares the two on
generated records, valid and not.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, get_args, get_origin

import orjson
from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import ValidationError
from pydantic.types import AllowInfNan

from pipeline.errors import InvalidEvent
from schemas.avro_binary import from_micros, micros
from schemas.bulk import unwrap_optional
from schemas.models import _TS_MAX, _TS_MIN, FeedbackEvent, Payload, Scalar
from stream_processors.enrich import RESERVED_PREFIX

__all__ = ["Limits", "ValidatedEvent", "validate"]


@dataclass(frozen=True)
class Limits:
    max_payload_bytes: int = 64 * 1024
    max_text_chars: int = 32 * 1024
    max_future: timedelta = timedelta(minutes=5)
    max_age: timedelta = timedelta(days=90)


class ValidatedEvent:
    """What :func:`validate` returns: the accepted ``record``; the :class:`FeedbackEvent`
    (``.event``, and its attributes read through this object) is built on first use, from
    the record as it is then."""

    __slots__ = ("_event", "record")

    def __init__(self, record: dict[str, Any], event: FeedbackEvent | None = None) -> None:
        self.record = record
        self._event = event

    @property
    def event(self) -> FeedbackEvent:
        if self._event is None:
            self._event = FeedbackEvent.from_avro(self.record)
        return self._event

    def __getattr__(self, name: str) -> Any:
        return getattr(self.event, name)


def validate(record: dict[str, Any], now: datetime, limits: Limits = Limits()) -> ValidatedEvent:
    """Check a decoded record. Raises :class:`InvalidEvent` (field, rule)."""
    ts = _certainly_valid(record)
    if ts is not None:
        payload = record["payload"]
        try:
            size = len(orjson.dumps(payload))
        except orjson.JSONEncodeError:  # (a lone surrogate): the model's way decides what is said
            pass
        else:
            texts = (payload["text"], payload["comment"], payload["corrected_response"])
            _check_limits(size, payload["extra"], texts, ts, now, limits)
            return ValidatedEvent(record)
    return ValidatedEvent(record, _validate_reference(record, now, limits))


def _validate_reference(record: dict[str, Any], now: datetime, limits: Limits = Limits()) -> FeedbackEvent:
    """The validated event for a decoded record, through the model. Raises :class:`InvalidEvent`."""
    try:
        event = FeedbackEvent.from_avro(record)
    except ValidationError as exc:
        raise InvalidEvent.first(exc) from None
    size = len(orjson.dumps(record["payload"]))
    p = event.payload
    _check_limits(size, p.extra, (p.text, p.comment, p.corrected_response), event.ts, now, limits)
    return event


_TEXT_NAMES = ("text", "comment", "corrected_response")


def _check_limits(
    size: int, extra: dict[str, Scalar], texts: tuple[str | None, ...], ts: datetime, now: datetime, limits: Limits
) -> None:
    """The rules after the model: payload size (``size``: its JSON bytes), reserved keys,
    free-text length, the ``ts`` window around ``now``."""
    if size > limits.max_payload_bytes:
        raise InvalidEvent("payload", f"{size} bytes is over the {limits.max_payload_bytes}-byte limit")
    for key in extra:
        if key.startswith(RESERVED_PREFIX):
            raise InvalidEvent(f"payload.{key}", f"keys starting with {RESERVED_PREFIX!r} are set by the stream")
    for name, value in zip(_TEXT_NAMES, texts, strict=True):
        if value is not None and len(value) > limits.max_text_chars:
            raise InvalidEvent(f"payload.{name}", f"longer than {limits.max_text_chars} characters")
    if ts > now + limits.max_future:
        raise InvalidEvent("ts", f"more than {int(limits.max_future.total_seconds())}s in the future")
    if ts < now - limits.max_age:
        raise InvalidEvent("ts", f"older than the {limits.max_age.days}-day retention")


# --- the fast check --------------------------------------------------------------------

# What the fast check knows of the models beyond their fields' types and constraints: their
# Python validators and settings. Any change there switches the fast check off (see _compile).
_KNOWN_VALIDATORS = {
    FeedbackEvent: ({"_ts_utc": ("ts",)}, {"_fill_hash"}),
    Payload: ({"_scalars_only": ("extra",)}, {"_split_flat_form"}),
}
_KNOWN_CONFIG = {
    FeedbackEvent: {"frozen": True, "extra": "forbid", "str_strip_whitespace": False},
    Payload: {"frozen": True, "extra": "forbid"},
}
_LIMIT_ATTR = {MinLen: "min_length", MaxLen: "max_length", Ge: "ge", Gt: "gt", Le: "le", Lt: "lt"}
_INT64 = 2**63
_MICROS_MIN, _MICROS_MAX = micros(_TS_MIN), micros(_TS_MAX)  # the ts bounds as Avro's microseconds


class _Rules:
    """The model's field rules, grouped by kind for the check below."""

    def __init__(self) -> None:
        self.names: frozenset[str] = frozenset()
        self.strings: tuple[tuple[str, bool, int, int], ...] = ()  # name, nullable, min, max
        self.floats: tuple[tuple[str, bool, float | None, bool, float | None, bool], ...] = ()  # lo, >, hi, <
        self.bools: tuple[str, ...] = ()
        self.enums: tuple[tuple[str, type[StrEnum], frozenset[str]], ...] = ()
        self.str_lists: tuple[tuple[str, int, int], ...] = ()  # name, most items, longest item


def _validators_of(model: Any) -> tuple[dict[str, tuple[str, ...]], set[str]] | None:
    """The model's field validators (name: fields) and model validators; None with v1-style ones."""
    decorators = model.__pydantic_decorators__
    if decorators.validators or decorators.root_validators:
        return None
    fields = {name: tuple(d.info.fields) for name, d in decorators.field_validators.items()}
    return fields, set(decorators.model_validators)


def _limits_of(metadata: list[Any]) -> dict[str, Any] | None:
    limits: dict[str, Any] = {}
    for meta in metadata:
        if type(meta) in _LIMIT_ATTR:
            limits[type(meta).__name__] = getattr(meta, _LIMIT_ATTR[type(meta)])
        elif not (isinstance(meta, AllowInfNan) and meta.allow_inf_nan is False):
            return None
    return limits


def _compile() -> _Rules | None:
    """The rules read from ``FeedbackEvent.model_fields``; None (every record goes through the
    model) when a field, type, constraint, validator or setting is one this does not know."""
    for model, known in _KNOWN_VALIDATORS.items():
        if _validators_of(model) != known or dict(model.model_config) != _KNOWN_CONFIG[model]:
            return None
    payload_fields = {name: (info.annotation, info.metadata) for name, info in Payload.model_fields.items()}
    if payload_fields != {
        "text": (str | None, []), "comment": (str | None, []), "corrected_response": (str | None, []),
        "extra": (dict[str, Scalar], []),
    }:  # fmt: skip
        return None
    rules = _Rules()
    strings, floats, bools, enums, str_lists = [], [], [], [], []
    for name, info in FeedbackEvent.model_fields.items():
        unwrapped = unwrap_optional(info.annotation)
        if unwrapped is None:
            return None
        annotation, nullable = unwrapped
        limits = _limits_of(info.metadata)
        if limits is None:
            return None
        if name == "ts":
            if annotation is not datetime or nullable or limits:
                return None
        elif name == "payload":
            if annotation is not Payload or nullable or limits:
                return None
        elif annotation is str and limits.keys() <= {"MinLen", "MaxLen"}:
            strings.append((name, nullable, limits.get("MinLen", 0), limits.get("MaxLen", sys.maxsize)))
        elif annotation is float and limits.keys() <= {"Ge", "Gt", "Le", "Lt"}:
            low, high = limits.get("Gt", limits.get("Ge")), limits.get("Lt", limits.get("Le"))
            floats.append((name, nullable, low, "Gt" in limits, high, "Lt" in limits))
        elif annotation is bool and not nullable and not limits:
            bools.append(name)
        elif isinstance(annotation, type) and issubclass(annotation, StrEnum) and not nullable and not limits:
            enums.append((name, annotation, frozenset(m.value for m in annotation)))
        elif get_origin(annotation) is list and not nullable and limits.keys() == {"MaxLen"}:
            item_type, *item_meta = get_args(get_args(annotation)[0]) or (None,)
            item_limits = [m for f in item_meta for m in getattr(f, "metadata", [f])]
            if item_type is not str or len(item_limits) != 1 or type(item_limits[0]) is not MaxLen:
                return None
            str_lists.append((name, limits["MaxLen"], item_limits[0].max_length))
        else:
            return None
    if "hash" not in {s[0] for s in strings}:
        return None
    rules.names = frozenset(FeedbackEvent.model_fields)
    rules.strings, rules.floats, rules.bools = tuple(strings), tuple(floats), tuple(bools)
    rules.enums, rules.str_lists = tuple(enums), tuple(str_lists)
    return rules


_RULES = _compile()
_N_FIELDS = len(_RULES.names) if _RULES is not None else -1


def _readable(s: str) -> bool:
    """Whether pydantic-core can read ``s`` as UTF-8 (no lone surrogates). Callers try
    ``s.isascii()`` (O(1)) first."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _certainly_valid(record: Any) -> datetime | None:
    """The event's ``ts`` (an aware UTC datetime) when the model would certainly accept
    ``record`` as it is, unchanged; None when the model must decide.

    Only the exact types Avro decodes to pass, each inside the model's bounds: every field
    present (an Avro record has them all) and no other, ``hash`` set (so the model keeps it).
    """
    rules = _RULES
    if rules is None or type(record) is not dict or len(record) != _N_FIELDS:
        return None
    try:
        for name, nullable, low, high in rules.strings:
            s = record[name]
            if s is None:
                if nullable:
                    continue
                return None
            if type(s) is not str or not low <= len(s) <= high or not (s.isascii() or _readable(s)):
                return None
        if not record["hash"]:
            return None  # the model would compute it
        for name, nullable, low, gt, high, lt in rules.floats:
            x = record[name]
            if x is None:
                if nullable:
                    continue
                return None
            if type(x) is not float or x - x != 0.0:  # not a float, or NaN or infinite
                return None
            if low is not None and (x <= low if gt else x < low):
                return None
            if high is not None and (x >= high if lt else x > high):
                return None
        for name in rules.bools:
            if type(record[name]) is not bool:
                return None
        for name, enum, values in rules.enums:
            v = record[name]
            if not (type(v) is enum or (type(v) is str and v in values)):
                return None
        for name, most, longest in rules.str_lists:
            items = record[name]
            if type(items) is not list or len(items) > most:
                return None
            for s in items:
                if type(s) is not str or len(s) > longest or not (s.isascii() or _readable(s)):
                    return None
        if not _plain_payload(record["payload"]):
            return None
        ts = record["ts"]
    except KeyError:  # a field missing (and so another one there instead)
        return None
    if type(ts) is datetime:
        if ts.tzinfo is not UTC or not _TS_MIN <= ts <= _TS_MAX:
            return None
        return ts
    if type(ts) is int and _MICROS_MIN <= ts <= _MICROS_MAX:
        return from_micros(ts)  # as FeedbackEvent.from_avro reads it
    return None


def _plain_payload(payload: Any) -> bool:
    """Whether the model certainly accepts ``payload``, an Avro-form Payload, as it is: the
    three free texts null or str, ``extra`` a map of str to null, bool, 64-bit int, finite
    float or str. (Strings pydantic could not read fail the JSON encoding of the size check.)"""
    if type(payload) is not dict or len(payload) != 4:
        return False
    for name in _TEXT_NAMES:
        s = payload[name]
        if s is not None and type(s) is not str:
            return False
    extra = payload["extra"]
    if type(extra) is not dict:
        return False
    for key, value in extra.items():
        if type(key) is not str:
            return False
        kind = type(value)
        if kind is str or kind is bool or value is None:
            continue
        if kind is int:
            if not -_INT64 <= value < _INT64:
                return False
        elif kind is not float or value - value != 0.0:  # (NaN and infinities give NaN)
            return False
    return True
