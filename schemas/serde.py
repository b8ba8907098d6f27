"""The one place events become bytes and bytes become events.

Encoding: Avro single-object encoding by default (``C3 01`` + the 8-byte
CRC-64-AVRO fingerprint of the writer schema, little-endian, + Avro binary), so
every message names its schema without a registry. With a schema registry URL,
Confluent framing (``00`` + 4-byte big-endian schema id + Avro binary).

Decoding accepts both framings and resolves the writer schema against the
reader schema (Avro schema resolution), so a v2 writer can be read by a v1
reader and the other way round. Anything that cannot be decoded raises
:class:`PoisonEvent` with a reason that never includes the payload.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import struct
import sys
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import cache
from importlib import resources
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from pipeline.errors import ConfigError, PoisonEvent
from schemas.avro_binary import long_bytes as _long
from schemas.avro_binary import micros as _micros

try:  # built from schemas/_speedups.c by `pip install -e .` when a C compiler is present
    from schemas import _speedups
except ImportError:  # pragma: no cover - depends on the install; the Python writers stand in
    _speedups = None  # type: ignore[assignment]

__all__ = [
    "CONFLUENT_MAGIC",
    "SINGLE_OBJECT_MAGIC",
    "AvroSerde",
    "SchemaCatalog",
    "compile_encoder",
    "compile_program",
    "fast_encoder",
    "load_schema",
    "schema_text",
]

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"
_SO_HEADER = len(SINGLE_OBJECT_MAGIC) + 8
_CONFLUENT_HEADER = 5


@cache
def load_schema(name: str) -> dict[str, Any]:
    """A parsed schema shipped in this package, e.g. ``load_schema("feedback_event_v1")``."""
    text = resources.files("schemas").joinpath(f"{name}.avsc").read_text(encoding="utf-8")
    return fastavro.parse_schema(json.loads(text))


@cache
def schema_text(name: str) -> str:
    """A shipped schema's JSON text as written (logical types and docs kept), e.g. for Avro files."""
    return resources.files("schemas").joinpath(f"{name}.avsc").read_text(encoding="utf-8")


def schema_fingerprint(schema: dict[str, Any]) -> bytes:
    """The 8-byte CRC-64-AVRO fingerprint, in the little-endian order single-object encoding uses."""
    # fastavro's hex string is already in little-endian byte order.
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


# --- a compiled encoder -------------------------------------------------------
# fastavro interprets the schema for every record (~18 µs per event here). For the schemas
# we write on the hot path, Python source specialised to the schema is generated once; it
# handles the exact types our models produce and gives up (raises) on anything else, in
# which case fastavro writes the record, or refuses it, exactly as before. Byte equality
# with fastavro's schemaless_writer is a property test (tests/unit/test_fast_encode.py).

_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
#: Avro's zigzag varint of the non-negative lengths below 4096, precomputed.
_LENGTHS = []


class _Unsupported(Exception):
    """The compiled encoder does not handle this value or schema; fastavro does."""


_LENGTHS.extend(_long(n) for n in range(4096))

_PRIMITIVES = ("null", "boolean", "int", "long", "float", "double", "string", "bytes")
# One sample per Python type the union dispatch handles; fastavro's own validator says
# which branch it would pick for each, so the compiled code picks the same.
_UNION_SAMPLES: tuple[tuple[str, str, Any, str], ...] = (
    ("none", "v is None", None, "null"),
    ("bool", "t is bool", True, "boolean"),
    ("int", "t is int", 1, "long"),
    ("float", "t is float", 1.5, "double"),
    ("str", "t is str", "s", "string"),
    ("bytes", "t is bytes", b"s", "bytes"),
)


def _union_branches(branches: list[Any]) -> list[tuple[str, str, int, str]]:
    """(test name, Python test, branch index, branch type) for each Python type a union of
    primitives takes as it is: fastavro's own validator says which branch it would pick for
    each, so the compiled encoders pick the same; types it refuses or converts are left to it."""
    if not all(isinstance(b, str) and b in _PRIMITIVES for b in branches):
        raise _Unsupported("union of non-primitive types")
    from fastavro.validation import validate

    out = []
    for name, test, sample, natural in _UNION_SAMPLES:
        chosen = next((i for i, b in enumerate(branches) if validate(sample, b, raise_errors=False)), None)
        if chosen is not None and branches[chosen] == natural:
            out.append((name, test, chosen, natural))
    return out


