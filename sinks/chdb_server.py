"""A ClickHouse-compatible HTTP endpoint in front of chDB (ClickHouse in-process).

Only one process may open a chDB data directory, so this process owns it and
serves everyone else over ClickHouse's HTTP interface: clickhouse-connect, curl
and the pipeline's sinks talk to it exactly as to a real server.

Supported: ``/ping``; queries from the ``query`` URL argument and/or the POST
body; ``param_<name>`` query parameters; ``database``; any other URL argument as
a per-query setting; compressed request bodies (gzip, deflate, br, zstd, lz4);
inserts with data in the body (``INSERT ... FORMAT X`` + data), which are
written to a temporary file and ingested with ``FROM INFILE`` (fast, and the
data never passes through SQL text). Requests run in parallel, each on its own chDB
handle (``--connections``, default 4). Errors come back as ClickHouse does:
HTTP 500, ``Code: N. DB::Exception: ...`` and ``X-ClickHouse-Exception-Code``.

Run: ``python -m sinks.chdb_server --port 8123 --data-dir .local/clickhouse``.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import re
import signal
import socket
import tempfile
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

__all__ = ["EmbeddedClickHouseServer", "main"]

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


class QueryError(Exception):
    """A query ClickHouse rejected; ``code`` is ClickHouse's error code."""

    def __init__(self, message: str, code: int = 1002) -> None:
        super().__init__(message)
        self.code = code


