"""A ClickHouse-compatible HTTP endpoint in front of chDB (ClickHouse in-process).

Only one process may open a chDB data directory, so this process owns it and
serves everyone else over ClickHouse's HTTP interface: clickhouse-connect, curl
and the pipeline's sinks talk to it exactly as to a real server.

Supported: ``/ping`` and ``/replicas_status``; queries from the ``query`` URL argument
and/or the POST body, or from ``multipart/form-data`` fields (with external tables as file
parts, ``<name>_structure``/``<name>_format`` URL arguments); ``param_<name>`` query
parameters; ``database``; any other URL argument as a per-query setting; compressed request
bodies (gzip, deflate, zstd, lz4); inserts with data in the body (``INSERT ... FORMAT X`` +
data), written to a temporary file and ingested with ``FROM INFILE`` (the data never passes
through SQL text); ``INSERT ... SELECT ... FROM input('structure') FORMAT X`` the same way,
through a temporary table. Requests run in parallel, each on its own chDB handle
(``--connections``, default 4). Errors come back as ClickHouse does: ``Code: N.
DB::Exception: ...`` and ``X-ClickHouse-Exception-Code``.

Results of queries are produced a block at a time (chDB's streaming API): one up to 1 MiB is
sent whole, a larger one with chunked transfer as it is produced (not with
``wait_end_of_query=1``, a parameterized query, or a format with a header or footer); an error
after the first block comes last in the body, in ClickHouse's exception block marked by
``X-ClickHouse-Exception-Tag``. Native results follow the client's ``client_protocol_version``:
BlockInfo before each block, and ``DateTime('zone')`` column types from revision 54337 (chDB
itself writes revision 0); clickhouse-connect negotiates revision 54405. ``SHOW CREATE TABLE
system.<table>`` is built from ``system.columns`` (clickhouse-local keeps no metadata for them).

Hardening (issue 18; ``docs/security.md``, "Embedded ClickHouse server"):

* **Authentication** of the user ``default`` by URL arguments (``user``/``password``),
  ``X-ClickHouse-User``/``X-ClickHouse-Key`` or HTTP Basic, against the password in
  ``--password-file`` (mode 0600); anything else is ClickHouse's error 516.
* **GET is read-only**, as in ClickHouse (``readonly=2``; a write gets error 164).
* **Browsers are kept out**: any ``Origin`` header, or a ``Host`` that is not loopback, is 403.
* **A sandbox** (:mod:`sinks.chdb_guard`): the engine's own grants and setting constraints,
  and a lexer for what clickhouse-local does without asking them (``INTO OUTFILE``,
  ``FROM INFILE``, several statements, ``Python()``, ``disk()``).
* **Limits**: body size and decompressed size (streamed, never inflated past the bound),
  socket timeouts, a bounded number of request threads.
* **No state leaks between requests**: a handle that ran ``SET``/``USE``, a temporary table or
  per-query settings is closed and replaced; a ``session_id`` gets its own handle (its
  settings and temporary tables live there, with ClickHouse's ``SESSION_IS_LOCKED`` for a
  concurrent request and ``session_timeout``/``session_check``).
* No CR/LF (or any control character) reaches a response header.

Dictionaries are served over this server's own tables (a ``CLICKHOUSE`` source without a host,
or ``NULL``; :mod:`sinks.chdb_guard`). Not supported (a full server's features): users other
than ``default``, roles and grants management, dictionaries with any other source,
``system.query_log``, the native TCP port, progress headers (``send_progress_in_http_headers``),
and ClickHouse's own ``compress=1``/``decompress=1`` block framing. clickhouse-connect's suite:
each exception with its reason in ``docs/security.md``.

Run: ``python -m sinks.chdb_server --port 8123 --data-dir .local/clickhouse/data --password-file F``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hmac
import logging
import os
import queue
import re
import secrets
import signal
import socket
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from schemas.avro_binary import read_varuint, varuint
from sinks.chdb_guard import GuardError, Statement, check_statement, write_engine_config

__all__ = ["EmbeddedClickHouseServer", "ServerLimits", "main"]

log = logging.getLogger("sinks.chdb_server")

# URL arguments the HTTP layer consumes itself; they never reach the engine as settings.
_TRANSPORT_ARGS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "compress",
        "decompress",
        "wait_end_of_query",
        "enable_http_compression",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "client_protocol_version",
        "quota_key",
        "buffer_size",
        "role",
        "user",
        "password",
        "http_response_buffer_size",
        "http_wait_end_of_query",
        "http_native_compression_disable_checksumming_on_decompress",
        "cancel_http_readonly_queries_on_client_close",
    }
)
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
# An INSERT whose data follows its own FORMAT clause in the same body (curl style).
# Matched on bytes: the data after the statement may be binary (clickhouse-connect sends Native this way).
_INLINE_INSERT = re.compile(rb"^\s*(INSERT\b.*?\bFORMAT\s+\w+)[ \t]*(?:\r?\n|$)", re.IGNORECASE | re.DOTALL)
_NOT_SPACE = re.compile(rb"\S")
_IS_INSERT = re.compile(r"^\s*INSERT\b", re.IGNORECASE)
_INPUT_FUNCTION = re.compile(r"\binput\(\s*('(?:[^'\\]|\\.)*')\s*\)", re.IGNORECASE)
_ERROR_CODE = re.compile(r"Code:\s*(\d+)")
_LOOPBACK_HOST = re.compile(r"^(?:127\.0\.0\.1|localhost|\[::1\])(?::[0-9]{1,5})?$", re.IGNORECASE)
_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHOW_CREATE_SYSTEM = re.compile(
    r"^\s*SHOW\s+CREATE\s+(?:TABLE\s+)?`?system`?\.`?([A-Za-z_][A-Za-z0-9_]*)`?\s*(FORMAT\s+\w+)?\s*;?\s*$",
    re.IGNORECASE,
)
#: Output formats a result may be streamed in: those whose output for no rows is empty (chDB's
#: streaming API sends nothing at all for an empty result, not even a format's header or names).
_STREAM_FORMATS = frozenset(
    {"Native", "RowBinary", "TabSeparated", "TSV", "TabSeparatedRaw", "TSVRaw", "CSV", "JSONEachRow",
     "JSONCompactEachRow", "JSONStringsEachRow", "JSONLines", "NDJSON", "Values", "RawBLOB"}
)  # fmt: skip
#: Statement kinds a GET may run (ClickHouse's readonly: reads, and settings for the query).
_READ_KINDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "SET", "USE", "CHECK"})
#: Statement kinds that produce a result (and so a format), even an empty one.
_RESULT_KINDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "CHECK"})
#: Statement kinds that leave nothing on the handle that ran them.
_STATELESS_KINDS = frozenset(
    {"SELECT", "WITH", "INSERT", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "CREATE", "DROP", "ALTER",
     "TRUNCATE", "OPTIMIZE", "RENAME", "CHECK", "KILL", "UNDROP", "EXCHANGE", "DELETE", "UPDATE"}
)  # fmt: skip

USER = "default"


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what one request may cost the server."""

    max_body_bytes: int = 1 << 30  # a request body as sent (compressed or not)
    max_decompressed_bytes: int = 2 << 30  # the body after Content-Encoding
    socket_timeout_s: float = 120.0  # one read or write on a connection; idle keep-alives close after it
    max_threads: int = 64  # connections served at once; more wait in the listen backlog
    max_sessions: int = 256  # open session_id handles; past it the least recently used idle one is closed
    default_session_timeout_s: float = 60.0
    max_session_timeout_s: float = 3600.0
    stream_buffer_bytes: int = 1 << 20  # a result up to this size is sent whole; a larger one is streamed


