"""The embedded ClickHouse server's hardening (issue 18), against the real server with real clients:
clickhouse-connect, and plain HTTP as curl sends it."""

from __future__ import annotations

import base64
import gzip
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import clickhouse_connect
import lz4.frame
import pytest
from backports import zstd
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from pipeline.settings import Settings
from sinks.chdb_server import EmbeddedClickHouseServer

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-for-tests"
MARKER = "MARKER-7f1c2e-not-for-queries"


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("outside") / "secret.txt"
    path.write_text(f"{MARKER}\n")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedClickHouseServer]:
    with EmbeddedClickHouseServer("127.0.0.1", 0, tmp_path_factory.mktemp("chdb") / "data", password=PASSWORD) as srv:
        yield srv


@dataclass
class _Process:
    """A server in a process of its own (one process holds one chDB instance)."""

    port: int


ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def _server_process(folder: Path, *flags: str) -> Iterator[_Process]:
    from tests.conftest import _free_port

    port = _free_port()
    password_file = folder / "password"
    password_file.write_text(PASSWORD)
    password_file.chmod(0o600)
    argv = [sys.executable, "-m", "sinks.chdb_server", "--port", str(port), "--data-dir", str(folder / "data")]
    proc = subprocess.Popen([*argv, "--password-file", str(password_file), *flags], cwd=ROOT)
    try:
        for _ in range(200):
            assert proc.poll() is None
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        yield _Process(port)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Process]:
    """A server with small limits, for the limit tests."""
    flags = ["--connections", "2", "--max-body-bytes", str(1 << 20), "--max-decompressed-bytes", str(4 << 20)]
    with _server_process(tmp_path_factory.mktemp("chdb-small"), *flags, "--max-threads", "3") as srv:
        yield srv


def _client(server: EmbeddedClickHouseServer | _Process, **kwargs: object) -> Client:
    kwargs.setdefault("password", PASSWORD)
    return clickhouse_connect.get_client(host="127.0.0.1", port=server.port, **kwargs)  # type: ignore[arg-type]


def _http(
    server: EmbeddedClickHouseServer | _Process,
    method: str = "POST",
    query: dict[str, str] | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    auth: bool = True,
) -> tuple[int, dict[str, str], bytes]:
    """One request as curl would send it: (status, headers, body)."""
    args = dict(query or {})
    if auth:
        args.setdefault("user", "default")
        args.setdefault("password", PASSWORD)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, "/?" + urllib.parse.urlencode(args), body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


# --- authentication ------------------------------------------------------------------------------


def test_the_right_password_is_accepted_by_every_means(server: EmbeddedClickHouseServer) -> None:
    assert _client(server).command("SELECT 1") == 1
    status, _, body = _http(server, query={"query": "SELECT 2"})
    assert (status, body) == (200, b"2\n")
    status, _, body = _http(
        server,
        query={"query": "SELECT 3"},
        headers={"X-ClickHouse-User": "default", "X-ClickHouse-Key": PASSWORD},
        auth=False,
    )
    assert (status, body) == (200, b"3\n")
    basic = base64.b64encode(f"default:{PASSWORD}".encode()).decode()
    status, _, body = _http(
        server, query={"query": "SELECT 4"}, headers={"Authorization": f"Basic {basic}"}, auth=False
    )
    assert (status, body) == (200, b"4\n")


@pytest.mark.parametrize(
    "query, headers",
    [
        ({}, {}),  # no credentials at all
        ({"user": "default", "password": "wrong"}, {}),
        ({"user": "default"}, {}),
        ({"user": "admin", "password": PASSWORD}, {}),  # the only user is default
        ({}, {"X-ClickHouse-User": "default", "X-ClickHouse-Key": "wrong"}),
        ({}, {"Authorization": "Basic " + base64.b64encode(b"default:wrong").decode()}),
        ({}, {"Authorization": "Basic !!!not-base64"}),
    ],
)
def test_wrong_or_missing_credentials_get_error_516(
    server: EmbeddedClickHouseServer, query: dict[str, str], headers: dict[str, str]
) -> None:
    status, response_headers, body = _http(server, query={"query": "SELECT 1", **query}, headers=headers, auth=False)
    assert status == 403
    assert response_headers["x-clickhouse-exception-code"] == "516"
    assert body.startswith(b"Code: 516. DB::Exception: ") and b"(AUTHENTICATION_FAILED)" in body