def _schema_kind(schema: Any) -> tuple[dict[str, Any], str | None]:
    """The schema as a dict and the type the encoders write it as (``timestamp-micros``, or
    the Avro type); raises for a logical type they do not handle."""
    if isinstance(schema, str):
        schema = {"type": schema}
    if not isinstance(schema, dict):
        raise _Unsupported(schema)
    kind = schema.get("type")
    logical = schema.get("logicalType")
    if logical is not None and not (kind == "long" and logical in ("timestamp-micros", "timestamp-millis")):
        raise _Unsupported(logical)
    return schema, "timestamp-micros" if logical == "timestamp-micros" else kind


class _Writer:
    """Generates the statements writing one value to ``out`` (a bytearray).

    With ``models``, a nested record may also be an object whose ``__dict__`` holds its
    fields (a pydantic model mirroring the record).
    """

    def __init__(self, models: bool = False) -> None:
        self.models = models
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self._ids = itertools.count()

    def name(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)

    def value(self, schema: Any, v: str, indent: int, checked: bool = False) -> None:
        """Statements writing the local variable ``v`` under ``schema``; checks its type
        unless ``checked`` (a union branch chosen by its type)."""
        if isinstance(schema, list):
            return self.union(schema, v, indent)
        schema, kind = _schema_kind(schema)
        if kind == "timestamp-micros":
            return self.timestamp_micros(v, indent)
        if kind == "null":
            self.emit(indent, f"if {v} is not None: raise _Unsupported")
        elif kind == "boolean":
            self.emit(indent, f"if {v} is True: out += b'\\x01'")
            self.emit(indent, f"elif {v} is False: out += b'\\x00'")
            self.emit(indent, "else: raise _Unsupported")
        elif kind in ("int", "long"):
            lo, hi = ("_INT_MIN", "_INT_MAX") if kind == "int" else ("_LONG_MIN", "_LONG_MAX")
            typed = "" if checked else f"type({v}) is not int or "
            self.emit(indent, f"if {typed}not {lo} <= {v} <= {hi}: raise _Unsupported")
            self.emit(indent, f"out += _long({v})")
        elif kind in ("float", "double"):
            pack = "_pack_f" if kind == "float" else "_pack_d"
            if not checked:
                self.emit(indent, f"if type({v}) is not float: raise _Unsupported")
            self.emit(indent, f"out += {pack}({v})")
        elif kind in ("string", "bytes"):
            if not checked:
                self.emit(indent, f"if type({v}) is not {'str' if kind == 'string' else 'bytes'}: raise _Unsupported")
            self.known(kind, v, indent)
        elif kind == "enum":
            table = self.name("_enum")
            self.consts[table] = {symbol: i for i, symbol in enumerate(schema["symbols"])}
            i = self.name("i")
            self.emit(indent, f"{i} = {table}.get({v}) if isinstance({v}, str) else None")
            self.emit(indent, f"if {i} is None: raise _Unsupported")
            self.emit(indent, f"out += _LENGTHS[{i}]")
        elif kind == "record":
            if self.models:
                self.emit(indent, f"if type({v}) is not dict: {v} = {v}.__dict__")
            else:
                self.emit(indent, f"if type({v}) is not dict: raise _Unsupported")
            for field in schema["fields"]:
                fv = self.name("v")
                self.emit(indent, f"{fv} = {v}[{field['name']!r}]")  # missing: KeyError, fastavro decides
                self.value(field["type"], fv, indent)
        elif kind in ("array", "map"):
            is_map = kind == "map"
            self.emit(indent, f"if type({v}) is not {'dict' if is_map else 'list'}: raise _Unsupported")
            self.emit(indent, f"if {v}:")
            count = self.name("n")
            self.emit(indent + 1, f"{count} = len({v})")
            self.emit(indent + 1, f"out += _LENGTHS[{count}] if {count} < 4096 else _long({count})")
            item = self.name("v")
            if is_map:
                key = self.name("k")
                self.emit(indent + 1, f"for {key}, {item} in {v}.items():")
                self.emit(indent + 2, f"if type({key}) is not str: raise _Unsupported")
                self.known("string", key, indent + 2)
            else:
                self.emit(indent + 1, f"for {item} in {v}:")
            self.value(schema["values" if is_map else "items"], item, indent + 2)
            self.emit(indent, "out += b'\\x00'")
        else:
            raise _Unsupported(kind)

    def timestamp_micros(self, v: str, indent: int) -> None:
        """A timestamp-micros long. An aware datetime becomes microseconds as fastavro's
        prepare_timestamp_micros does it; a naive one (local time) is left to fastavro, and an
        int passes as it is. The last datetime's bytes are kept: events written together
        often share their time (a batch stamped at once), and its varint costs ~1.5 µs."""
        memo, m, e = self.name("_memo"), self.name("m"), self.name("e")
        self.consts[memo] = [(None, b"")]  # (datetime, bytes), replaced whole: safe across threads
        self.emit(indent, f"{m} = {memo}[0]")
        self.emit(indent, f"if type({v}) is _datetime and {v}.tzinfo is not None and {v} == {m}[0]:")
        self.emit(indent + 1, f"out += {m}[1]")
        self.emit(indent, "else:")
        self.emit(indent + 1, f"{m} = {v}")
        self.emit(indent + 1, f"if type({v}) is _datetime and {v}.tzinfo is not None:")
        self.emit(indent + 2, f"{v} = _micros({v})")
        self.emit(indent + 1, f"if type({v}) is not int or not _LONG_MIN <= {v} <= _LONG_MAX: raise _Unsupported")
        self.emit(indent + 1, f"{e} = _long({v})")
        self.emit(indent + 1, f"if type({m}) is _datetime: {memo}[0] = ({m}, {e})")
        self.emit(indent + 1, f"out += {e}")

    def known(self, kind: str, v: str, indent: int) -> None:
        """A string or bytes value whose type was checked already."""
        b, n = self.name("b"), self.name("n")
        self.emit(indent, f"{b} = {v}.encode()" if kind == "string" else f"{b} = {v}")
        self.emit(indent, f"{n} = len({b})")
        self.emit(indent, f"out += _LENGTHS[{n}] if {n} < 4096 else _long({n})")
        self.emit(indent, f"out += {b}")

    def union(self, branches: list[Any], v: str, indent: int) -> None:
        t = self.name("t")
        self.emit(indent, f"{t} = type({v})")
        keyword = "if"
        for _, test, chosen, natural in _union_branches(branches):
            self.emit(indent, f"{keyword} {test.replace('t is', f'{t} is').replace('v is', f'{v} is')}:")
            self.emit(indent + 1, f"out += {_long(chosen)!r}")
            if natural != "null":
                self.value(natural, v, indent + 1, checked=True)
            keyword = "elif"
        self.emit(indent, "else: raise _Unsupported" if keyword == "elif" else "raise _Unsupported")