class QueryError(Exception):
    """A query ClickHouse rejected; ``code`` is ClickHouse's error code, ``status`` the HTTP status."""

    def __init__(self, message: str, code: int = 1002, status: int = 500) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def _error(code: int, name: str, text: str, status: int = 500) -> QueryError:
    return QueryError(f"Code: {code}. DB::Exception: {text}. ({name})", code, status)


# --- request bodies ------------------------------------------------------------------------------


def _bounded_chunks(pieces: Iterator[bytes], limit: int) -> bytes:
    out: list[bytes] = []
    total = 0
    for piece in pieces:
        total += len(piece)
        if total > limit:
            raise _error(
                241, "MEMORY_LIMIT_EXCEEDED", f"Decompressed request body exceeds the server's limit of {limit} bytes",
                413,
            )  # fmt: skip
        out.append(piece)
    return b"".join(out)


_STEP = 1 << 20  # decompress at most this much per call, so a bomb stops at the bound


def _inflate_zlib(body: bytes, wbits: int) -> Iterator[bytes]:
    rest = body
    while rest:
        d = zlib.decompressobj(wbits)
        data = rest
        while True:
            piece = d.decompress(data, _STEP)
            if piece:
                yield piece
            data = d.unconsumed_tail
            if d.eof or (not data and not piece):
                break
        if not d.eof:
            raise ValueError("truncated stream")
        rest = d.unused_data  # gzip: clients compress each block as its own member


def _inflate_lz4(body: bytes) -> Iterator[bytes]:
    import lz4.frame

    rest = body
    while rest:
        d = lz4.frame.LZ4FrameDecompressor()
        piece = d.decompress(rest, max_length=_STEP)
        yield piece
        while not d.eof and not d.needs_input:
            yield d.decompress(b"", max_length=_STEP)
        if not d.eof:
            raise ValueError("truncated lz4 frame")
        rest = d.unused_data


