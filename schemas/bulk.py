"""Validate, hash and Avro-encode many events at once, with the model's exact result.

``FeedbackEvent.model_validate`` runs five Python validators per event (the flat payload
split, the payload scalars, the timestamp, the hash, the default id) around pydantic's
Rust core; on this path they cost more than the validation itself. :class:`BulkEncoder`
checks an event's plain fields with the *same* field types and constraints, taken from
the model (``FeedbackEvent.model_fields``), in one pydantic-core call, does the rest in a
few lines, and builds the Avro record and the hash straight from the validated dict. No
model instance is created.

The model stays the reference. Anything the fast check does not accept as certainly valid
(a payload value that is not a plain scalar, a free-text field that is not a string, a
timestamp out of range, an unknown field, any constraint broken) goes through
``FeedbackEvent.model_validate`` itself, which either accepts it or produces the error,
naming the field. So an item is accepted or refused exactly as the model would, with the
same hash and the same Avro bytes; ``tests/unit/test_bulk.py`` compares the two on
generated events, valid and not.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from types import UnionType
from typing import Annotated, Any, NamedTuple, NotRequired, Required, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, TypeAdapter, ValidationError
from pydantic.types import AllowInfNan
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from schemas.hashing import _LAYOUT, content_hash
from schemas.models import _TS_MAX, _TS_MIN, FeedbackEvent, Severity, format_ts, to_utc
from schemas.serde import AvroSerde, _speedups, compile_program  # _speedups: None when not built

__all__ = ["Accepted", "BulkEncoder", "Refused", "new_event_ids", "unwrap_optional"]

# Plain scalars only: anything else (nested objects, lists, NaN, a 65-bit int, a str
# subclass) is left to the model, which refuses it with its own message.
_Int64 = Annotated[StrictInt, Field(ge=-(2**63), lt=2**63)]
_Finite = Annotated[StrictFloat, Field(allow_inf_nan=False)]
_FastScalar = Annotated[StrictBool | _Int64 | _Finite | StrictStr | None, Field(union_mode="left_to_right")]
_PYTHON_CHECKED = ("payload",)  # fields whose model validators run in Python: checked below


def _fast_schema() -> TypeAdapter[Any]:
    """A TypedDict with the model's field types and constraints, payload as a flat scalar map."""
    fields: dict[str, Any] = {}
    for name, info in FeedbackEvent.model_fields.items():
        if name in _PYTHON_CHECKED:
            continue
        kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[name] = Required[kind] if info.is_required() else NotRequired[kind]
    fields["payload"] = NotRequired[dict[StrictStr, _FastScalar]]
    schema = TypedDict("_FastEvent", fields)  # type: ignore[operator]
    schema.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]
    return TypeAdapter(schema)


_LIMIT = {MinLen: "min_length", MaxLen: "max_length", Ge: "ge", Gt: "gt", Le: "le", Lt: "lt"}


def unwrap_optional(annotation: Any) -> tuple[Any, bool] | None:
    """(the type, whether None is allowed) for ``X | None`` and for a plain ``X``; None for a
    union of several types besides None (which the fast checks do not handle)."""
    if get_origin(annotation) in (Union, UnionType) and type(None) in get_args(annotation):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        return (rest[0], True) if len(rest) == 1 else None
    return annotation, False