def test_clickhouse_connect_with_a_wrong_password_fails_with_516(server: EmbeddedClickHouseServer) -> None:
    with pytest.raises(DatabaseError, match="516"):
        _client(server, password="wrong")
    with pytest.raises(DatabaseError, match="AUTHENTICATION_FAILED"):
        _client(server, password="")


def test_ping_needs_no_password_but_replicas_status_answers_ok(server: EmbeddedClickHouseServer) -> None:
    for path in ("/ping", "/replicas_status"):
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as response:
            assert response.read() == b"Ok.\n"


# --- read-only GET ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE get_write (x UInt8) ENGINE = MergeTree ORDER BY x",
        "CREATE DATABASE get_write_db",
        "INSERT INTO get_ro.t VALUES (1)",
        "DROP TABLE get_ro.t",
        "TRUNCATE TABLE get_ro.t",
        "ALTER TABLE get_ro.t DELETE WHERE 1",
        "OPTIMIZE TABLE get_ro.t",
    ],
)
def test_a_get_cannot_write(server: EmbeddedClickHouseServer, statement: str) -> None:
    client = _client(server)
    client.command("CREATE DATABASE IF NOT EXISTS get_ro")
    client.command("CREATE TABLE IF NOT EXISTS get_ro.t (x UInt8) ENGINE = MergeTree ORDER BY x")
    status, headers, body = _http(server, "GET", query={"query": statement})
    assert status == 500
    assert headers["x-clickhouse-exception-code"] == "164"
    assert b"(READONLY)" in body
    assert client.command("EXISTS TABLE get_ro.t") == 1
    assert client.command("EXISTS DATABASE get_write_db") == 0


def test_a_get_reads_and_a_post_writes(server: EmbeddedClickHouseServer) -> None:
    status, _, body = _http(server, "POST", query={"query": "CREATE DATABASE IF NOT EXISTS get_post"})
    assert status == 200
    status, _, body = _http(
        server, "GET", query={"query": "SELECT count() FROM system.databases WHERE name = 'get_post'"}
    )
    assert (status, body) == (200, b"1\n")
    # readonly=2 as ClickHouse: a GET may still change settings for its own query
    status, _, body = _http(server, "GET", query={"query": "SELECT getSetting('max_threads')", "max_threads": "3"})
    assert (status, body) == (200, b"3\n")


# --- browsers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1"},
        {"Host": "evil.example"},
        {"Host": "evil.example:8123"},
        {"Host": "127.0.0.1.evil.example"},
        {"Host": "localhost.evil.example"},
        {"Host": "10.0.0.1"},
    ],
)
def test_browsers_and_rebound_hosts_are_refused(server: EmbeddedClickHouseServer, headers: dict[str, str]) -> None:
    for path in ("/?query=DROP+DATABASE+IF+EXISTS+browser", "/ping"):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            conn.putrequest("GET", path, skip_host="Host" in headers)
            for name, value in headers.items():
                conn.putheader(name, value)
            conn.putheader("Authorization", "Basic " + base64.b64encode(f"default:{PASSWORD}".encode()).decode())
            conn.endheaders()
            response = conn.getresponse()
            assert response.status == 403
            assert response.read().startswith(b"Code: 497.")
        finally:
            conn.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "LOCALHOST"])
def test_loopback_hosts_are_served(server: EmbeddedClickHouseServer, host: str) -> None:
    for value in (host, f"{host}:{server.port}"):
        status, _, body = _http(server, query={"query": "SELECT 5"}, headers={"Host": value})
        assert (status, body) == (200, b"5\n")


# --- the sandbox ---------------------------------------------------------------------------------