def _inflate_zstd(body: bytes) -> Iterator[bytes]:
    from backports import zstd

    rest = body
    while rest:
        d = zstd.ZstdDecompressor()
        yield d.decompress(rest, max_length=_STEP)
        while not d.eof and not d.needs_input:
            yield d.decompress(b"", max_length=_STEP)
        if not d.eof:
            raise ValueError("truncated zstd frame")
        rest = d.unused_data


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """The body without its Content-Encoding, never more than ``limit`` bytes of it.

    Raises QueryError: CANNOT_DECOMPRESS (271) for a corrupt body, MEMORY_LIMIT_EXCEEDED past the bound.
    """
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    # Clients compress each block separately, so a body can hold several frames/members.
    if encoding == "gzip":
        pieces = _inflate_zlib(body, 16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        pieces = _inflate_zlib(body, zlib.MAX_WBITS)
    elif encoding == "lz4":
        pieces = _inflate_lz4(body)
    elif encoding == "zstd":
        pieces = _inflate_zstd(body)
    else:
        raise _error(1002, "UNKNOWN_EXCEPTION", f"Unknown Content-Encoding '{_header_safe(encoding)[:40]}'")
    try:
        return _bounded_chunks(pieces, limit)
    except QueryError:
        raise
    except Exception as exc:  # zlib.error, lz4's RuntimeError, zstd.ZstdError, ValueError
        raise _error(
            271, "CANNOT_DECOMPRESS", f"Cannot decompress the request body ({encoding}): {type(exc).__name__}"
        ) from None


@dataclass
class _External:
    """An external table of a multipart request: ``name``, its structure, format and data."""

    name: str
    structure: str
    fmt: str
    data: bytes


def _multipart(content_type: str, body: bytes) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """(text fields, file parts) of a multipart/form-data body."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise _error(1002, "UNKNOWN_EXCEPTION", "malformed multipart/form-data body", 400)
    fields: dict[str, str] = {}
    files: list[tuple[str, bytes]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True) or b""
        if part.get_param("filename", header="content-disposition") is not None:
            files.append((name, payload))
        else:
            fields[name] = payload.decode("utf-8", "surrogateescape")
    return fields, files


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _header_safe(value: str) -> str:
    return _HEADER_UNSAFE.sub("", value)


# --- Native at the client's protocol revision ---------------------------------------------------
# chDB writes Native at protocol revision 0. A client that sends ``client_protocol_version`` > 0
# (clickhouse-connect probes for 54405 and then sends it with every query) reads what ClickHouse
# writes at that revision: each block starts with its BlockInfo, and from revision 54337 a
# top-level ``DateTime('zone')`` keeps its zone (revision 0 hides it: ``DateTime``). The column
# data itself is the same at both revisions for the types chDB writes, so a result is brought to
# the client's revision by adding each block's BlockInfo and putting the zones back in its headers.

_TZ_REVISION = 54337
#: BlockInfo: field 1 is_overflows = 0, field 2 bucket_num = -1, field 0 (end), as ClickHouse writes it.
_BLOCK_INFO = b"\x01\x00\x02\xff\xff\xff\xff\x00"
_FIXED_WIDTH = {
    **dict.fromkeys(("UInt8", "Int8", "Bool", "Enum8", "Nothing"), 1),
    **dict.fromkeys(("UInt16", "Int16", "Date", "Enum16", "BFloat16"), 2),
    **dict.fromkeys(("UInt32", "Int32", "Float32", "DateTime", "Date32", "IPv4", "Decimal32", "Time"), 4),
    **dict.fromkeys(("UInt64", "Int64", "Float64", "DateTime64", "Decimal64", "Time64"), 8),
    **dict.fromkeys(("UInt128", "Int128", "UUID", "IPv6", "Decimal128"), 16),
    **dict.fromkeys(("UInt256", "Int256", "Decimal256"), 32),
}
_ALIASES = {
    "Point": "Tuple(Float64, Float64)",
    "Ring": "Array(Point)",
    "LineString": "Array(Point)",
    "Polygon": "Array(Ring)",
    "MultiLineString": "Array(LineString)",
    "MultiPolygon": "Array(Polygon)",
}
_LC_INDEX_WIDTH = (1, 2, 4, 8)


class _NotNative(Exception):
    """A block this reader cannot walk (a type it does not know, or truncated data)."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    try:
        return read_varuint(data, pos)
    except ValueError as exc:
        raise _NotNative(str(exc)) from None


def _uint64(data: bytes, pos: int) -> int:
    if pos + 8 > len(data):
        raise _NotNative("truncated")
    return int.from_bytes(data[pos : pos + 8], "little")


def _type_args(type_name: str) -> tuple[str, list[str]]:
    """``Map(String, Array(UInt8))`` → ``("Map", ["String", "Array(UInt8)"])``, quotes respected."""
    head, paren, rest = type_name.strip().partition("(")
    if not paren:
        return head, []
    if not rest.endswith(")"):
        raise _NotNative("unbalanced type")
    args: list[str] = []
    depth, quote, start = 0, False, 0
    inner = rest[:-1]
    for i, ch in enumerate(inner):
        if quote:
            quote = ch != "'" or inner[i - 1] == "\\"
        elif ch == "'":
            quote = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(inner[start:i].strip())
            start = i + 1
    args.append(inner[start:].strip())
    return head.strip(), args


def _skip_column(data: bytes, pos: int, type_name: str, rows: int) -> int:
    """The position after ``rows`` values of ``type_name`` in Native's column layout.

    Raises _NotNative for a type it does not know (Variant, Dynamic, JSON, AggregateFunction...)."""
    head, args = _type_args(type_name)
    if head in _ALIASES:
        return _skip_column(data, pos, _ALIASES[head], rows)
    if head in _FIXED_WIDTH:
        end = pos + _FIXED_WIDTH[head] * rows
    elif head == "Decimal":
        precision = int(args[0])
        end = pos + rows * (4 if precision <= 9 else 8 if precision <= 18 else 16 if precision <= 38 else 32)
    elif head == "FixedString":
        end = pos + int(args[0]) * rows
    elif head.startswith("Interval"):
        end = pos + 8 * rows
    elif head == "String":
        end = pos
        for _ in range(rows):
            size, end = _varint(data, end)
            end += size
    elif head == "Nullable":
        return _skip_column(data, pos + rows, args[0], rows)
    elif head == "SimpleAggregateFunction":
        return _skip_column(data, pos, args[-1], rows)
    elif head in ("Array", "Map"):
        if rows == 0:
            return pos
        nested = _uint64(data, pos + 8 * (rows - 1))
        element = args[0] if head == "Array" else f"Tuple({args[0]}, {args[1]})"
        return _skip_column(data, pos + 8 * rows, element, nested)
    elif head == "Tuple":
        end = pos
        for arg in args:
            name, _, typed = arg.partition(" ")  # a named element is `name Type`
            end = _skip_column(data, end, typed.strip() if typed and "(" not in name else arg, rows)
    elif head == "LowCardinality":
        end = _skip_low_cardinality(data, pos, args[0], rows)
    else:
        raise _NotNative(f"unsupported type {head}")
    if end > len(data):
        raise _NotNative("truncated")
    return end


def _skip_low_cardinality(data: bytes, pos: int, type_name: str, rows: int) -> int:
    # Key version, then granules of: index type and flags, [a dictionary], the row count, the indexes.
    if rows == 0:
        return pos
    pos += 8
    head, args = _type_args(type_name)
    dictionary_type = args[0] if head == "Nullable" else type_name
    done = 0
    for _ in range(rows):  # at least one row per granule
        flags = _uint64(data, pos)
        pos += 8
        if flags & (1 << 9):  # HasAdditionalKeysBit: a dictionary follows
            keys = _uint64(data, pos)
            pos = _skip_column(data, pos + 8, dictionary_type, keys)
        count = _uint64(data, pos)
        if flags & 0xFF >= len(_LC_INDEX_WIDTH):
            raise _NotNative("low cardinality index type")
        pos += 8 + _LC_INDEX_WIDTH[flags & 0xFF] * count
        done += count
        if done >= rows or count == 0:
            return pos
    raise _NotNative("low cardinality granules")


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    size, pos = _varint(data, pos)
    if pos + size > len(data):
        raise _NotNative("truncated")
    return data[pos : pos + size].decode("utf-8", "surrogateescape"), pos + size


def _rewrite_blocks(data: bytes, types: list[str] | None, block_info: bool) -> bytes:
    """``data`` (whole Native blocks) at the client's revision: each block with its BlockInfo
    (``block_info``), and each bare ``DateTime`` column typed as in ``types`` (``DateTime('zone')``);
    every other type name stays the engine's own. Raises _NotNative when a block cannot be walked.

    With ``types`` and no BlockInfo, ``data`` is one block, walked only up to its last column
    that needs its zone (walking a column's values is Python's work, row by row for strings)."""
    out = bytearray()
    pos = 0
    last = max((i for i, t in enumerate(types or ()) if t.startswith("DateTime(")), default=-1)
    if types is not None and not block_info and last < 0:
        return data
    for _ in range(len(data) + 1):  # a block takes at least one byte
        if pos >= len(data):
            return bytes(out)
        start = pos
        columns, pos = _varint(data, pos)
        rows, pos = _varint(data, pos)
        if types is not None and columns != len(types):
            raise _NotNative("column count")
        if block_info:
            out += _BLOCK_INFO
        out += data[start:pos]
        for i in range(columns):
            name_start = pos
            _, pos = _read_string(data, pos)
            out += data[name_start:pos]
            type_start = pos
            old_type, pos = _read_string(data, pos)
            new_type = types[i] if types is not None else old_type
            if old_type == "DateTime" and new_type.startswith("DateTime("):
                encoded = new_type.encode()
                out += varuint(len(encoded)) + encoded
            else:
                out += data[type_start:pos]
            if i == last and not block_info:
                return bytes(out) + data[pos:]
            end = _skip_column(data, pos, old_type, rows)
            out += data[pos:end]
            pos = end
    raise _NotNative("no progress")


def _for_client(block: bytes, types: list[str] | None, block_info: bool) -> bytes:
    """One block of chDB's streaming API (it yields a block at a time) at the client's revision."""
    if types:
        with contextlib.suppress(_NotNative):  # not one whole block after all: its own type names
            block = _rewrite_blocks(block, types, False)
    return _BLOCK_INFO + block if block_info and block else block


def _has_bare_datetime(block: bytes) -> bool:
    """Whether a Native block may have a top-level column the engine wrote as bare ``DateTime``:
    its length-prefixed type name is in the block (a false positive costs one ``DESCRIBE``)."""
    return b"\x08DateTime" in block


# --- the engine ----------------------------------------------------------------------------------


class _Engine:
    """chDB handles on one data directory, one query at a time per handle.

    chDB (4.x) runs queries on separate handles of the same data directory in parallel, each
    with its own session state (``USE``, ``SET``, temporary tables), so concurrent requests
    each take a free handle. A request's own settings are reset to their defaults after it; a
    handle a request may have changed otherwise (``SET``, ``USE``, a GET's readonly, temporary
    tables) is closed and a fresh one takes its place, so nothing a request does outlives it.
    Queries with ``{name:Type}`` parameters are run one at a time across handles: libchdb does
    not promise to keep one handle's parameters from another's while they run in parallel.
    """

    def __init__(self, data_dir: Path, connections: int = 4) -> None:
        import chdb

        self._chdb = chdb
        self.data_dir = data_dir
        self.tmp_dir = data_dir / "http_tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp_dir.glob("*.data"):
            stale.unlink(missing_ok=True)
        config = write_engine_config(data_dir.parent / f"{data_dir.name}.engine", data_dir)
        self._dsn = f"file:{data_dir}?config-file={config}"
        self._free: queue.LifoQueue[Any] = queue.LifoQueue()
        self._count = max(1, connections)
        first = self.open()
        self._default_database_on_disk(first)
        self._free.put(first)
        for _ in range(self._count - 1):
            self._free.put(self.open())
        self.params_lock = threading.Lock()

    def open(self) -> Any:
        conn = self._chdb.connect(self._dsn)
        conn.query("SET session_timezone = 'UTC'")
        return conn

    @staticmethod
    def _default_database_on_disk(conn: Any) -> None:
        """clickhouse-local's ``default`` is an Overlay over the file system (``SELECT * FROM
        '/etc/passwd'``); it is re-attached as the plain Atomic database it stores its tables in."""
        row = bytes(conn.query("SELECT engine, uuid FROM system.databases WHERE name = 'default'", "TSV").bytes())
        engine, _, db_uuid = row.decode().strip().partition("\t")
        if engine == "Overlay":
            conn.query("DETACH DATABASE default")
            conn.query(f"ATTACH DATABASE default UUID '{db_uuid}' ENGINE = Atomic")

    def close(self) -> None:
        """Close every pooled handle, once the queries running on them have finished."""
        for _ in range(self._count):
            self._free.get().close()

    def acquire(self) -> Any:
        return self._free.get()

    def release(self, conn: Any, dirty: bool) -> None:
        if dirty:
            try:
                fresh = self.open()
            except Exception:  # keep the old one rather than shrink the pool
                log.exception("chdb_handle_reopen_failed")
                fresh = conn
            else:
                conn.close()
            conn = fresh
        self._free.put(conn)

    def spool(self, data: bytes | memoryview) -> str:
        fd, path = tempfile.mkstemp(dir=self.tmp_dir, suffix=".data")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return path


@dataclass
class _Session:
    conn: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    timeout_s: float = 60.0
    last_used: float = field(default_factory=time.monotonic)
    database: str = "default"  # changed by USE only: a request's `database` argument is for that request


class _Sessions:
    """``session_id`` → its own chDB handle, locked while a request uses it."""

    def __init__(self, engine: _Engine, limits: ServerLimits) -> None:
        self._engine = engine
        self._limits = limits
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}

    def acquire(self, session_id: str, timeout_s: float, check: bool) -> _Session:
        with self._lock:
            self._expire()
            session = self._sessions.get(session_id)
            if session is None:
                if check:
                    raise _error(372, "SESSION_NOT_FOUND", f"Session {session_id} not found")
                if len(self._sessions) >= self._limits.max_sessions and not self._evict_idlest():
                    raise _error(202, "TOO_MANY_SIMULTANEOUS_QUERIES", "Too many open sessions")
                session = _Session(self._engine.open(), timeout_s=timeout_s)
                self._sessions[session_id] = session
            if not session.lock.acquire(blocking=False):
                raise _error(373, "SESSION_IS_LOCKED", f"Session {session_id} is locked by a concurrent client")
            session.timeout_s = timeout_s
            return session

    def release(self, session: _Session) -> None:
        session.last_used = time.monotonic()
        session.lock.release()

    def _evict_idlest(self) -> bool:
        """Close the least recently used session no request holds (clients such as clickhouse-connect
        open one per client object); False when every session is busy."""
        for key, session in sorted(self._sessions.items(), key=lambda kv: kv[1].last_used):
            if session.lock.acquire(blocking=False):
                del self._sessions[key]
                session.conn.close()
                return True
        return False

    def _expire(self) -> None:
        now = time.monotonic()
        for key, session in list(self._sessions.items()):
            if now - session.last_used > session.timeout_s and session.lock.acquire(blocking=False):
                del self._sessions[key]
                session.conn.close()

    def close(self) -> None:
        with self._lock:
            for session in self._sessions.values():
                session.conn.close()
            self._sessions.clear()