def _decompress(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    # Clients compress each block separately, so a body can hold several frames/members.
    if encoding == "gzip":
        import gzip

        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "lz4":
        import lz4.frame

        out, rest = [], body
        while rest:
            decompressor = lz4.frame.LZ4FrameDecompressor()
            out.append(decompressor.decompress(rest))
            if not decompressor.eof:
                raise ValueError("truncated lz4 frame")
            rest = decompressor.unused_data
        return b"".join(out)
    if encoding == "zstd":
        from backports import zstd

        return bytes(zstd.decompress(body))
    if encoding == "br":
        import brotli

        return bytes(brotli.decompress(body))
    raise QueryError(f"Code: 1002. DB::Exception: Unknown Content-Encoding '{encoding}'. (UNKNOWN_EXCEPTION)")


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class _Engine:
    """chDB handles on one data directory, one query at a time per handle.

    chDB (4.x) runs queries on separate handles of the same data directory in parallel, each
    with its own session state (``USE``, ``SET``), so concurrent requests (a sink inserting the
    chunks of a batch side by side, an analyst querying meanwhile) each take a free handle. Queries with
    ``{name:Type}`` parameters are run one at a time across handles: libchdb does not promise
    to keep one handle's parameters from another's while they run in parallel.
    """

    def __init__(self, data_dir: Path, connections: int = 4) -> None:
        import chdb

        self.data_dir = data_dir
        self.tmp_dir = data_dir / "http_tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._free: queue.LifoQueue[Any] = queue.LifoQueue()
        self._handles = []
        for _ in range(max(1, connections)):
            conn = chdb.connect(str(data_dir))
            conn.query("SET session_timezone = 'UTC'")
            self._handles.append(conn)
            self._free.put(conn)
        self._params_lock = threading.Lock()

    def close(self) -> None:
        """Close every handle, once the queries running on them have finished."""
        for _ in self._handles:
            self._free.get().close()

    def run(
        self,
        sql: str,
        fmt: str,
        *,
        params: dict[str, str],
        settings: dict[str, str],
        database: str,
        infile: bytes | memoryview | None = None,
    ) -> tuple[bytes, dict[str, int]]:
        """Run one statement with per-query settings; returns (result bytes, counters)."""
        path: str | None = None
        if infile is not None:
            fd, path = tempfile.mkstemp(dir=self.tmp_dir, suffix=".data")
            with os.fdopen(fd, "wb") as fh:
                fh.write(infile)
        conn = self._free.get()
        try:
            if params:
                with self._params_lock:
                    return self._execute(conn, sql, fmt, params, settings, database, path)
            return self._execute(conn, sql, fmt, params, settings, database, path)
        finally:
            self._free.put(conn)
            if path:
                os.unlink(path)

    @staticmethod
    def _execute(
        conn: Any,
        sql: str,
        fmt: str,
        params: dict[str, str],
        settings: dict[str, str],
        database: str,
        infile: str | None,
    ) -> tuple[bytes, dict[str, int]]:
        applied: list[str] = []
        try:
            conn.query(f"USE `{database.replace('`', '')}`")
            if settings:  # one statement: all of them apply, or (an unknown one) none
                conn.query("SET " + ", ".join(f"{name} = {_quote(value)}" for name, value in settings.items()))
                applied = list(settings)
            if infile is not None:
                head = _TRAILING_FORMAT.search(sql)
                in_fmt = head.group(1) if head else fmt
                stem = sql[: head.start()] if head else sql
                if _INPUT_FUNCTION.search(stem):
                    # INSERT ... SELECT ... FROM input('structure') FORMAT X: the body is input()'s data.
                    sql = _INPUT_FUNCTION.sub(lambda m: f"file({_quote(infile)}, {_quote(in_fmt)}, {m.group(1)})", stem)
                else:
                    sql = f"{stem.rstrip()} FROM INFILE {_quote(infile)} FORMAT {in_fmt}"
            result = conn.query(sql, fmt, params=params)
            counters = {
                "read_rows": int(result.rows_read()),
                "read_bytes": int(result.bytes_read()),
                "written_rows": int(result.rows_written()) if infile is None else int(result.rows_read()),
                "written_bytes": int(result.bytes_written()) if infile is None else int(result.bytes_read()),
                "elapsed_ns": int(result.elapsed() * 1e9),
            }
            return bytes(result.bytes() or b""), counters
        except QueryError:
            raise
        except Exception as exc:  # chDB raises ChdbError (a RuntimeError) with ClickHouse's message
            message = str(exc).strip()
            match = _ERROR_CODE.search(message)
            raise QueryError(message, int(match.group(1)) if match else 1002) from None
        finally:
            if applied:
                _reset(conn, applied)


def _reset(conn: Any, names: list[str]) -> None:
    """Put a handle's settings back to their defaults after a query: one statement, or one per
    setting if that fails, so a setting that cannot be reset does not keep the others."""
    try:
        conn.query("SET " + ", ".join(f"{name} = DEFAULT" for name in names))
        return
    except Exception:
        pass
    for name in names:
        try:
            conn.query(f"SET {name} = DEFAULT")
        except Exception:  # a setting that cannot be reset must not poison the handle
            log.warning("setting_reset_failed name=%s", name)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        # Without TCP_NODELAY, small request/response pairs wait on delayed ACKs.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # our own access log below never includes query text

    def do_GET(self) -> None:
        self._handle(b"")

    def do_POST(self) -> None:
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self._send(400, b"Code: 1002. DB::Exception: malformed request body. (UNKNOWN_EXCEPTION)\n", {})
            return
        self._handle(body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self, body: bytes) -> None:
        started = time.perf_counter()
        url = urlsplit(self.path)
        if url.path in ("/ping", "/") and not url.query and not body:
            self._send(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
            return
        if url.path not in ("/", "/query"):
            self._send(404, b"Code: 1002. DB::Exception: There is no handle for this path. (UNKNOWN_EXCEPTION)\n", {})
            return
        args = dict(parse_qsl(url.query, keep_blank_values=True))
        query_id = args.get("query_id") or str(uuid.uuid4())
        status, code = 200, 0
        try:
            body = _decompress(body, self.headers.get("Content-Encoding", ""))
            sql, infile = self._statement(args.get("query", ""), body)
            trailing = _TRAILING_FORMAT.search(sql)
            fmt = trailing.group(1) if trailing and infile is None else args.get("default_format", "TabSeparated")
            params = {k[6:]: v for k, v in args.items() if k.startswith("param_")}
            settings = {k: v for k, v in args.items() if k not in _TRANSPORT_ARGS and not k.startswith("param_")}
            bad = [k for k in settings if not _SETTING_NAME.match(k)]
            if bad:
                raise QueryError(f"Code: 115. DB::Exception: Unknown setting '{bad[0]}'. (UNKNOWN_SETTING)", 115)
            database = args.get("database") or self.headers.get("X-ClickHouse-Database") or "default"
            result, counters = self.server.engine.run(
                sql, fmt, params=params, settings=settings, database=database, infile=infile
            )
            summary = {k: str(v) for k, v in counters.items()}
            summary.update(total_rows_to_read=summary["read_rows"], result_rows="0", result_bytes=str(len(result)))
            headers = {
                "Content-Type": "text/plain; charset=UTF-8"
                if fmt.startswith(("TabSeparated", "TSV", "CSV"))
                else "application/octet-stream",
                "X-ClickHouse-Format": fmt,
                "X-ClickHouse-Summary": orjson.dumps(summary).decode(),
            }
        except QueryError as exc:
            status, code = 500, exc.code
            result = (str(exc).rstrip() + "\n").encode()
            headers = {"Content-Type": "text/plain; charset=UTF-8", "X-ClickHouse-Exception-Code": str(code)}
        except (ValueError, OSError, zlib.error) as exc:
            status, code = 400, 1002
            result = f"Code: 1002. DB::Exception: bad request: {type(exc).__name__}. (UNKNOWN_EXCEPTION)\n".encode()
            headers = {"Content-Type": "text/plain; charset=UTF-8", "X-ClickHouse-Exception-Code": str(code)}
        headers["X-ClickHouse-Query-Id"] = query_id
        self._send(status, result, headers)
        log.info(
            "http method=%s status=%d bytes_in=%d bytes_out=%d ms=%.1f code=%d",
            self.command,
            status,
            len(body),
            len(result),
            (time.perf_counter() - started) * 1000,
            code,
        )

    @staticmethod
    def _statement(url_query: str, body: bytes) -> tuple[str, bytes | memoryview | None]:
        """(SQL, insert data or None) from the URL query and the body, as ClickHouse combines them."""
        if url_query and body:
            if _IS_INSERT.match(url_query):
                return url_query, body
            return url_query + "\n" + body.decode("utf-8"), None
        if url_query:
            return url_query, None
        inline = _INLINE_INSERT.match(body)
        if inline and _NOT_SPACE.search(body, inline.end()):
            return inline.group(1).decode("utf-8"), memoryview(body)[inline.end() :]  # the data, not a copy of it
        return body.decode("utf-8"), None

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("X-ClickHouse-Server-Display-Name", "feedback-chdb")
        self.send_header("X-ClickHouse-Timezone", "UTC")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], engine: _Engine) -> None:
        self.engine = engine
        super().__init__(address, _Handler)


class EmbeddedClickHouseServer:
    """chDB on ``data_dir`` served over ClickHouse's HTTP interface at ``host:port``.

    ``port=0`` picks a free port; read it back from :attr:`port` after :meth:`start`.
    ``connections``: chDB handles, i.e. how many queries run at once (one per request).
    """

    def __init__(self, host: str, port: int, data_dir: Path, connections: int = 4) -> None:
        self.host = host
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._engine = _Engine(self.data_dir, connections)
        self._httpd = _HTTPServer((host, port), self._engine)
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
        self._engine.close()

    def __enter__(self) -> EmbeddedClickHouseServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m sinks.chdb_server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--connections", type=int, default=4, help="queries run at once (chDB handles)")
    args = parser.parse_args(argv)
    os.environ["TZ"] = "UTC"
    time.tzset()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    try:
        server = EmbeddedClickHouseServer(args.host, args.port, args.data_dir, args.connections)
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