BYPASSES = [
    "SELECT * FROM file('{secret}', 'RawBLOB')",
    "SELECT * FROM FILE('{secret}', 'RawBLOB')",
    "SELECT * FROM fIlE/**/('{secret}', 'RawBLOB')",
    "SELECT * FROM file -- c\n('{secret}', 'RawBLOB')",
    "SELECT * FROM\n\t file\n(\n'{secret}'\n, 'RawBLOB')",
    "SELECT * FROM `file`('{secret}', 'RawBLOB')",
    "SELECT * FROM (SELECT * FROM (SELECT * FROM file('{secret}', 'RawBLOB')))",
    "SELECT (SELECT any(*) FROM file('{secret}', 'RawBLOB'))",
    "WITH x AS (SELECT * FROM file('{secret}', 'RawBLOB')) SELECT * FROM x",
    "SELECT * FROM '{secret}'",
    "SELECT * FROM `{secret}`",
    "SELECT * FROM default.`{secret}`",
    'SELECT * FROM "{secret}"',
    "SELECT * FROM file('/proc/self/environ', 'RawBLOB')",
    "SELECT * FROM url('http://127.0.0.1:{port}/ping', 'RawBLOB')",
    "SELECT * FROM s3('http://127.0.0.1:{port}/bucket/key', 'RawBLOB')",
    "SELECT * FROM remote('127.0.0.1', system.one)",
    "SELECT * FROM remoteSecure('127.0.0.1', system.one)",
    "SELECT * FROM cluster('default', system.one)",
    "SELECT * FROM mysql('127.0.0.1:3306', 'db', 't', 'u', 'p')",
    "SELECT * FROM postgresql('127.0.0.1:5432', 'db', 't', 'u', 'p')",
    "SELECT * FROM sqlite('{secret}', 't')",
    "SELECT * FROM hdfs('hdfs://127.0.0.1:1/x', 'RawBLOB')",
    "SELECT * FROM executable('cat {secret}', 'RawBLOB', 'x String')",
    "SELECT * FROM Python(os)",
    "SELECT 1 INTO OUTFILE '{outside}/written.txt'",
    "SELECT 1 INTO/**/outfile '{outside}/written.txt'",
    "INSERT INTO FUNCTION file('{outside}/written.txt', 'TSV') SELECT 1",
    "INSERT INTO sandbox.t FROM INFILE '{secret}' FORMAT RawBLOB",
    "CREATE VIEW sandbox.v AS SELECT * FROM file('{secret}', 'RawBLOB')",
    "CREATE TABLE sandbox.f (s String) ENGINE = File(RawBLOB, '{secret}')",
    "CREATE TABLE sandbox.u (s String) ENGINE = URL('http://127.0.0.1:{port}/ping', RawBLOB)",
    "CREATE TABLE sandbox.c ENGINE = MergeTree ORDER BY tuple() AS SELECT * FROM file('{secret}', 'RawBLOB')",
    "CREATE TABLE sandbox.ff AS file('{secret}', 'RawBLOB')",
    "CREATE DATABASE fs ENGINE = Filesystem('{outside}')",
    "CREATE DATABASE ov ENGINE = Overlay",
    "CREATE DICTIONARY sandbox.d (s String) PRIMARY KEY s SOURCE(FILE(path '{secret}' format 'RawBLOB')) "
    "LAYOUT(COMPLEX_KEY_HASHED()) LIFETIME(0)",
    # dictionaries are allowed over this server's own tables only
    "CREATE DICTIONARY sandbox.d (s String) PRIMARY KEY s SOURCE(CLICKHOUSE(QUERY 'SELECT * FROM file(''{secret}'', "
    "''RawBLOB'')')) LAYOUT(COMPLEX_KEY_HASHED()) LIFETIME(0)",
    "CREATE DICTIONARY sandbox.d (s String) PRIMARY KEY s SOURCE(CLICKHOUSE(TABLE 't' WHERE 's IN (SELECT * FROM "
    "file(''{secret}'', ''RawBLOB''))')) LAYOUT(COMPLEX_KEY_HASHED()) LIFETIME(0)",
    "CREATE DICTIONARY sandbox.d (s String) PRIMARY KEY s SOURCE(CLICKHOUSE(HOST '127.0.0.1' PORT {port} "
    "TABLE 't')) LAYOUT(COMPLEX_KEY_HASHED()) LIFETIME(0)",
    "CREATE DICTIONARY sandbox.d (s String) PRIMARY KEY s SOURCE(HTTP(URL 'http://127.0.0.1:{port}/ping' "
    "FORMAT 'RawBLOB')) LAYOUT(COMPLEX_KEY_HASHED()) LIFETIME(0)",
    "CREATE DICTIONARY sandbox.d (s String) PRIMARY KEY s SOURCE(CLICKHOUSE(TABLE 't')) "
    "LAYOUT(COMPLEX_KEY_SSD_CACHE(PATH '{outside}/ssd')) LIFETIME(0)",
    "CREATE TABLE sandbox.w (a String) ENGINE = MergeTree ORDER BY a "
    "SETTINGS disk = disk(type = 'web', endpoint = 'http://127.0.0.1:{port}/')",
    "CREATE TABLE sandbox.l (a String) ENGINE = MergeTree ORDER BY a "
    "SETTINGS disk = disk(type = 'local', path = '{outside}/')",
    "ATTACH TABLE sandbox.at FROM '{outside}' (s String) ENGINE = MergeTree ORDER BY s",
    "SELECT 1 AS x FORMAT Template SETTINGS format_template_row = '{secret}'",
    "SELECT 1 AS x FORMAT Protobuf SETTINGS format_schema = '{secret}:Msg'",
    "SET format_template_row = '{secret}'",
    "SET user_files_path = '/'",
    "SELECT 1 SETTINGS output_format_schema = '{outside}/schema.capnp'",
    "SYSTEM RELOAD CONFIG",
    "SYSTEM DROP DNS CACHE",
    "BACKUP DATABASE sandbox TO File('{outside}/backup')",
    "SELECT 1; SELECT * FROM file('{secret}', 'RawBLOB')",
    "/* /* */ ' */ SELECT * FROM file('{secret}', 'RawBLOB') -- '",
    "SELECT 1 # c\n, * FROM file('{secret}', 'RawBLOB')",
    "GRANT READ ON FILE TO default",
    # input()'s structure becomes SQL of the server's own: it is read by the guard too
    "INSERT INTO sandbox.t SELECT s FROM input('s String) ENGINE = Memory; SELECT 1 INTO OUTFILE "
    "''{outside}/x.txt'' --') FORMAT TSV\nabc\n",
    "INSERT INTO sandbox.t SELECT s FROM input('s String) ENGINE = Memory AS SELECT * FROM "
    "file(''{secret}'', ''RawBLOB'') --') FORMAT TSV\nabc\n",
    "CREATE USER intruder",
]