def _counters(result: Any, ingested: bool) -> dict[str, int]:
    return {
        "read_rows": int(result.rows_read()),
        "read_bytes": int(result.bytes_read()),
        "written_rows": int(result.rows_written()) if not ingested else int(result.rows_read()),
        "written_bytes": int(result.bytes_written()) if not ingested else int(result.bytes_read()),
        "elapsed_ns": int(result.elapsed() * 1e9),
    }


def _engine_error(exc: Exception) -> QueryError:
    message = str(exc).strip().removeprefix("Streaming query failed: ")
    match = _ERROR_CODE.search(message)
    return QueryError(message, int(match.group(1)) if match else 1002)


@dataclass
class _Request:
    sql: str  # surrogateescape-decoded: the query's bytes exactly
    fmt: str
    params: dict[str, str]
    settings: dict[str, str]
    database: str
    readonly: bool
    infile: bytes | memoryview | None
    externals: list[_External]
    statement: Statement
    revision: int = 0  # the client's client_protocol_version (Native output is brought to it)


def _native_revision(req: _Request) -> bool:
    """Whether the result is Native at a revision other than chDB's own (0)."""
    return req.fmt == "Native" and req.revision > 0


def _result_types(conn: Any, sql: str, req: _Request) -> list[str] | None:
    """The result's column types as the engine knows them (``DESCRIBE`` of the query); None if
    it cannot say (the result is then sent with the engine's own type names)."""
    stem = _TRAILING_FORMAT.sub("", sql).rstrip().rstrip(";")
    describe = f"DESCRIBE TABLE ({stem}\n)"
    try:
        _check(describe)  # the client's text inside our statement: the guard reads it again
        if req.params:
            result = conn.query(_sql_bytes(describe), "JSONCompactEachRow", params=req.params)
        else:
            result = conn.query(_sql_bytes(describe), "JSONCompactEachRow")
        return [str(orjson.loads(line)[1]) for line in bytes(result.bytes() or b"").splitlines() if line]
    except Exception:  # QueryError from the guard, the engine's error: keep the engine's names
        log.debug("result_types_unavailable")
        return None


def _sql_bytes(sql: str) -> bytes:
    return sql.encode("utf-8", "surrogateescape")


@dataclass
class _Stream:
    """Where a result goes once it outgrows ``limit`` bytes: ``begin`` sends the status and headers
    (with the counters so far), ``write`` one chunk of the result."""

    limit: int
    begin: Callable[[dict[str, int]], None]
    write: Callable[[bytes], None]
    started: bool = False


def _by_blocks(req: _Request, out: _Stream | None) -> bool:
    """Whether the query runs through chDB's streaming API, a block at a time: to stream it, or
    to bring its Native blocks to the client's revision (the API yields whole blocks)."""
    if req.statement.kind not in ("SELECT", "WITH"):  # chDB streams only queries
        return False
    # A parameterized query is never streamed: it holds the engine's params lock while it runs.
    streamed = out is not None and not req.params and req.fmt in _STREAM_FORMATS
    return streamed or _native_revision(req)