def _precheck_rules() -> dict[str | None, Any] | None:
    """The model's field rules as the C pre-check reads them (``schemas/_speedups.c``):
    ``{field: (kind, required, nullable, a, b, c, d)}`` and ``{None: the required fields}``.
    None (pydantic checks every item) if a field has a type or constraint this does not
    know: the pre-check only ever stands in for pydantic where it is certain."""
    if _speedups is None:
        return None
    kinds = _speedups.RULE_KINDS
    rules: dict[str | None, Any] = {}
    for name, info in FeedbackEvent.model_fields.items():
        unwrapped = unwrap_optional(info.annotation)
        if unwrapped is None:
            return None
        annotation, nullable = unwrapped
        limits: dict[str, Any] = {}
        for meta in info.metadata:
            if isinstance(meta, MinLen | MaxLen | Ge | Gt | Le | Lt):
                limits[type(meta).__name__] = getattr(meta, _LIMIT[type(meta)])
            elif not (isinstance(meta, AllowInfNan) and meta.allow_inf_nan is False):
                return None
        rule: tuple[Any, ...]
        if name == "payload":
            rule = (kinds["scalar_map"], None, None, None, None)
        elif annotation is str and limits.keys() <= {"MinLen", "MaxLen"}:
            rule = (kinds["str"], limits.get("MinLen", 0), limits.get("MaxLen"), None, None)
        elif annotation is float and limits.keys() <= {"Ge", "Gt", "Le", "Lt"}:
            low, high = limits.get("Gt", limits.get("Ge")), limits.get("Lt", limits.get("Le"))
            rule = (kinds["float"], None if low is None else float(low), "Gt" in limits,
                    None if high is None else float(high), "Lt" in limits)  # fmt: skip
        elif annotation is bool and not limits:
            rule = (kinds["bool"], None, None, None, None)
        elif annotation is datetime and not limits:
            rule = (kinds["datetime"], None, None, None, None)
        elif isinstance(annotation, type) and issubclass(annotation, StrEnum) and not limits:
            rule = (kinds["enum"], {m.value: m for m in annotation}, annotation, None, None)
        elif get_origin(annotation) is list and limits.keys() <= {"MaxLen"} and "MaxLen" in limits:
            item_type, *item_meta = get_args(get_args(annotation)[0]) or (None,)
            item_limits = [m for f in item_meta for m in getattr(f, "metadata", [f])]
            if item_type is not str or len(item_limits) != 1 or not isinstance(item_limits[0], MaxLen):
                return None
            rule = (kinds["str_list"], limits["MaxLen"], item_limits[0].max_length, None, None)
        else:
            return None
        rules[name] = (rule[0], info.is_required(), nullable, *rule[1:])
    rules[None] = tuple(name for name, info in FeedbackEvent.model_fields.items() if info.is_required())
    return rules


class Accepted(NamedTuple):
    """A valid event, ready for Kafka: partition key and Avro value (with header)."""

    event_id: str
    hash: str
    key: bytes
    value: bytes


class Refused(NamedTuple):
    """An invalid item and why: the model's ``ValidationError``, or None when the item is not
    an object at all."""

    error: ValidationError | None


def new_event_ids(n: int) -> list[str]:
    """``n`` fresh UUID4 event ids (the text form of :func:`schemas.models.new_event_id`),
    from one read of the system's random source."""
    raw = bytearray(os.urandom(16 * n))
    raw[6::16] = bytes((b & 0x0F) | 0x40 for b in raw[6::16])
    raw[8::16] = bytes((b & 0x3F) | 0x80 for b in raw[8::16])
    h = raw.hex()
    return [f"{h[i:i + 8]}-{h[i + 8:i + 12]}-{h[i + 12:i + 16]}-{h[i + 16:i + 20]}-{h[i + 20:i + 32]}"
            for i in range(0, 32 * n, 32)]  # fmt: skip