def test_the_sandbox_refuses_every_bypass_attempt(server: EmbeddedClickHouseServer, secret_file: Path) -> None:
    client = _client(server)
    client.command("CREATE DATABASE IF NOT EXISTS sandbox")
    client.command("CREATE TABLE IF NOT EXISTS sandbox.t (s String) ENGINE = MergeTree ORDER BY s")
    outside = secret_file.parent
    passed = []
    for template in BYPASSES:
        sql = template.format(secret=secret_file, outside=outside, port=server.port)
        status, headers, body = _http(server, query={}, body=sql.encode())
        if status == 200 or MARKER.encode() in body:
            passed.append(sql)
        assert "x-clickhouse-exception-code" in headers or status != 200
    assert passed == []
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]  # nothing was written beside it
    assert client.command("SELECT count() FROM sandbox.t") == 0
    for name in ("v", "f", "u", "c", "ff", "d", "w", "l", "at"):
        assert client.command(f"EXISTS TABLE sandbox.{name}") == 0
    assert client.command("EXISTS DICTIONARY sandbox.d") == 0


def test_the_environment_of_the_process_is_out_of_reach(server: EmbeddedClickHouseServer) -> None:
    for sql in ("SELECT * FROM file('/proc/self/environ', 'RawBLOB')", "SELECT * FROM '/proc/self/environ'"):
        status, _, body = _http(server, body=sql.encode())
        assert status != 200 and b"PATH=" not in body