def _stream_result(
    engine: _Engine, conn: Any, sql: str, out: _Stream | None, req: _Request
) -> tuple[bytes, dict[str, int]]:
    """Run ``sql`` block by block: a result up to ``out.limit`` bytes comes back whole, a larger one
    goes out as it is produced (never without ``out``). An error after the first block is sent in
    the stream (the caller writes ClickHouse's exception block), as ClickHouse does once its
    headers are out; an error before it is an ordinary error response. Raises the engine's error.

    A result whose zones must be put back and that outgrows the buffer is started again once its
    types are known: a handle runs one query at a time, and any other query cancels its stream."""
    if req.params:
        with engine.params_lock:
            return _blocks(conn, sql, None, req)
    return _blocks(conn, sql, out, req)


def _blocks(conn: Any, sql: str, out: _Stream | None, req: _Request) -> tuple[bytes, dict[str, int]]:
    started = time.perf_counter()
    block_info = _native_revision(req)
    zones = block_info and req.revision >= _TZ_REVISION
    if req.params:
        stream = conn.send_query(_sql_bytes(sql), req.fmt, params=req.params)
    else:
        stream = conn.send_query(_sql_bytes(sql), req.fmt)  # a query that cannot start raises here
    counters = {"read_rows": 0, "read_bytes": 0, "written_rows": 0, "written_bytes": 0, "elapsed_ns": 0}
    held: list[bytes] = []
    size = 0
    finished = False
    types: list[str] | None = None
    try:
        for _ in range(2):  # the second pass only to restart a stream with its zones known
            for chunk in stream:  # ends with the result, or with the engine's error
                counters["read_rows"] += int(chunk.rows_read())
                counters["read_bytes"] += int(chunk.bytes_read())
                data = bytes(chunk.bytes() or b"")
                if out is not None and out.started:
                    out.write(_for_client(data, types, block_info))
                    continue
                held.append(data)
                size += len(data)
                if out is not None and size > out.limit:
                    if types is None and zones and _has_bare_datetime(held[0]):
                        stream.cancel()
                        types = _result_types(conn, sql, req) or []
                        stream = conn.send_query(_sql_bytes(sql), req.fmt)
                        counters = dict.fromkeys(counters, 0)
                        held, size = [], 0
                        break
                    _begin(out, counters, [_for_client(piece, types, block_info) for piece in held])
                    held = []
            else:
                finished = True
                break
    except Exception:
        if out is not None and held and not out.started:  # rows came before the error: they go first
            if types is None and zones and _has_bare_datetime(held[0]):
                types = _result_types(conn, sql, req)  # the failed query no longer holds the handle
            _begin(out, counters, [_for_client(piece, types, block_info) for piece in held])
        raise
    finally:
        if not finished:
            try:
                stream.cancel()  # the client went away or the query failed: stop the engine's work
            except Exception:
                log.debug("stream_cancel_failed")
    counters["elapsed_ns"] = int((time.perf_counter() - started) * 1e9)
    if held and types is None and zones and _has_bare_datetime(held[0]):
        types = _result_types(conn, sql, req)
    return b"".join(_for_client(piece, types, block_info) for piece in held), counters


def _begin(out: _Stream, counters: dict[str, int], held: list[bytes]) -> None:
    out.begin(dict(counters, elapsed_ns=0))
    out.started = True
    for piece in held:
        out.write(piece)


def _execute(
    engine: _Engine, conn: Any, req: _Request, in_session: bool, out: _Stream | None = None
) -> tuple[bytes, dict[str, int]]:
    """Run one request's statement on ``conn``; in a session, per-query settings are put back after.

    With ``out``, a large result of a query is streamed through it (see :func:`_stream_result`)."""
    paths: list[str] = []
    restore: dict[str, str] = {}
    try:
        if not in_session or req.database:
            conn.query(f"USE `{req.database.replace('`', '')}`")
        if req.settings:
            if in_session:
                names = ", ".join(_quote(n) for n in req.settings)
                rows = bytes(
                    conn.query(
                        f"SELECT name, value FROM system.settings WHERE name IN ({names})", "JSONCompactEachRow"
                    ).bytes()
                )
                restore = {name: value for name, value in (orjson.loads(line) for line in rows.splitlines() if line)}
            # one statement: all of them apply, or (an unknown one) none
            conn.query("SET " + ", ".join(f"{name} = {_quote(value)}" for name, value in req.settings.items()))
        for ext in req.externals:
            path = engine.spool(ext.data)
            paths.append(path)
            conn.query(f"CREATE TEMPORARY TABLE `{ext.name}` ({ext.structure}) ENGINE = Memory")
            conn.query(f"INSERT INTO `{ext.name}` FROM INFILE {_quote(path)} FORMAT {ext.fmt}")
        if req.readonly and not in_session and "readonly" not in req.settings:
            conn.query("SET readonly = 2")  # as ClickHouse does for GET: reads, and settings for the query
        sql = req.sql
        ingested = False
        if req.infile is not None:
            path = engine.spool(req.infile)
            paths.append(path)
            head = _TRAILING_FORMAT.search(sql)
            in_fmt = head.group(1) if head else req.fmt
            stem = sql[: head.start()] if head else sql
            structure = _INPUT_FUNCTION.search(stem)
            if structure:
                # INSERT ... SELECT ... FROM input('structure') FORMAT X: the body is input()'s data,
                # staged in a temporary table (the user may not read files, so not through file()).
                staging = f"_input_{uuid.uuid4().hex}"
                create = f"CREATE TEMPORARY TABLE {staging} ({_unquote(structure.group(1))}) ENGINE = Memory"
                _check(create)  # the structure is the client's text, now SQL: the guard reads it too
                conn.query(create)
                try:
                    conn.query(f"INSERT INTO {staging} FROM INFILE {_quote(path)} FORMAT {in_fmt}")
                    sql = stem[: structure.start()] + staging + stem[structure.end() :]
                    result = _run(engine, conn, sql, req)
                finally:
                    conn.query(f"DROP TEMPORARY TABLE IF EXISTS {staging}")
                return bytes(result.bytes() or b""), _counters(result, False)
            sql = f"{stem.rstrip()}\nFROM INFILE {_quote(path)} FORMAT {in_fmt}"
            ingested = True
        show_create = _SHOW_CREATE_SYSTEM.match(sql) if req.statement.kind == "SHOW" else None
        if show_create:
            sql = _show_create_system(conn, show_create.group(1), show_create.group(2)) or sql
        if not ingested and _by_blocks(req, out):
            return _stream_result(engine, conn, sql, out, req)
        result = _run(engine, conn, sql, req)
        data = bytes(result.bytes() or b"")
        if _native_revision(req) and data:
            try:
                data = _rewrite_blocks(data, None, block_info=True)  # SHOW, DESCRIBE...: all blocks at once
            except _NotNative as exc:
                raise _error(
                    1002, "UNKNOWN_EXCEPTION",
                    f"This result cannot be sent at client_protocol_version {req.revision} ({exc}); send it without",
                ) from None  # fmt: skip
        return data, _counters(result, ingested)
    except QueryError:
        raise
    except Exception as exc:  # chDB raises ChdbError (a RuntimeError) with ClickHouse's message
        raise _engine_error(exc) from None
    finally:
        for path in paths:
            os.unlink(path)
        for ext in req.externals if in_session else ():
            try:
                conn.query(f"DROP TEMPORARY TABLE IF EXISTS `{ext.name}`")
            except Exception:
                log.warning("external_table_drop_failed")
        if restore:
            try:
                conn.query("SET " + ", ".join(f"{n} = {_quote(v)}" for n, v in restore.items()))
            except Exception:
                log.warning("session_settings_restore_failed count=%d", len(restore))


