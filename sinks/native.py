"""Clean events as ClickHouse Native blocks: the event sink's fast path.

The Avro bodies of one partition's contiguous run of Kafka messages become the columns of
one Native block (``INSERT INTO feedback_events (...) FORMAT Native``), so ClickHouse parses
no Avro: a Native insert costs the embedded store about half the CPU of the same rows read
from Avro (docs/performance.md). The conversion runs in C (``schemas._speedups.native_block``)
from a plan built here from the writer schema; :func:`encode_native` is the pure-Python
reference it is tested against, from the rows :func:`sinks.clickhouse.event_row` builds.

A block carries plain types (``String`` for a ``LowCardinality(String)`` column, ``Map(String,
String)``...); ClickHouse converts them on insert (``input_format_native_allow_types_conversion``,
on by default). Non-text payload values are JSON-encoded as the Python path encodes them
(orjson), so both paths store the same row.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any

from schemas.avro_binary import micros, varuint
from schemas.serde import _speedups

__all__ = ["EVENT_NATIVE_TYPES", "NativeEncoder", "encode_native", "event_plan"]

#: The type each ``feedback_events`` column has in a Native block (EVENT_COLUMNS order).
EVENT_NATIVE_TYPES: dict[str, str] = {
    "event_id": "String",
    "ts": "DateTime64(6, 'UTC')",
    "source": "String",
    "type": "String",
    "severity": "String",
    "user_id": "Nullable(String)",
    "session_id": "Nullable(String)",
    "interaction_id": "Nullable(String)",
    "model_version": "Nullable(String)",
    "prompt_version": "Nullable(String)",
    "value": "Nullable(Float64)",
    "confidence": "Nullable(Float64)",
    "sample_rate": "Nullable(Float64)",
    "text_dropped": "Bool",
    "propagation_weight": "Nullable(Float64)",
    "tags": "Array(String)",
    "idempotency_key": "Nullable(String)",
    "payload_text": "Nullable(String)",
    "payload_comment": "Nullable(String)",
    "corrected_response": "Nullable(String)",
    "payload": "Map(String, String)",
    "hash": "String",
    "kafka_partition": "UInt32",
    "kafka_offset": "UInt64",
}

# The columns of nested fields. A top-level field lands in the column of its name; a field with
# no column is skipped (client_ip is never stored).
_FIELD_COLUMN = {
    ("payload", "text"): "payload_text",
    ("payload", "comment"): "payload_comment",
    ("payload", "corrected_response"): "corrected_response",
    ("payload", "extra"): "payload",
}
_COLUMN_KIND = {
    "String": "string",
    "Nullable(String)": "nullable_string",
    "DateTime64(6, 'UTC')": "int64",
    "Nullable(Float64)": "nullable_float64",
    "Bool": "uint8",
    "Array(String)": "array_string",
    "Map(String, String)": "map",
}


class _NotPlanned(Exception):
    """The schema has a shape the Native fast path does not convert."""


def _nullable(kind: Any) -> tuple[str, int] | None:
    """(the other branch, the null branch's index) for a ``["null", X]`` union, else None."""
    if isinstance(kind, list) and len(kind) == 2 and "null" in kind:
        other = kind[1 - kind.index("null")]
        return (other if isinstance(other, str) else "", kind.index("null"))
    return None


def event_plan(schema: dict[str, Any], columns: Sequence[str]) -> tuple[Any, ...] | None:
    """The plan ``native_block`` runs for ``feedback_event`` bodies written with ``schema``, into
    ``columns`` (kafka_partition and kafka_offset come from the messages' coordinates); None
    when the extension is not built or the schema has a field it does not convert."""
    if _speedups is None:
        return None
    native = _speedups.NATIVE
    col_kinds, opcodes, json_kinds = native["columns"], native["ops"], native["json"]
    index = {name: i for i, name in enumerate(columns)}
    ops: list[tuple[int, int, Any]] = []

    def column(name: str, want: str) -> int:
        if EVENT_NATIVE_TYPES.get(name) != want:
            raise _NotPlanned(name)
        return index[name]

    def field(path: tuple[str, ...], kind: Any) -> None:
        if isinstance(kind, dict) and kind.get("type") == "record":  # its fields, inline (as Avro writes them)
            for f in kind["fields"]:
                field((*path, f["name"]), f["type"])
            return
        name = _FIELD_COLUMN.get(path, path[-1] if len(path) == 1 else "")
        stored = name in index
        nullable = _nullable(kind)
        if not stored:
            if nullable != ("string", nullable[1] if nullable else 0):
                raise _NotPlanned(".".join(path))
            ops.append((opcodes["skip_nullable_string"], -1, nullable[1]))
        elif kind == "string":
            ops.append((opcodes["string"], column(name, "String"), None))
        elif kind == "boolean":
            ops.append((opcodes["boolean"], column(name, "Bool"), None))
        elif nullable is not None and nullable[0] in ("string", "double"):
            op, want = (
                ("nullable_string", "Nullable(String)")
                if nullable[0] == "string"
                else ("nullable_double", "Nullable(Float64)")
            )
            ops.append((opcodes[op], column(name, want), nullable[1]))
        elif isinstance(kind, dict) and kind.get("type") == "long" and kind.get("logicalType") == "timestamp-micros":
            ops.append((opcodes["long"], column(name, "DateTime64(6, 'UTC')"), None))
        elif isinstance(kind, dict) and kind.get("type") == "enum":
            ops.append((opcodes["enum"], column(name, "String"), tuple(s.encode() for s in kind["symbols"])))
        elif isinstance(kind, dict) and kind.get("type") == "array" and kind.get("items") == "string":
            ops.append((opcodes["array_string"], column(name, "Array(String)"), None))
        elif isinstance(kind, dict) and kind.get("type") == "map" and isinstance(kind.get("values"), list):
            branches = [b if isinstance(b, str) else "" for b in kind["values"]]
            if not set(branches) <= json_kinds.keys():
                raise _NotPlanned(".".join(path))
            ops.append(
                (opcodes["map_json"], column(name, "Map(String, String)"), tuple(json_kinds[b] for b in branches))
            )
        else:
            raise _NotPlanned(".".join(path))

    try:
        for f in schema["fields"]:
            field((f["name"],), f["type"])
        planned = {c for _, c, _ in ops if c >= 0}
        cols = []
        for i, name in enumerate(columns):
            if name == "kafka_partition":
                kind = col_kinds["partition"]
            elif name == "kafka_offset":
                kind = col_kinds["offset"]
            elif i in planned:
                kind = col_kinds[_COLUMN_KIND[EVENT_NATIVE_TYPES[name]]]
            else:
                raise _NotPlanned(name)  # a column no field fills
            cols.append((name.encode(), EVENT_NATIVE_TYPES[name].encode(), kind))
    except (_NotPlanned, KeyError):
        return None
    return (tuple(cols), tuple(ops))


class NativeEncoder:
    """``encode(messages, first, partition)``: ``prefix`` + one Native block of the messages'
    rows, or None when the run is not the fast path's (an offset out of sequence, a body not
    written with ``header``'s schema, a body that does not decode exactly)."""

    def __init__(self, plan: tuple[Any, ...], header: bytes, prefix: bytes = b"") -> None:
        assert _speedups is not None
        self._native_block = _speedups.native_block
        self.plan, self.header, self.prefix = plan, header, prefix

    def encode(self, messages: Sequence[Any], first: int, partition: int) -> bytes | None:
        msgs = messages if isinstance(messages, list) else list(messages)
        return self._native_block(self.plan, self.header, msgs, first, partition, self.prefix)


# --- the pure-Python reference -----------------------------------------------------------


def _string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return varuint(len(raw)) + raw


def _column(native_type: str, values: list[Any]) -> bytes:
    if native_type == "String":
        return b"".join(_string(v) for v in values)
    if native_type == "Nullable(String)":
        return bytes(v is None for v in values) + b"".join(_string("" if v is None else v) for v in values)
    if native_type == "Nullable(Float64)":
        return bytes(v is None for v in values) + b"".join(struct.pack("<d", 0.0 if v is None else v) for v in values)
    if native_type == "DateTime64(6, 'UTC')":
        return b"".join(struct.pack("<q", micros(v)) for v in values)
    if native_type == "Bool":
        return bytes(bool(v) for v in values)
    if native_type == "UInt32":
        return b"".join(struct.pack("<I", v) for v in values)
    if native_type == "UInt64":
        return b"".join(struct.pack("<Q", v) for v in values)
    if native_type == "Array(String)":
        ends, n = [], 0
        for v in values:
            n += len(v)
            ends.append(n)
        return b"".join(struct.pack("<Q", e) for e in ends) + b"".join(_string(s) for v in values for s in v)
    if native_type == "Map(String, String)":
        ends, n = [], 0
        for v in values:
            n += len(v)
            ends.append(n)
        return (
            b"".join(struct.pack("<Q", e) for e in ends)
            + b"".join(_string(k) for v in values for k in v)
            + b"".join(_string(x) for v in values for x in v.values())
        )
    raise ValueError(f"no Native encoding for {native_type}")


def encode_native(columns: Sequence[str], types: dict[str, str], rows: Iterable[Sequence[Any]]) -> bytes:
    """One Native block of ``rows`` (values in ``columns`` order, as ``event_row`` builds them)."""
    table = list(rows)
    out = [varuint(len(columns)), varuint(len(table))]
    for i, name in enumerate(columns):
        out += [_string(name), _string(types[name]), _column(types[name], [row[i] for row in table])]
    return b"".join(out)