def test_legit_project_queries_still_work(server: EmbeddedClickHouseServer) -> None:
    from sinks.migrations import migrate

    settings = Settings(
        clickhouse_url=f"http://127.0.0.1:{server.port}", clickhouse_password=PASSWORD, clickhouse_database="legit"
    )
    from sinks.clickhouse import connect

    client = connect(settings)
    applied = migrate(client, settings)
    assert applied and applied == sorted(applied)
    assert migrate(client, settings) == []  # idempotent
    tables = client.query("SELECT name FROM system.tables WHERE database = 'legit'").result_rows
    assert ("feedback_events",) in tables
    # temporary tables, views and materialized views over tables stay allowed
    client.command("CREATE VIEW IF NOT EXISTS legit.v AS SELECT count() AS n FROM legit.feedback_events")
    assert client.command("SELECT n FROM legit.v") == 0
    # and tables in the default database (clickhouse-local's default is a view of the file system)
    client.command("CREATE TABLE IF NOT EXISTS default.kept (x UInt8) ENGINE = MergeTree ORDER BY x")
    client.insert("kept", [[1], [2]], database="default")
    assert client.command("SELECT sum(x) FROM default.kept") == 3
    # format() reads data from its own argument, not from a file
    assert client.command("SELECT * FROM format(JSONEachRow, '{\"a\": 7}')") == 7


def test_a_dictionary_over_a_table_of_this_server_works(server: EmbeddedClickHouseServer) -> None:
    client = _client(server)
    client.command("CREATE DATABASE IF NOT EXISTS dicts")
    client.command("CREATE TABLE IF NOT EXISTS dicts.src (id UInt64, name String) ENGINE = MergeTree ORDER BY id")
    client.insert("src", [[13, "user_1"], [14, "user_2"]], database="dicts")
    client.command(
        "CREATE DICTIONARY IF NOT EXISTS dicts.names (id UInt64, name String DEFAULT '') PRIMARY KEY id "
        "SOURCE(CLICKHOUSE(DB 'dicts' TABLE 'src' WHERE 'id < 100')) LAYOUT(HASHED()) LIFETIME(MIN 0 MAX 10)"
    )
    client.command("SYSTEM RELOAD DICTIONARY dicts.names")
    row = client.query("SELECT status, element_count FROM system.dictionaries WHERE name = 'names'").result_rows
    assert row == [("LOADED", 2)]
    assert client.command("SELECT dictGet('dicts.names', 'name', toUInt64(14))") == "user_2"
    assert "SOURCE(CLICKHOUSE(DB 'dicts' TABLE 'src' WHERE 'id < 100'))" in client.command(
        "SHOW CREATE DICTIONARY dicts.names"
    ).replace("\\'", "'")
    client.command("DROP DICTIONARY dicts.names")
    assert client.command("SELECT count() FROM system.dictionaries WHERE name = 'names'") == 0


# --- limits ---------------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_with_413(small: _Process) -> None:
    auth = base64.b64encode(f"default:{PASSWORD}".encode()).decode()
    with socket.create_connection(("127.0.0.1", small.port), timeout=15) as sock:
        # refused on the declared length, before any of the body is read
        head = f"POST /?query=SELECT+1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {auth}\r\n"
        sock.sendall(f"{head}Content-Length: {2 << 20}\r\n\r\n".encode() + b" " * 1000)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 413 ")
    assert b"X-ClickHouse-Exception-Code: 1002" in response
    just_under = b"x" * ((1 << 20) - 100)
    status, _, body = _http(
        small, query={"query": "INSERT INTO FUNCTION null('s String') FORMAT RawBLOB"}, body=just_under
    )
    assert (status, body) == (200, b"")  # the server still serving


@pytest.mark.parametrize(
    "encoding, compress",
    [
        ("gzip", gzip.compress),
        ("zstd", zstd.compress),
        ("lz4", lz4.frame.compress),
        ("deflate", __import__("zlib").compress),
    ],
)
def test_a_decompression_bomb_stops_at_the_limit(
    small: EmbeddedClickHouseServer, encoding: str, compress: object
) -> None:
    bomb = compress(b"SELECT 1 " + b" " * (64 << 20))  # type: ignore[operator]
    assert len(bomb) < (1 << 20)  # small enough to pass the body limit
    started = time.monotonic()
    status, headers, _ = _http(small, query={}, body=bomb, headers={"Content-Encoding": encoding})
    assert status == 413
    assert headers["x-clickhouse-exception-code"] == "241"
    assert time.monotonic() - started < 20  # it stopped, rather than inflating 64 MB
    assert _http(small, query={"query": "SELECT 1"})[2] == b"1\n"