def _show_create_system(conn: Any, table: str, fmt: str | None) -> str | None:
    """``SHOW CREATE TABLE system.<table>`` as a query of its statement, built as ClickHouse shows
    it from ``system.columns`` (clickhouse-local keeps no metadata for system tables); None for a
    table that does not exist (the engine's own error follows)."""
    where = f"database = 'system' AND {{}} = {_quote(table)}"
    info = bytes(
        conn.query(
            f"SELECT engine, comment FROM system.tables WHERE {where.format('name')}", "JSONCompactEachRow"
        ).bytes()
    )
    if not info.strip():
        return None
    engine, comment = orjson.loads(info.splitlines()[0])
    rows = conn.query(
        f"SELECT name, type FROM system.columns WHERE {where.format('table')} ORDER BY position", "JSONCompactEachRow"
    )
    columns = [orjson.loads(line) for line in bytes(rows.bytes()).splitlines() if line]
    body = ",\n".join(f"    `{name}` {type_name}" for name, type_name in columns)
    statement = f"CREATE TABLE system.{table}\n(\n{body}\n)\nENGINE = {engine}"
    if comment:
        statement += f"\nCOMMENT {_quote(comment)}"
    return f"SELECT {_quote(statement)} AS statement" + (f" {fmt}" if fmt else "")


def _reset(conn: Any, names: list[str]) -> bool:
    """Put a sessionless handle's settings back to the profile's defaults (and its UTC time zone);
    False if that failed, and the handle must be replaced."""
    try:
        conn.query("SET " + ", ".join(f"{name} = DEFAULT" for name in names))
        if "session_timezone" in names:
            conn.query("SET session_timezone = 'UTC'")
        return True
    except Exception:
        return False


def _current_database(conn: Any, fallback: str) -> str:
    try:
        return bytes(conn.query("SELECT currentDatabase()", "TSVRaw").bytes()).decode().strip() or fallback
    except Exception:
        return fallback


def _unquote(literal: str) -> str:
    """A ClickHouse string literal's value (``'a\\'b'`` → ``a'b``)."""
    body = literal[1:-1]
    return re.sub(r"\\(.)", lambda m: m.group(1), body).replace("''", "'")


def _run(engine: _Engine, conn: Any, sql: str, req: _Request) -> Any:
    if req.params:
        with engine.params_lock:
            return conn.query(_sql_bytes(sql), req.fmt, params=req.params)
    return conn.query(_sql_bytes(sql), req.fmt)


