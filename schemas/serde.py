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

import io
import json
import struct
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from pipeline.errors import ConfigError, PoisonEvent

__all__ = [
    "CONFLUENT_MAGIC",
    "SINGLE_OBJECT_MAGIC",
    "AvroSerde",
    "SchemaCatalog",
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
        # Resolved readers per writer schema: resolution is the expensive part of decoding.
        self._readers: dict[int, Callable[[io.BytesIO], Any]] = {}

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
        """Avro-encode one record (the dict form, e.g. ``FeedbackEvent.to_avro()``) with its header."""
        buf = io.BytesIO()
        buf.write(self._header)
        fastavro.schemaless_writer(buf, self.writer_schema, record)
        return buf.getvalue()

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
        buf = io.BytesIO(data)
        buf.seek(body)
        try:
            # Resolving a schema against itself only costs time: skip it for the current writer.
            reader = None if writer is self.reader_schema else self.reader_schema
            record = fastavro.schemaless_reader(buf, writer, reader)
        except Exception as exc:  # fastavro raises many types (EOFError, ValueError, IndexError...)
            raise PoisonEvent(f"avro decode failed: {type(exc).__name__}") from None
        if buf.tell() != len(data):
            raise PoisonEvent(f"{len(data) - buf.tell()} trailing bytes after the record")
        if not isinstance(record, dict):
            raise PoisonEvent("decoded value is not a record")
        return record

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