@pytest.mark.parametrize("encoding", ["lz4", "zstd", "gzip"])
def test_a_corrupt_body_gets_a_clickhouse_error(server: EmbeddedClickHouseServer, encoding: str) -> None:
    good = {"lz4": lz4.frame.compress, "zstd": zstd.compress, "gzip": gzip.compress}[encoding](b"SELECT 1" * 100)
    corrupt = good[:8] + bytes(b ^ 0x5A for b in good[8:])
    status, headers, body = _http(server, query={}, body=corrupt, headers={"Content-Encoding": encoding})
    assert status == 500
    assert headers["x-clickhouse-exception-code"] == "271"
    assert b"(CANNOT_DECOMPRESS)" in body


def test_an_idle_connection_is_closed_after_the_socket_timeout(tmp_path: Path) -> None:
    with (
        _server_process(tmp_path, "--connections", "1", "--socket-timeout", "1") as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=15) as sock,
    ):
        sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server
        assert time.monotonic() - started < 10


def test_the_thread_pool_is_bounded(small: _Process) -> None:
    idle = [socket.create_connection(("127.0.0.1", small.port), timeout=10) for _ in range(3)]  # max_threads
    try:
        time.sleep(0.3)  # let the server accept them
        with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
            conn = http.client.HTTPConnection("127.0.0.1", small.port, timeout=1.5)
            conn.request("GET", "/ping")
            conn.getresponse().read()
    finally:
        for sock in idle:
            sock.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{small.port}/ping", timeout=10) as response:
        assert response.read() == b"Ok.\n"


@pytest.mark.parametrize(
    "statement",
    ["SET max_threads = 1", "SET max_threads = 1;", "/* c */ SeT max_threads = 1", "USE system", "SET readonly = 1"],
)
def test_a_set_in_a_sessionless_request_never_outlives_it(small: _Process, statement: str) -> None:
    for _ in range(4):  # every handle of the pool (2) gets one
        assert _http(small, body=statement.encode())[0] == 200
    for _ in range(8):
        status, _, body = _http(
            small, body=b"SELECT getSetting('max_threads'), currentDatabase(), getSetting('readonly')"
        )
        assert status == 200
        threads, database, readonly = body.decode().split()
        assert threads != "1" and database == "default" and readonly == "0"


def test_query_settings_and_readonly_get_never_outlive_their_request(small: _Process) -> None:
    for _ in range(4):
        _http(small, query={"query": "SELECT 1", "max_threads": "1"})
        _http(small, "GET", query={"query": "SELECT 1"})
    for _ in range(8):
        _, _, body = _http(small, body=b"SELECT getSetting('max_threads'), getSetting('readonly')")
        assert body.split()[0] != b"1" and body.split()[1] == b"0"
    assert _http(small, body=b"CREATE DATABASE IF NOT EXISTS after_get")[0] == 200


def test_a_temporary_table_never_outlives_its_sessionless_request(small: _Process) -> None:
    assert _http(small, body=b"CREATE TEMPORARY TABLE leak (x UInt8) ENGINE = Memory")[0] == 200
    for _ in range(6):
        status, headers, _ = _http(small, body=b"SELECT * FROM leak")
        assert status == 500 and headers["x-clickhouse-exception-code"] == "60"


