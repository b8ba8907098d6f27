"""The embedded ClickHouse HTTP server, driven by clickhouse-connect and plain HTTP."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from sinks.chdb_server import EmbeddedClickHouseServer

pytestmark = pytest.mark.integration

PASSWORD = "test-password-1"

COLUMNS = ["id", "name", "kind", "ts", "score", "uid", "tags", "attrs"]
DDL = """
CREATE TABLE IF NOT EXISTS {db}.{table} (
    id UInt64, name String, kind LowCardinality(String), ts DateTime64(3, 'UTC'), score Nullable(Float64),
    uid UUID, tags Array(String), attrs Map(String, String)
) ENGINE = ReplacingMergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 100
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedClickHouseServer]:
    with EmbeddedClickHouseServer("127.0.0.1", 0, tmp_path_factory.mktemp("chdb"), password=PASSWORD) as srv:
        yield srv


def _client(server: EmbeddedClickHouseServer, compress: bool | str = True, database: str = "default") -> Client:
    return clickhouse_connect.get_client(
        host="127.0.0.1", port=server.port, compress=compress, database=database, password=PASSWORD
    )


def _rows(n: int, start: int = 0) -> list[list[object]]:
    import uuid

    base = datetime(2026, 11, 1, tzinfo=UTC)
    return [
        [
            i,
            f"name-{i}",
            ("a", "b", "c")[i % 3],
            base + timedelta(milliseconds=i),
            None if i % 7 == 0 else i / 10,
            uuid.UUID(int=i),
            [f"t{i % 5}"],
            {"k": str(i)},
        ]
        for i in range(start, start + n)
    ]


def _table(client: Client, name: str) -> None:
    client.command("CREATE DATABASE IF NOT EXISTS t")
    client.command(DDL.format(db="t", table=name))


def test_ping_and_server_identity(server: EmbeddedClickHouseServer) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/ping", timeout=5) as response:
        assert response.read() == b"Ok.\n"
    client = _client(server)
    assert client.server_version.split(".")[0].isdigit()
    assert client.query("SELECT timezone()").result_rows == [("UTC",)]


@pytest.mark.parametrize("compress", [True, "lz4", "zstd", "gzip", False])
def test_insert_100k_rows_with_each_compression(server: EmbeddedClickHouseServer, compress: bool | str) -> None:
    client = _client(server, compress)
    table = f"rows_{str(compress).lower()}"
    _table(client, table)
    client.insert(table, _rows(100_000), column_names=COLUMNS, database="t")
    count, ids, scores, kinds = client.query(
        f"SELECT count(), sum(id), round(sum(score), 1), uniqExact(kind) FROM t.{table}"
    ).result_rows[0]
    assert count == 100_000
    assert ids == sum(range(100_000))
    assert scores == round(sum(i / 10 for i in range(100_000) if i % 7), 1)
    assert kinds == 3
    row = list(client.query(f"SELECT * FROM t.{table} WHERE id = 12345").result_rows[0])
    row[3] = row[3].replace(tzinfo=UTC)  # clickhouse-connect returns UTC columns as naive datetimes
    assert row == _rows(1, 12345)[0]


def test_query_parameters(server: EmbeddedClickHouseServer) -> None:
    client = _client(server)
    _table(client, "params")
    client.insert("params", _rows(100), column_names=COLUMNS, database="t")
    result = client.query(
        "SELECT name FROM t.params WHERE id = {id:UInt64} AND kind = {kind:String}", parameters={"id": 42, "kind": "a"}
    )
    assert result.result_rows == [("name-42",)]


def test_settings_apply_to_one_query_only(server: EmbeddedClickHouseServer) -> None:
    client = _client(server)
    limited = client.query("SELECT getSetting('max_threads') AS v", settings={"max_threads": 1})
    assert str(limited.result_rows[0][0]) == "1"
    after = client.query("SELECT getSetting('max_threads') AS v")
    assert str(after.result_rows[0][0]) != "1"


def test_an_unknown_setting_fails_its_query_and_leaves_no_setting_behind(server: EmbeddedClickHouseServer) -> None:
    client = _client(server)
    with pytest.raises(DatabaseError, match="UNKNOWN_SETTING"):
        client.query("SELECT 1", settings={"max_threads": 1, "no_such_setting": 1})
    for _ in range(8):  # whichever handle the next queries take (the last one used comes first)
        assert str(client.query("SELECT getSetting('max_threads')").result_rows[0][0]) != "1"


def test_errors_come_back_as_clickhouse_errors_and_the_server_survives(server: EmbeddedClickHouseServer) -> None:
    client = _client(server)
    with pytest.raises(DatabaseError, match="UNKNOWN_TABLE"):
        client.query("SELECT * FROM t.does_not_exist")
    with pytest.raises(DatabaseError, match="SYNTAX_ERROR"):
        client.command("SELEKT 1")
    assert client.command("SELECT 1") == 1