def compile_encoder(schema: Any, *, models: bool = False) -> Callable[[Mapping[str, Any], bytearray], None] | None:
    """A function ``write(record, out)`` appending the Avro binary of ``record`` to ``out``,
    generated for this parsed schema; None when the schema uses types it does not handle.

    The function raises for any value it does not handle (a type other than the one our
    models produce, a missing field, a naive datetime): the caller then uses fastavro, so
    the bytes, and any error, are fastavro's. With ``models``, nested records may be
    objects whose ``__dict__`` holds the fields.
    """
    writer = _Writer(models)
    try:
        writer.value(schema, "record", 1)
    except _Unsupported:
        return None
    source = "def write(record, out):\n" + "\n".join(writer.lines) + "\n"
    namespace: dict[str, Any] = {
        "_Unsupported": _Unsupported,
        "_long": _long,
        "_LENGTHS": tuple(_LENGTHS),
        "_LONG_MIN": _LONG_MIN,
        "_LONG_MAX": _LONG_MAX,
        "_INT_MIN": _INT_MIN,
        "_INT_MAX": _INT_MAX,
        "_pack_d": struct.Struct("<d").pack,
        "_pack_f": struct.Struct("<f").pack,
        "_datetime": datetime,
        "_micros": _micros,
        **writer.consts,
    }
    exec(compile(source, f"<avro encoder {schema.get('name', '') if isinstance(schema, dict) else ''}>", "exec"),
         namespace)  # fmt: skip
    return namespace["write"]  # type: ignore[no-any-return]


def compile_program(schema: Any, *, models: bool = False) -> tuple[Any, ...] | None:
    """The encoding program ``schemas._speedups.encode`` runs for this parsed schema (nested
    tuples of opcodes: the same cases, in the same order, as :func:`compile_encoder`); None
    when the schema uses types the encoders do not handle or the extension is not built."""
    if _speedups is None:
        return None
    ops, tests = _speedups.OPCODES, _speedups.UNION_TESTS

    def build(node: Any) -> tuple[Any, ...]:
        if isinstance(node, list):
            branches = _union_branches(node)
            return (ops["union"], tuple((tests[name], i, build(kind)) for name, _, i, kind in branches))
        node, kind = _schema_kind(node)
        if kind == "timestamp-micros":
            return (ops[kind], [None])  # the last (datetime, bytes) pair, replaced whole
        if node.get("logicalType") == "timestamp-millis":  # written as a long; decode reads a datetime
            return (ops["timestamp-millis"],)
        if kind in _PRIMITIVES:
            return (ops[kind],)
        if kind == "enum":
            return (ops[kind], {symbol: i for i, symbol in enumerate(node["symbols"])})
        if kind == "record":
            return (ops[kind], models, tuple((sys.intern(f["name"]), build(f["type"])) for f in node["fields"]))
        if kind in ("array", "map"):
            return (ops[kind], build(node["items" if kind == "array" else "values"]))
        raise _Unsupported(kind)

    try:
        return build(schema)
    except _Unsupported:
        return None