def test_sessions_keep_their_state_to_themselves(server: EmbeddedClickHouseServer) -> None:
    a, b = {"session_id": "sess-a"}, {"session_id": "sess-b"}
    assert _http(server, query=a, body=b"SET max_threads = 1")[0] == 200
    assert _http(server, query=a, body=b"CREATE TEMPORARY TABLE mine (x UInt8) ENGINE = Memory")[0] == 200
    assert _http(server, query=a, body=b"INSERT INTO mine VALUES (9)")[0] == 200
    assert _http(server, query=a, body=b"SELECT getSetting('max_threads'), sum(x) FROM mine")[2] == b"1\t9\n"
    assert _http(server, query=b, body=b"SELECT getSetting('max_threads')")[2] != b"1\n"
    assert _http(server, query=b, body=b"SELECT * FROM mine")[1]["x-clickhouse-exception-code"] == "60"
    assert _http(server, body=b"SELECT getSetting('max_threads')")[2] != b"1\n"
    # a per-query setting inside a session applies to that query only
    assert _http(server, query={**a, "max_threads": "2"}, body=b"SELECT getSetting('max_threads')")[2] == b"2\n"
    assert _http(server, query=a, body=b"SELECT getSetting('max_threads')")[2] == b"1\n"
    # USE stays in the session; a request's database argument is for that request only
    assert _http(server, query={**a, "database": "system"}, body=b"SELECT currentDatabase()")[2] == b"system\n"
    assert _http(server, query=a, body=b"SELECT currentDatabase()")[2] == b"default\n"
    assert _http(server, query=a, body=b"USE system")[0] == 200
    assert _http(server, query=a, body=b"SELECT currentDatabase()")[2] == b"system\n"
    assert _http(server, query=b, body=b"SELECT currentDatabase()")[2] == b"default\n"
    # clickhouse-connect's own sessions work the same way
    one, two = _client(server, session_id="cc-one"), _client(server, session_id="cc-two")
    one.command("SET max_threads = 1")
    assert str(one.command("SELECT getSetting('max_threads')")) == "1"
    assert str(two.command("SELECT getSetting('max_threads')")) != "1"


def test_a_busy_session_is_locked_and_an_unknown_one_is_not_found(server: EmbeddedClickHouseServer) -> None:
    session = {"session_id": "busy"}
    done = threading.Event()

    def hold() -> None:
        try:
            for _ in range(20):  # until its query ran: a probe below may hold the session at that moment
                if _http(server, query=session, body=b"SELECT sleep(2)")[0] == 200:
                    return
        finally:
            done.set()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        deadline = time.monotonic() + 60
        locked = []
        while time.monotonic() < deadline and not done.is_set():
            _, headers, body = _http(server, query=session, body=b"SELECT 1")
            if headers.get("x-clickhouse-exception-code") == "373":
                locked.append(body)
            time.sleep(0.05)
        assert locked, "no request saw the session locked while it ran sleep(2)"
        assert b"(SESSION_IS_LOCKED)" in locked[0]
    finally:
        holder.join(60)
    assert _http(server, query=session, body=b"SELECT 1")[2] == b"1\n"  # free again
    _, headers, _ = _http(server, query={"session_id": "never-made", "session_check": "1"}, body=b"SELECT 1")
    assert headers["x-clickhouse-exception-code"] == "372"


@pytest.mark.parametrize("query_id", ["a\r\nX-Evil: 1", "a\nSet-Cookie: x=1", "a\rb", "a\x00b"])
def test_no_control_character_reaches_a_response_header(server: EmbeddedClickHouseServer, query_id: str) -> None:
    status, headers, _ = _http(server, query={"query": "SELECT 1", "query_id": query_id})
    assert status == 500 and headers["x-clickhouse-exception-code"] == "36"
    assert "x-evil" not in headers and "set-cookie" not in headers
    assert all("\r" not in v and "\n" not in v for v in headers.values())


def test_a_query_id_comes_back_in_its_header(server: EmbeddedClickHouseServer) -> None:
    _, headers, _ = _http(server, query={"query": "SELECT 1", "query_id": "my-query-1"})
    assert headers["x-clickhouse-query-id"] == "my-query-1"
    _, headers, _ = _http(server, query={"query": "SELECT nope", "query_id": "my-query-2"})
    assert headers["x-clickhouse-query-id"] == "my-query-2"


# --- compatibility -------------------------------------------------------------------------------


def test_a_long_in_list_goes_as_multipart_form_data(server: EmbeddedClickHouseServer) -> None:
    client = _client(server)
    ids = list(range(2000))
    result = client.query(
        "SELECT count() FROM numbers(5000) WHERE number IN {ids:Array(UInt64)}", parameters={"ids": ids}
    )
    assert result.result_rows == [(2000,)]