def test_same_dedup_token_twice_lands_once(server: EmbeddedClickHouseServer) -> None:
    client = _client(server)
    _table(client, "dedup")
    for _ in range(2):
        client.insert(
            "dedup", _rows(500), column_names=COLUMNS, database="t", settings={"insert_deduplication_token": "batch-1"}
        )
    assert client.command("SELECT count() FROM t.dedup") == 500
    client.insert(
        "dedup", _rows(500), column_names=COLUMNS, database="t", settings={"insert_deduplication_token": "batch-2"}
    )
    assert client.command("SELECT count() FROM t.dedup") == 1000
    assert client.command("SELECT count() FROM t.dedup FINAL") == 500


def test_curl_style_requests(server: EmbeddedClickHouseServer) -> None:
    client = _client(server)
    _table(client, "curl")
    url = f"http://127.0.0.1:{server.port}/?user=default&password={PASSWORD}"
    body = b'INSERT INTO t.curl (id, name) FORMAT JSONEachRow\n{"id": 1, "name": "one"}\n{"id": 2, "name": "two"}\n'
    with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10) as response:
        assert response.status == 200
    query = urllib.request.quote("SELECT id, name FROM t.curl ORDER BY id FORMAT JSONEachRow")
    with urllib.request.urlopen(f"{url}&query={query}", timeout=10) as response:
        assert response.read() == b'{"id":1,"name":"one"}\n{"id":2,"name":"two"}\n'
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{url}&query=SELECT+nope", timeout=10)
    assert info.value.code == 500
    assert info.value.headers["X-ClickHouse-Exception-Code"] == "47"


WRITER = textwrap.dedent(
    """
    import sys, clickhouse_connect
    from tests.integration.test_chdb_server import COLUMNS, _rows
    port, worker = int(sys.argv[1]), int(sys.argv[2])
    client = clickhouse_connect.get_client(host="127.0.0.1", port=port, database="t", password=sys.argv[3])
    for batch in range(4):
        start = worker * 1_000_000 + batch * 5_000
        client.insert("concurrent", _rows(5_000, start), column_names=COLUMNS)
        client.query("SELECT count() FROM concurrent")
    """
)


def test_concurrent_writers_from_several_processes(server: EmbeddedClickHouseServer) -> None:
    client = _client(server)
    _table(client, "concurrent")
    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(server.port), str(w), PASSWORD], cwd=root) for w in range(3)
    ]
    for _ in range(20):  # a reader alongside the writers
        client.query("SELECT count() FROM t.concurrent")
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    assert client.command("SELECT count() FROM t.concurrent") == 3 * 20_000
    assert client.command("SELECT uniqExact(intDiv(id, 1000000)) FROM t.concurrent") == 3


def test_server_process_stops_on_sigterm_and_keeps_its_data(tmp_path: Path) -> None:
    from pipeline.localstack import port_in_use
    from tests.conftest import _free_port

    port = _free_port()
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD)
    password_file.chmod(0o600)
    data = tmp_path / "data"
    argv = [sys.executable, "-m", "sinks.chdb_server", "--port", str(port), "--data-dir", str(data)]
    argv += ["--password-file", str(password_file)]
    root = Path(__file__).resolve().parents[2]

    def run_once(statement: str) -> object:
        proc = subprocess.Popen(argv, cwd=root)
        try:
            for _ in range(100):
                if port_in_use("127.0.0.1", port):
                    break
                proc.poll()
                assert proc.returncode is None
                import time

                time.sleep(0.1)
            return clickhouse_connect.get_client(host="127.0.0.1", port=port, password=PASSWORD).command(statement)
        finally:
            proc.terminate()
            assert proc.wait(20) == 0

    run_once("CREATE TABLE keep (x UInt8) ENGINE = MergeTree ORDER BY x AS SELECT 7")
    assert run_once("SELECT sum(x) FROM keep") == 7


def test_requests_run_side_by_side_each_with_its_own_settings_and_parameters(
    server: EmbeddedClickHouseServer,
) -> None:
    import threading
    import time

    def slow() -> None:
        _client(server).query("SELECT sleep(1)")

    started = time.perf_counter()
    threads = [threading.Thread(target=slow) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.perf_counter() - started < 1.8  # two handles: not one after the other

    wrong: list[object] = []

    def check(n: int) -> None:
        client = _client(server)
        for _ in range(30):
            got = client.query(
                "SELECT {n:UInt32}, getSetting('max_threads')", parameters={"n": n}, settings={"max_threads": n}
            ).result_rows[0]
            if (got[0], int(got[1])) != (n, n):
                wrong.append(got)

    threads = [threading.Thread(target=check, args=(n,)) for n in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