# --- HTTP ----------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        self.timeout = self.server.limits.socket_timeout_s  # StreamRequestHandler applies it to the socket
        super().setup()
        # Without TCP_NODELAY, small request/response pairs wait on delayed ACKs.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # our own access log below never includes query text

    def do_GET(self) -> None:
        self._serve(read_body=False)

    def do_POST(self) -> None:
        self._serve(read_body=True)

    def _serve(self, read_body: bool) -> None:
        started = time.perf_counter()
        status, code, size_in, size_out = 200, 0, 0, 0
        self._streamed_bytes: int | None = None  # set once a streamed response's headers are out
        self._exception_tag = secrets.token_hex(8)
        try:
            refusal = self._refuse_browser()
            if refusal is not None:
                raise refusal
            body = self._read_body() if read_body else b""
            size_in = len(body)
            result, headers = self._handle(body)
        except QueryError as exc:
            if self._streamed_bytes is not None:
                self._end_stream(str(exc), started, exc.code)
                return
            status, code = exc.status, exc.code
            if status == 413:
                self.close_connection = True  # the rest of the body was not read
            result = (str(exc).rstrip() + "\n").encode()
            headers = {"Content-Type": "text/plain; charset=UTF-8", "X-ClickHouse-Exception-Code": str(code)}
            if getattr(exc, "query_id", None):
                headers["X-ClickHouse-Query-Id"] = exc.query_id  # type: ignore[attr-defined]
        if self._streamed_bytes is not None:
            self._write_chunk(result)
            self._end_stream(None, started, 0)
            return
        size_out = len(result)
        self._send(status, result, headers)
        log.info(
            "http method=%s status=%d bytes_in=%d bytes_out=%d ms=%.1f code=%d",
            self.command,
            status,
            size_in,
            size_out,
            (time.perf_counter() - started) * 1000,
            code,
        )

    def _begin_stream(self, headers: dict[str, str]) -> None:
        """Send a streamed result's status and headers; its body follows in chunks."""
        self.send_response(200)
        self.send_header("X-ClickHouse-Server-Display-Name", "feedback-chdb")
        headers.setdefault("X-ClickHouse-Timezone", "UTC")
        headers["X-ClickHouse-Exception-Tag"] = self._exception_tag
        for name, value in headers.items():
            self.send_header(name, _header_safe(value))
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._streamed_bytes = 0

    def _write_chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n" % len(data))
            self.wfile.write(data)
            self.wfile.write(b"\r\n")
            self._streamed_bytes = (self._streamed_bytes or 0) + len(data)

    def _end_stream(self, error: str | None, started: float, code: int) -> None:
        """Finish a streamed response; an error goes last, in ClickHouse's (25.11+) exception block
        marked with the response's ``X-ClickHouse-Exception-Tag``, so clients tell it from data."""
        if error is not None:
            message = (error.rstrip() + "\n").encode("utf-8", "replace")
            tag = self._exception_tag.encode()
            block = b"__exception__\r\n" + tag + b"\r\n" + message
            block += b"%d " % len(message) + tag + b"\r\n__exception__\r\n"
            self.close_connection = True
        try:
            if error is not None:
                self._write_chunk(block)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True
        log.info(
            "http method=%s status=200 streamed=1 bytes_out=%d ms=%.1f code=%d",
            self.command,
            self._streamed_bytes or 0,
            (time.perf_counter() - started) * 1000,
            code,
        )

    def _refuse_browser(self) -> QueryError | None:
        """A browser's request (any Origin) or a DNS-rebound one (a Host that is not loopback): 403."""
        if self.headers.get("Origin") is not None:
            return _error(497, "ACCESS_DENIED", "Requests with an Origin header (browsers) are refused", 403)
        host = self.headers.get("Host")
        if host is not None and not _LOOPBACK_HOST.match(host.strip()):
            return _error(497, "ACCESS_DENIED", "Host must be 127.0.0.1, localhost or [::1]", 403)
        return None

    def _read_body(self) -> bytes:
        limit = self.server.limits.max_body_bytes
        too_big = _error(1002, "UNKNOWN_EXCEPTION", f"Request body exceeds the server's limit of {limit} bytes", 413)
        try:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts, total = [], 0
                while True:
                    size = int(self.rfile.readline(1024).split(b";")[0].strip(), 16)
                    if size == 0:
                        for _ in range(100):
                            if self.rfile.readline(8192) in (b"\r\n", b"\n", b""):
                                break
                        break
                    total += size
                    if total > limit:
                        raise too_big
                    parts.append(self.rfile.read(size))
                    self.rfile.readline(1024)
                return b"".join(parts)
            length = int(self.headers.get("Content-Length") or 0)
        except (ValueError, OSError):
            self.close_connection = True
            raise _error(1002, "UNKNOWN_EXCEPTION", "malformed request body", 400) from None
        if length < 0:
            raise _error(1002, "UNKNOWN_EXCEPTION", "malformed request body", 400)
        if length > limit:
            raise too_big
        return self.rfile.read(length) if length else b""

    def _authenticate(self, args: dict[str, str]) -> None:
        user = args.get("user")
        password = args.get("password")
        if user is None and password is None:
            user = self.headers.get("X-ClickHouse-User")
            password = self.headers.get("X-ClickHouse-Key")
        if user is None and password is None:
            auth = self.headers.get("Authorization", "")
            if auth[:6].lower() == "basic ":
                try:
                    user, _, password = base64.b64decode(auth[6:].strip(), validate=True).decode().partition(":")
                except (binascii.Error, UnicodeDecodeError):
                    user, password = "", None
        user = user or USER
        expected = self.server.password.encode()
        given = (password or "").encode("utf-8", "surrogateescape")
        if not (
            hmac.compare_digest(user.encode("utf-8", "surrogateescape"), USER.encode())
            and hmac.compare_digest(given, expected)
        ):
            raise _error(
                516,
                "AUTHENTICATION_FAILED",
                f"{_header_safe(user)[:64]}: Authentication failed: password is incorrect, "
                "or there is no user with such name",
                403,
            )

    def _handle(self, body: bytes) -> tuple[bytes, dict[str, str]]:
        url = urlsplit(self.path)
        if url.path in ("/ping", "/replicas_status") or (
            url.path == "/" and not url.query and not body and self.command == "GET"
        ):
            return b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"}
        if url.path not in ("/", "/query"):
            raise _error(1002, "UNKNOWN_EXCEPTION", "There is no handle for this path", 404)
        args = dict(parse_qsl(url.query, keep_blank_values=True, errors="surrogateescape"))
        self._authenticate(args)
        query_id = args.get("query_id") or str(uuid.uuid4())
        if _HEADER_UNSAFE.search(query_id) or len(query_id) > 256:
            raise _error(36, "BAD_ARGUMENTS", "query_id must be at most 256 printable characters")
        try:
            return self._query(args, body, query_id)
        except QueryError as exc:
            exc.query_id = query_id  # type: ignore[attr-defined]
            raise

    def _query(self, args: dict[str, str], body: bytes, query_id: str) -> tuple[bytes, dict[str, str]]:
        server = self.server
        body = _decompress(body, self.headers.get("Content-Encoding", ""), server.limits.max_decompressed_bytes)
        externals: list[_External] = []
        content_type = self.headers.get("Content-Type", "")
        if content_type.lower().startswith("multipart/form-data"):
            fields, files = _multipart(content_type, body)
            body = b""
            args = {**args, **fields}
            for name, data in files:
                externals.append(self._external(args, name, data))
        sql, infile = _statement(args.get("query", ""), body)
        statement = _check(sql if infile is None else _TRAILING_FORMAT.sub("", sql))
        readonly = self.command == "GET"
        if readonly and statement.kind not in _READ_KINDS:
            raise _error(164, "READONLY", "Cannot execute query in readonly mode: GET requests are read-only, use POST")
        trailing = _TRAILING_FORMAT.search(sql)
        fmt = trailing.group(1) if trailing and infile is None else args.get("default_format", "TabSeparated")
        params = {k[6:]: v for k, v in args.items() if k.startswith("param_")}
        external_args = {f"{e.name}_{suffix}" for e in externals for suffix in ("structure", "format", "types")}
        settings = {
            k: v
            for k, v in args.items()
            if k not in _TRANSPORT_ARGS and not k.startswith("param_") and k not in external_args
        }
        bad = [k for k in settings if not _SETTING_NAME.match(k)]
        if bad:
            raise _error(115, "UNKNOWN_SETTING", f"Unknown setting '{_header_safe(bad[0])[:64]}'")
        database = args.get("database") or self.headers.get("X-ClickHouse-Database") or ""
        if "\\" in database or _HEADER_UNSAFE.search(database):
            raise _error(36, "BAD_ARGUMENTS", "a database name may not hold a backslash or a control character")
        session_id = args.get("session_id")
        req = _Request(sql, fmt, params, settings, database, readonly, infile, externals, statement)
        req.revision = _revision(args)

        def headers_for(counters: dict[str, int], size: int | None) -> dict[str, str]:
            summary = {k: str(v) for k, v in counters.items()}
            summary.update(total_rows_to_read=summary["read_rows"], result_rows="0")
            if size is not None:
                summary["result_bytes"] = str(size)
            headers = {
                "Content-Type": "text/plain; charset=UTF-8"
                if fmt.startswith(("TabSeparated", "TSV", "CSV"))
                else "application/octet-stream",
                "X-ClickHouse-Summary": orjson.dumps(summary).decode(),
                "X-ClickHouse-Query-Id": query_id,
            }
            if size or statement.kind in _RESULT_KINDS:  # as ClickHouse: only a statement with a result has a format
                headers["X-ClickHouse-Format"] = fmt
            timezone = settings.get("session_timezone")
            if timezone:
                headers["X-ClickHouse-Timezone"] = timezone
            if session_id:
                headers["X-ClickHouse-Session-Id"] = session_id
            return headers

        out = None
        if args.get("wait_end_of_query") != "1":  # as ClickHouse: wait_end_of_query=1 buffers the whole result
            out = _Stream(
                server.limits.stream_buffer_bytes, lambda c: self._begin_stream(headers_for(c, None)), self._write_chunk
            )
        if session_id:
            result, counters = self._in_session(session_id, args, req, out)
        else:
            req.database = req.database or "default"
            conn = server.engine.acquire()
            dirty = True
            try:
                result, counters = _execute(server.engine, conn, req, in_session=False, out=out)
                dirty = bool(externals or readonly) or statement.temporary or statement.kind not in _STATELESS_KINDS
                if settings and not dirty:
                    # Only the request's own settings changed: put them back (cheaper than a new handle,
                    # which waits for the queries running on the others: the sink's parallel inserts).
                    dirty = not _reset(conn, list(settings))
            finally:
                server.engine.release(conn, dirty)
        return result, headers_for(counters, len(result))

    def _in_session(
        self, session_id: str, args: dict[str, str], req: _Request, out: _Stream | None
    ) -> tuple[bytes, dict[str, int]]:
        limits = self.server.limits
        if _HEADER_UNSAFE.search(session_id) or len(session_id) > 256:
            raise _error(36, "BAD_ARGUMENTS", "session_id must be at most 256 printable characters")
        try:
            timeout = float(args.get("session_timeout") or limits.default_session_timeout_s)
        except ValueError:
            raise _error(36, "BAD_ARGUMENTS", "session_timeout must be a number of seconds") from None
        if not 0 <= timeout <= limits.max_session_timeout_s:
            raise _error(36, "BAD_ARGUMENTS", f"session_timeout must be within 0..{limits.max_session_timeout_s:.0f}")
        session = self.server.sessions.acquire(session_id, timeout, args.get("session_check") == "1")
        try:
            req.database = req.database or session.database
            result = _execute(self.server.engine, session.conn, req, in_session=True, out=out)
            if req.statement.kind == "USE":
                session.database = _current_database(session.conn, session.database)
            return result
        finally:
            self.server.sessions.release(session)

    @staticmethod
    def _external(args: dict[str, str], name: str, data: bytes) -> _External:
        if not _IDENTIFIER.match(name):
            raise _error(36, "BAD_ARGUMENTS", "an external table's name must be an identifier")
        structure = args.get(f"{name}_structure")
        if structure is None and args.get(f"{name}_types"):
            types = args[f"{name}_types"].split(",")
            structure = ", ".join(f"_{i + 1} {t.strip()}" for i, t in enumerate(types))
        if not structure:
            raise _error(36, "BAD_ARGUMENTS", f"external table {name}: {name}_structure is required")
        _check(f"CREATE TEMPORARY TABLE t ({structure}) ENGINE = Memory")
        fmt = args.get(f"{name}_format", "TabSeparated")
        if not _IDENTIFIER.match(fmt):
            raise _error(73, "UNKNOWN_FORMAT", "Unknown format")
        return _External(name, structure, fmt, data)

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("X-ClickHouse-Server-Display-Name", "feedback-chdb")
        headers.setdefault("X-ClickHouse-Timezone", "UTC")
        for name, value in headers.items():
            self.send_header(name, _header_safe(value))
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