def fast_encoder(schema: Any, header: bytes, *, models: bool = False) -> Callable[[Any], bytes] | None:
    """``encode(record) -> header + Avro binary`` for this parsed schema: the C encoder when
    the extension is built, else the generated Python one; None when neither handles the
    schema. It raises for any value it leaves to fastavro (see :func:`compile_encoder`)."""
    program = compile_program(schema, models=models)
    if program is not None:
        return functools.partial(_speedups.encode, program, header)
    write = compile_encoder(schema, models=models)
    if write is None:
        return None

    def encode(record: Any) -> bytes:
        out = bytearray(header)
        write(record, out)
        return bytes(out)

    return encode


class SchemaCatalog:
    """Writer schemas known by fingerprint (single-object) and by registry id (Confluent)."""

    def __init__(self, *schemas: dict[str, Any]) -> None:
        self._by_fingerprint: dict[bytes, dict[str, Any]] = {}
        self._by_id: dict[int, dict[str, Any]] = {}
        for schema in schemas:
            self.add(schema)

    def add(self, schema: dict[str, Any], registry_id: int | None = None) -> bytes:
        """Register a writer schema; returns its fingerprint."""
        parsed = fastavro.parse_schema(schema)
        fp = schema_fingerprint(parsed)
        self._by_fingerprint[fp] = parsed
        if registry_id is not None:
            self._by_id[registry_id] = parsed
        return fp

    def by_fingerprint(self, fp: bytes) -> dict[str, Any] | None:
        return self._by_fingerprint.get(fp)

    def by_id(self, schema_id: int) -> dict[str, Any] | None:
        return self._by_id.get(schema_id)