class BulkEncoder:
    """Turns items (the JSON form of :class:`FeedbackEvent`: a flat ``payload``) into
    :class:`Accepted` or :class:`Refused`, in order.

    ``redact`` (optional) maps the Avro payload (``text``, ``comment``,
    ``corrected_response``, ``extra``) to what is written to Kafka; the hash is the event's
    own, computed before, as the gateway does. ``native=False`` keeps to the Python loop even
    when the C one (``schemas._speedups``) is built; both give the same results.
    """

    def __init__(
        self,
        serde: AvroSerde,
        *,
        redact: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        native: bool = True,
    ) -> None:
        self.serde = serde
        self.redact = redact
        self._check = _fast_schema().validator.validate_python  # pydantic-core itself, no wrapper
        # The C loop (schemas/_speedups.c, bulk_encode) runs _fast below for a whole list;
        # what it hands back undecided goes through the model here, as in the Python loop.
        self._program = compile_program(serde.writer_schema)
        self._native = native and _speedups is not None
        self._rules = _precheck_rules() if self._native else None

    def encode(
        self, items: Sequence[Any], *, defaults: Mapping[str, Any] | None = None, now: datetime | None = None
    ) -> list[Accepted | Refused]:
        """Validate, hash and encode every item; ``defaults`` fill fields an item lacks (or
        holds as null). Items without ``ts`` get ``now`` (default: the time of this call)
        and items without ``event_id`` a fresh one."""
        now = datetime.now(UTC) if now is None else to_utc(now)
        now_text = format_ts(now)  # most items share it: formatted once for their hashes
        if self._native:
            return self._encode_c(items, defaults, now, now_text)
        ids = new_event_ids(len(items))
        out: list[Accepted | Refused] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                out.append(Refused(None))
                continue
            if defaults:
                item = {**defaults, **{k: v for k, v in item.items() if v is not None}}
            out.append(self._fast(item, now, now_text, ids[i]) or self._reference(item, ids[i]))
        return out

    def _encode_c(
        self, items: Sequence[Any], defaults: Mapping[str, Any] | None, now: datetime, now_text: str
    ) -> list[Accepted | Refused]:
        context = (self._rules, self._check, ValidationError, now, now_text, os.urandom(16 * len(items)), _DEFAULTS,
                   Severity.info, to_utc, format_ts, _TS_MIN, _TS_MAX, self.redact, self._program,
                   self.serde.header, _LAYOUT, content_hash, self.serde.encode, Accepted)  # fmt: skip
        out: list[Any] = _speedups.bulk_encode(list(items), dict(defaults) if defaults else None, context)
        for i, result in enumerate(out):
            if type(result) is not Accepted:  # not a dict (None), or an item for the model to judge
                out[i] = Refused(None) if result is None else self._reference(result, new_event_ids(1)[0])
        return out

    def _fast(self, item: dict[str, Any], now: datetime, now_text: str, event_id: str) -> Accepted | None:
        try:
            fields = self._check(item)
        except ValidationError:
            return None  # the model says why (or accepts what this check is too strict for)
        extra = fields.get("payload")
        if extra:  # a fresh dict from the check: taken apart in place
            given = item["payload"]
            for key, value in extra.items():
                # A float the check made from an int (e.g. one past the 64-bit range): the model refuses it.
                if type(value) is float and type(given[key]) is not float:
                    return None
            text = extra.pop("text", None)
            comment = extra.pop("comment", None)
            corrected = extra.pop("corrected_response", None)
            flat = dict(extra)
            for name, value in (("text", text), ("comment", comment), ("corrected_response", corrected)):
                if value is not None:
                    if type(value) is not str:
                        return None  # the model says "payload.<name>: must be a string"
                    flat[name] = value
            fields["payload"] = {"text": text, "comment": comment, "corrected_response": corrected, "extra": extra}
        else:
            flat = {}
            fields["payload"] = {"text": None, "comment": None, "corrected_response": None, "extra": {}}
        ts = fields.get("ts")
        ts_text: str | None = now_text
        if ts is None:
            fields["ts"] = now
        else:
            fields["ts"] = ts = to_utc(ts)
            if not _TS_MIN <= ts <= _TS_MAX:
                return None
            ts_text = None
        fields.setdefault("severity", Severity.info)
        fields.setdefault("tags", [])
        digest = fields.get("hash") or content_hash(fields, flat, ts_text)
        fields["hash"] = digest
        event_id = fields.setdefault("event_id", event_id)
        return self._accepted(fields, event_id, digest)

    def _accepted(self, fields: dict[str, Any], event_id: str, digest: str) -> Accepted:
        record = {**_DEFAULTS, **fields}
        if self.redact is not None:
            record["payload"] = self.redact(record["payload"])
        key = (record["user_id"] or record["client_ip"] or record["source"]).encode()
        return Accepted(event_id, digest, key, self.serde.encode(record))

    def _reference(self, item: dict[str, Any], event_id: str) -> Accepted | Refused:
        if "event_id" not in item:
            item = {**item, "event_id": event_id}
        try:
            event = FeedbackEvent.model_validate(item)
        except ValidationError as exc:
            return Refused(_without_frames(exc))
        fields = dict(event.__dict__)
        fields["payload"] = event.payload.to_avro()
        return self._accepted(fields, event.event_id, event.hash)


def _without_frames(exc: ValidationError) -> ValidationError:
    """``exc`` with the tracebacks of the validators' own exceptions dropped.

    pydantic keeps the exception a model validator raised (``ctx["error"]``) where the garbage
    collector cannot see it, and that exception's traceback holds frames reaching back to the
    caller, whose list of results holds ``exc``: a cycle the collector cannot free, so every
    refused batch stayed in memory. A refusal keeps the message and the error, not the frames.
    """
    for error in exc.errors(include_url=False):
        cause, seen = (error.get("ctx") or {}).get("error"), 0
        while isinstance(cause, BaseException) and seen < 8:
            cause.__traceback__ = None
            cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return exc


# Every optional field of the record, as the model leaves it when the item does not set it.
_DEFAULTS: dict[str, Any] = {
    name: info.get_default(call_default_factory=True)
    for name, info in FeedbackEvent.model_fields.items()
    if not info.is_required() and name not in ("event_id", "ts", "payload", "hash")
}