def _revision(args: dict[str, str]) -> int:
    try:
        return int(args.get("client_protocol_version") or 0)
    except ValueError:
        return 0


def _check(sql: str) -> Statement:
    try:
        return check_statement(sql)
    except GuardError as exc:
        raise QueryError(str(exc), exc.code) from None


def _statement(url_query: str, body: bytes) -> tuple[str, bytes | memoryview | None]:
    """(SQL, insert data or None) from the URL query and the body, as ClickHouse combines them.

    The SQL is decoded with ``surrogateescape``: bytes that are not UTF-8 reach the engine unchanged."""
    if url_query and body:
        if _IS_INSERT.match(url_query):
            return url_query, body
        return url_query + "\n" + body.decode("utf-8", "surrogateescape"), None
    if url_query:
        return url_query, None
    inline = _INLINE_INSERT.match(body)
    if inline and _NOT_SPACE.search(body, inline.end()):
        return inline.group(1).decode("utf-8", "surrogateescape"), memoryview(body)[inline.end() :]
    return body.decode("utf-8", "surrogateescape"), None


class _HTTPServer(HTTPServer):
    """One thread per connection, at most ``limits.max_threads`` at once: when all are busy the
    accept loop waits, and new connections queue in the kernel's listen backlog."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], engine: _Engine, password: str, limits: ServerLimits) -> None:
        self.engine = engine
        self.password = password
        self.limits = limits
        self.sessions = _Sessions(engine, limits)
        self._slots = threading.BoundedSemaphore(limits.max_threads)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()
        try:
            thread = threading.Thread(target=self._serve_one, args=(request, client_address), daemon=True)
            thread.start()
        except BaseException:
            self._slots.release()
            raise

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):  # a client that went away: not ours to report
            log.debug("http_connection_closed error=%s", type(exc).__name__)
            return
        log.warning("http_connection_error error=%s", type(exc).__name__, exc_info=True)


class EmbeddedClickHouseServer:
    """chDB on ``data_dir`` served over ClickHouse's HTTP interface at ``host:port``.

    ``port=0`` picks a free port; read it back from :attr:`port` after :meth:`start`.
    ``connections``: chDB handles, i.e. how many sessionless queries run at once.
    ``password``: the user ``default``'s password (clients must send it).
    """

    def __init__(
        self,
        host: str,
        port: int,
        data_dir: Path,
        connections: int = 4,
        *,
        password: str,
        limits: ServerLimits | None = None,
    ) -> None:
        self.host = host
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.limits = limits or ServerLimits()
        self._engine = _Engine(self.data_dir, connections)
        self._httpd = _HTTPServer((host, port), self._engine, password, self.limits)
        self.port = int(self._httpd.server_address[1])
        self._thread: threading.Thread | None = None

    def start(self) -> EmbeddedClickHouseServer:
        """Serve in a background thread; returns once the socket accepts connections."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="chdb-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve on the calling thread until :meth:`stop` is called from another thread."""
        self._httpd.serve_forever()

    def stop(self) -> None:
        """Stop serving and close chDB."""
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(10)
        self._httpd.sessions.close()
        self._engine.close()

    def __enter__(self) -> EmbeddedClickHouseServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def read_password_file(path: Path) -> str:
    """The password in ``path``, which must be readable by its owner only. Raises ValueError."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ValueError(f"{path} must be readable by its owner only (mode 0600), not {mode:04o}")
    password = path.read_text().strip()
    if not password:
        raise ValueError(f"{path} is empty")
    return password


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m sinks.chdb_server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--password-file", type=Path, required=True, help="the user default's password (mode 0600)")
    parser.add_argument("--connections", type=int, default=4, help="queries run at once (chDB handles)")
    parser.add_argument("--max-body-bytes", type=int, default=ServerLimits.max_body_bytes)
    parser.add_argument("--max-decompressed-bytes", type=int, default=ServerLimits.max_decompressed_bytes)
    parser.add_argument("--max-threads", type=int, default=ServerLimits.max_threads)
    parser.add_argument("--socket-timeout", type=float, default=ServerLimits.socket_timeout_s)
    args = parser.parse_args(argv)
    os.environ["TZ"] = "UTC"
    time.tzset()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    try:
        password = read_password_file(args.password_file)
    except (OSError, ValueError) as exc:
        log.error("bad password file error=%s", exc)
        return 2
    limits = ServerLimits(
        max_body_bytes=args.max_body_bytes,
        max_decompressed_bytes=args.max_decompressed_bytes,
        max_threads=args.max_threads,
        socket_timeout_s=args.socket_timeout,
    )
    try:
        server = EmbeddedClickHouseServer(
            args.host, args.port, args.data_dir, args.connections, password=password, limits=limits
        )
    except OSError as exc:
        log.error("cannot listen host=%s port=%d error=%s", args.host, args.port, exc.strerror)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    log.warning("serving host=%s port=%d data_dir=%s", args.host, server.port, args.data_dir)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