def test_external_tables_travel_as_multipart_files(server: EmbeddedClickHouseServer) -> None:
    from clickhouse_connect.driver.external import ExternalData

    data = ExternalData(
        data=b"1\tone\n2\ttwo\n", structure="id UInt32, name String", fmt="TabSeparated", file_name="ext"
    )
    client = _client(server)
    result = client.query("SELECT name FROM ext ORDER BY id", external_data=data)
    assert result.result_rows == [("one",), ("two",)]
    with pytest.raises(DatabaseError):
        client.query("SELECT * FROM ext")  # gone with its request


def test_command_returns_a_summary_and_a_query_id(server: EmbeddedClickHouseServer) -> None:
    client = _client(server)
    client.command("CREATE TABLE IF NOT EXISTS default.summary (x UInt8) ENGINE = MergeTree ORDER BY x")
    summary = client.command("INSERT INTO default.summary SELECT number FROM numbers(10)")
    assert summary.written_rows == 10, summary
    assert summary.query_id()


def test_bytes_that_are_not_utf8_reach_the_engine_unchanged(server: EmbeddedClickHouseServer) -> None:
    status, _, body = _http(server, body=b"SELECT hex('\xff\xfe\x00')")
    assert (status, body) == (200, b"FFFE00\n")


def test_the_launcher_generates_a_private_password_and_scrubs_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.localstack import EmbeddedClickHouse
    from sinks.clickhouse import connect
    from tests.conftest import _free_port

    monkeypatch.setenv("FEEDBACK_INTERNAL_TOKENS", "token-must-not-leak")
    monkeypatch.setenv("FEEDBACK_PSEUDONYM_KEY", "key-must-not-leak-0123456789")
    settings = Settings(state_dir=tmp_path, clickhouse_port=_free_port())
    launcher = EmbeddedClickHouse(settings)
    launcher.start()
    try:
        path = settings.clickhouse_password_file
        assert path.stat().st_mode & 0o777 == 0o600
        password = path.read_text().strip()
        assert len(password) >= 24
        assert connect(settings).command("SELECT 1") == 1  # the project's client reads the same file
        with pytest.raises(DatabaseError, match="516"):
            clickhouse_connect.get_client(host="127.0.0.1", port=settings.clickhouse_port)
        pid = launcher.process.pid()
        assert pid is not None
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"token-must-not-leak" not in environ and b"key-must-not-leak" not in environ
        assert password.encode() not in environ and b"FEEDBACK_" not in environ
        status = launcher.status()
        assert str(path) in status.connect and "user default" in status.connect
    finally:
        launcher.stop()
    # FEEDBACK_CLICKHOUSE_PASSWORD, when set, is the password (and the file says so for other clients)
    chosen = settings.model_copy(update={"clickhouse_password": "chosen-password-42"})
    launcher = EmbeddedClickHouse(chosen)
    launcher.start()
    try:
        assert connect(chosen).command("SELECT 1") == 1
        assert connect(settings).command("SELECT 2") == 2  # reads the file, which now holds it
        assert chosen.clickhouse_password_file.read_text().strip() == "chosen-password-42"
        assert os.stat(chosen.clickhouse_password_file).st_mode & 0o777 == 0o600
    finally:
        launcher.stop()


def test_past_the_session_cap_the_least_recently_used_idle_session_is_closed(server: EmbeddedClickHouseServer) -> None:
    cap = server.limits.max_sessions
    assert _http(server, query={"session_id": "cap-0"}, body=b"SET max_threads = 1")[0] == 200
    for i in range(1, cap + 1):  # clickhouse-connect opens one session per client object
        assert _http(server, query={"session_id": f"cap-{i}"}, body=b"SELECT 1")[0] == 200
    # cap-0 was the idlest: closed, so a session_check finds it gone; the newest is still there
    assert (
        _http(server, query={"session_id": "cap-0", "session_check": "1"}, body=b"SELECT 1")[1].get(
            "x-clickhouse-exception-code"
        )
        == "372"
    )
    assert _http(server, query={"session_id": f"cap-{cap}", "session_check": "1"}, body=b"SELECT 1")[0] == 200