class AvroSerde:
    """Encodes and decodes one record type.

    ``registry`` is an optional ``confluent_kafka.schema_registry.SchemaRegistryClient``
    (or anything with ``register_schema(subject, schema)`` and ``get_schema(id)``):
    with it, :meth:`encode` writes Confluent framing under ``subject``.
    """

    def __init__(
        self,
        schema_name: str = "feedback_event_v1",
        *,
        reader_schema: dict[str, Any] | None = None,
        catalog: SchemaCatalog | None = None,
        registry: Any | None = None,
        subject: str | None = None,
    ) -> None:
        self.writer_schema = load_schema(schema_name) if reader_schema is None else reader_schema
        self.reader_schema = self.writer_schema
        self.catalog = catalog or SchemaCatalog()
        self.fingerprint = self.catalog.add(self.writer_schema)
        self._registry = registry
        self._subject = subject or f"{schema_name}-value"
        self._schema_id: int | None = None
        self._header = SINGLE_OBJECT_MAGIC + self.fingerprint
        if registry is not None:
            self._header = self._register()
        self._fast = fast_encoder(self.writer_schema, self._header)
        self._fast_model = fast_encoder(self.writer_schema, self._header, models=True)
        # Resolved readers per writer schema: resolution is the expensive part of decoding.
        self._readers: dict[int, Callable[[io.BytesIO], Any]] = {}
        # The C decoder's program for bodies written with the reader schema (None: fastavro reads them).
        self._decode_program = compile_program(self.writer_schema)

    @classmethod
    def from_url(cls, registry_url: str | None, schema_name: str = "feedback_event_v1") -> AvroSerde:
        """A serde for ``schema_name``; Confluent framing when ``registry_url`` is set."""
        if not registry_url:
            return cls(schema_name)
        try:
            from confluent_kafka.schema_registry import SchemaRegistryClient
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError(
                "FEEDBACK_SCHEMA_REGISTRY_URL is set but confluent-kafka's schema registry "
                "support is missing: pip install 'confluent-kafka[schemaregistry]'"
            ) from exc
        return cls(schema_name, registry=SchemaRegistryClient({"url": registry_url}))

    def _register(self) -> bytes:
        from confluent_kafka.schema_registry import Schema

        text = json.dumps(fastavro.schema.to_parsing_canonical_form(self.writer_schema))
        schema_id = int(self._registry.register_schema(self._subject, Schema(json.loads(text), "AVRO")))
        self.catalog.add(self.writer_schema, registry_id=schema_id)
        self._schema_id = schema_id
        return CONFLUENT_MAGIC + struct.pack(">I", schema_id)

    @property
    def header(self) -> bytes:
        """The bytes every message this serde writes starts with (framing + schema id)."""
        return self._header

    # --- encoding --------------------------------------------------------
    def encode(self, record: dict[str, Any]) -> bytes:
        """Avro-encode one record (the dict form, e.g. ``FeedbackEvent.to_avro()``) with its header.

        The bytes are fastavro's ``schemaless_writer`` output; errors are fastavro's.
        """
        if self._fast is not None:
            try:
                return self._fast(record)
            except Exception:  # a value the compiled encoder leaves to fastavro, below
                pass
        buf = io.BytesIO()
        buf.write(self._header)
        fastavro.schemaless_writer(buf, self.writer_schema, record)
        return buf.getvalue()

    def encode_model(self, model: Any, **fields: Any) -> bytes:
        """``encode(record)`` where ``record`` is ``model.to_avro()`` with ``fields`` (record form)
        replacing some of its fields, for a pydantic model whose fields mirror the record
        (``FeedbackEvent``); the record dict is not built unless fastavro has to write it.
        """
        if self._fast_model is not None:
            try:
                return self._fast_model({**model.__dict__, **fields} if fields else model.__dict__)
            except Exception:  # a value the compiled encoder leaves to fastavro, below
                pass
        record = model.to_avro()
        record.update(fields)
        return self.encode(record)

    # --- decoding --------------------------------------------------------
    def decode(self, data: bytes | None) -> dict[str, Any]:
        """Decode one message value into a record dict.

        Raises :class:`PoisonEvent` for empty input, unknown framing, an unknown
        schema, or bytes that do not parse under the writer schema.
        """
        if not data:
            raise PoisonEvent("empty message value")
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < _SO_HEADER:
                raise PoisonEvent("truncated single-object header")
            writer = self.catalog.by_fingerprint(bytes(data[2:_SO_HEADER]))
            if writer is None:
                raise PoisonEvent(f"unknown schema fingerprint {bytes(data[2:_SO_HEADER]).hex()}")
            body = _SO_HEADER
        elif data[:1] == CONFLUENT_MAGIC:
            if len(data) < _CONFLUENT_HEADER:
                raise PoisonEvent("truncated schema-registry header")
            schema_id = struct.unpack(">I", data[1:_CONFLUENT_HEADER])[0]
            writer = self._writer_for_id(schema_id)
            body = _CONFLUENT_HEADER
        else:
            raise PoisonEvent(
                f"unknown framing (first byte 0x{data[0]:02x}); expected Avro single-object or schema-registry framing"
            )
        record, end = self._decode_fast(data, body) if writer is self.reader_schema else (None, None)
        if end is None:
            buf = io.BytesIO(data)
            buf.seek(body)
            try:
                # Resolving a schema against itself only costs time: skip it for the current writer.
                reader = None if writer is self.reader_schema else self.reader_schema
                record = fastavro.schemaless_reader(buf, writer, reader)
            except Exception as exc:  # fastavro raises many types (EOFError, ValueError, IndexError...)
                raise PoisonEvent(f"avro decode failed: {type(exc).__name__}") from None
            end = buf.tell()
        if end != len(data):
            raise PoisonEvent(f"{len(data) - end} trailing bytes after the record")
        if not isinstance(record, dict):
            raise PoisonEvent("decoded value is not a record")
        return record

    def _decode_fast(self, data: bytes, body: int) -> tuple[Any, int | None]:
        """The body at ``body`` read by the C decoder (fastavro's value for the reader schema as
        writer, and the offset after it); ``(None, None)`` when it does not read it: no program
        for the schema, or a body it leaves to fastavro (malformed ones included), whose value
        or error then stands."""
        if self._decode_program is None:
            return None, None
        try:
            return _speedups.decode(self._decode_program, data, body)  # type: ignore[no-any-return]
        except Exception:  # Unsupported, UnicodeDecodeError...: fastavro decides
            return None, None

    def _writer_for_id(self, schema_id: int) -> dict[str, Any]:
        writer = self.catalog.by_id(schema_id)
        if writer is not None:
            return writer
        if self._registry is None:
            raise PoisonEvent(f"schema-registry framed (id {schema_id}) but no schema registry is configured")
        try:
            schema = self._registry.get_schema(schema_id)
        except Exception as exc:
            raise PoisonEvent(f"schema id {schema_id} not found in the registry: {type(exc).__name__}") from None
        self.catalog.add(json.loads(schema.schema_str), registry_id=schema_id)
        return self.catalog.by_id(schema_id)  # type: ignore[return-value]
