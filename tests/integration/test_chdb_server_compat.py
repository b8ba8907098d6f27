"""The embedded ClickHouse server's compatibility with ClickHouse: streamed results, errors in
the middle of a stream, and column time zones for clients that negotiate a protocol version.

Each test runs the real server (chDB) and talks to it with clickhouse-connect or plain HTTP."""

from __future__ import annotations

import base64
import datetime
import http.client
import urllib.parse
from collections.abc import Iterator

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError, StreamFailureError

from sinks.chdb_server import EmbeddedClickHouseServer

pytestmark = pytest.mark.integration

PASSWORD = "compat-password-1"
FAILS_AT_ROW_100 = "SELECT sleepEachRow(0.001), throwIf(number = 100) FROM numbers(200)"
ONE_ROW_BLOCKS = {"max_block_size": 1, "wait_end_of_query": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedClickHouseServer]:
    with EmbeddedClickHouseServer("127.0.0.1", 0, tmp_path_factory.mktemp("chdb"), password=PASSWORD) as srv:
        yield srv


def _client(server: EmbeddedClickHouseServer) -> Client:
    return clickhouse_connect.get_client(host="127.0.0.1", port=server.port, password=PASSWORD)


def _post(server: EmbeddedClickHouseServer, query: str, **args: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    auth = base64.b64encode(f"default:{PASSWORD}".encode()).decode()
    conn.request("POST", "/?" + urllib.parse.urlencode(args), body=query, headers={"Authorization": f"Basic {auth}"})
    return conn.getresponse()


def test_a_large_result_is_streamed_in_chunks_and_a_small_one_sent_whole(server: EmbeddedClickHouseServer) -> None:
    big = _post(server, "SELECT number FROM numbers(1000000) FORMAT TSV")
    assert big.status == 200
    assert big.getheader("Transfer-Encoding") == "chunked"
    assert big.getheader("Content-Length") is None
    assert big.getheader("X-ClickHouse-Exception-Tag")
    lines = big.read().splitlines()
    assert len(lines) == 1_000_000 and lines[-1] == b"999999"

    small = _post(server, "SELECT number FROM numbers(10) FORMAT TSV")
    assert small.getheader("Transfer-Encoding") is None
    assert small.getheader("Content-Length") == str(len(small.read()))


def test_wait_end_of_query_buffers_even_a_large_result(server: EmbeddedClickHouseServer) -> None:
    response = _post(server, "SELECT number FROM numbers(1000000) FORMAT TSV", wait_end_of_query="1")
    assert response.getheader("Transfer-Encoding") is None
    assert len(response.read().splitlines()) == 1_000_000


def test_clickhouse_connect_reads_a_streamed_result_block_by_block(server: EmbeddedClickHouseServer) -> None:
    client = _client(server)
    total, rows = 0, 0
    with client.query_row_block_stream("SELECT number, toString(number) FROM numbers(2000000)") as stream:
        for block in stream:
            rows += len(block)
            total += sum(row[0] for row in block)
    assert (rows, total) == (2_000_000, sum(range(2_000_000)))


@pytest.mark.parametrize("streaming", [False, True], ids=["query", "rows_stream"])
def test_an_error_mid_stream_is_a_stream_failure_with_clickhouses_message(
    server: EmbeddedClickHouseServer, streaming: bool
) -> None:
    client = _client(server)
    with pytest.raises(StreamFailureError, match="Value passed to 'throwIf' function is non-zero"):
        if streaming:
            with client.query_rows_stream(FAILS_AT_ROW_100, settings=ONE_ROW_BLOCKS) as stream:
                for _ in stream:
                    pass
        else:
            _ = client.query(FAILS_AT_ROW_100, settings=ONE_ROW_BLOCKS).result_set
    assert client.command("SELECT 1") == 1


def test_the_exception_block_is_clickhouses_and_carries_the_tag(server: EmbeddedClickHouseServer) -> None:
    response = _post(server, FAILS_AT_ROW_100 + " FORMAT TSV", max_block_size="1")
    tag = response.getheader("X-ClickHouse-Exception-Tag")
    body = response.read()
    assert response.status == 200 and tag
    rows, _, block = body.partition(b"__exception__\r\n")
    assert rows.splitlines() == [b"0\t0"] * 100  # every row before the failing one, then the error
    assert block.startswith(tag.encode() + b"\r\nCode: 395.")
    assert block.endswith(b" " + tag.encode() + b"\r\n__exception__\r\n")


def test_an_error_before_the_first_row_is_an_ordinary_error(server: EmbeddedClickHouseServer) -> None:
    response = _post(server, "SELECT throwIf(number = 0) FROM numbers(10) FORMAT TSV")
    assert response.status == 500
    assert response.getheader("X-ClickHouse-Exception-Code") == "395"
    with pytest.raises(DatabaseError, match="SYNTAX_ERROR"):
        _client(server).query("SELEKT number FROM numbers(10)")


def test_streams_the_client_abandons_give_their_handles_back(server: EmbeddedClickHouseServer) -> None:
    for _ in range(6):  # more than the server's 4 handles: a leaked one would block a later request
        response = _post(server, "SELECT number FROM numbers(100000000) FORMAT TSV")
        assert response.status == 200
        response.read(1000)
        response.close()
    assert _client(server).command("SELECT 1") == 1
    for _ in range(6):
        assert _client(server).query("SELECT count() FROM numbers(1000)").result_rows == [(1000,)]


def test_an_empty_result_keeps_its_format(server: EmbeddedClickHouseServer) -> None:
    response = _post(server, "SELECT number FROM numbers(0) FORMAT JSONCompact")
    assert b'"meta"' in response.read()
    assert _client(server).query("SELECT number FROM numbers(0)").result_rows == []


SHANGHAI = "SELECT toDateTime(1676369730, 'Asia/Shanghai') AS dt FORMAT Native"


def test_native_at_revision_0_is_chdbs_own_and_above_it_has_block_info_and_zones(
    server: EmbeddedClickHouseServer,
) -> None:
    assert _post(server, SHANGHAI).read().hex() == "0101026474084461746554696d65425feb63"
    body = _post(server, SHANGHAI, client_protocol_version="54337").read()
    block_info = bytes.fromhex("010002ffffffff00")
    zone_type = b"DateTime('Asia/Shanghai')"
    assert body == block_info + b"\x01\x01\x02dt" + bytes([len(zone_type)]) + zone_type + bytes.fromhex("425feb63")
    # between revision 1 and 54336 ClickHouse sends BlockInfo but still hides the zone
    old = _post(server, SHANGHAI, client_protocol_version="54336").read()
    assert old == block_info + bytes.fromhex("0101026474084461746554696d65425feb63")


def test_clickhouse_connect_negotiates_the_protocol_and_keeps_column_zones(server: EmbeddedClickHouseServer) -> None:
    client = _client(server)
    assert client.protocol_version == 54405
    row = client.query(
        "SELECT toDateTime('2022-10-25 10:55:22', 'America/Chicago') AS chicago, toDateTime('2023-07-05 15:10:40') AS"
        " plain, toNullable(toDateTime(0, 'Asia/Tokyo')) AS nullable, [toDateTime(0, 'Asia/Tokyo')] AS arr,"
        " toDateTime64(0, 3, 'Asia/Tokyo') AS dt64"
    ).first_row
    assert [str(v.tzinfo) if v is not None and not isinstance(v, list) else None for v in row] == [
        "America/Chicago", "None", "Asia/Tokyo", None, "Asia/Tokyo"
    ]  # fmt: skip
    assert str(row[3][0].tzinfo) == "Asia/Tokyo"
    assert row[0].hour == 10  # the wall time in the column's own zone


def test_a_streamed_result_keeps_its_zone_in_every_block(server: EmbeddedClickHouseServer) -> None:
    client = _client(server)
    zones: set[str] = set()
    rows = 0
    with client.query_row_block_stream("SELECT number, toDateTime(number, 'Asia/Tokyo') FROM numbers(1500000)") as st:
        for block in st:
            rows += len(block)
            zones.update(str(row[1].tzinfo) for row in (block[0], block[-1]))
    assert (rows, zones) == (1_500_000, {"Asia/Tokyo"})


def test_every_kind_of_result_reads_at_the_negotiated_protocol(server: EmbeddedClickHouseServer) -> None:
    client = _client(server)
    client.command(
        "CREATE TABLE IF NOT EXISTS default.kinds (id UInt64, lc LowCardinality(String), nl LowCardinality(Nullable("
        "String)), m Map(String, UInt8), t Tuple(a UInt8, b String), n Nullable(Float64), d Decimal(20, 4),"
        " at DateTime('Europe/Berlin')) ENGINE = MergeTree ORDER BY id"
    )
    client.command(
        "INSERT INTO default.kinds SELECT number, toString(number % 3), if(number % 2, NULL, 'x'), map('k', 1),"
        " (1, 'b'), if(number % 5, number / 2, NULL), number, toDateTime(number) FROM numbers(20000)"
    )
    rows = client.query("SELECT * FROM default.kinds ORDER BY id").result_rows
    assert len(rows) == 20_000
    assert rows[3][:7] == (3, "0", None, {"k": 1}, {"a": 1, "b": "b"}, 1.5, 3)
    assert str(rows[3][7].tzinfo) == "Europe/Berlin"
    assert client.query("SELECT lc FROM default.kinds WHERE id = {id:UInt64}", parameters={"id": 7}).result_rows == [
        ("1",)
    ]
    assert ("kinds",) in client.query("SHOW TABLES FROM default").result_rows
    described = client.query("DESCRIBE TABLE default.kinds").result_rows
    assert [r[1] for r in described][-1] == "DateTime('Europe/Berlin')"
    assert client.query("EXISTS TABLE default.kinds").result_rows == [(1,)]


def test_show_create_of_a_system_table_is_built_from_its_columns(server: EmbeddedClickHouseServer) -> None:
    client = _client(server)
    result = client.query("SHOW CREATE TABLE system.one")
    assert result.column_names == ("statement",)
    assert result.result_rows[0][0].startswith("CREATE TABLE system.one\n(\n    `dummy` UInt8\n)\nENGINE = SystemOne")
    tables = client.command("SHOW CREATE TABLE system.tables")
    assert "`database` String" in str(tables) and "ENGINE = SystemTables" in str(tables)
    with pytest.raises(DatabaseError, match="UNKNOWN_TABLE"):
        client.query("SHOW CREATE TABLE system.no_such_table")
    client.command("CREATE TABLE IF NOT EXISTS default.shown (x UInt8) ENGINE = MergeTree ORDER BY x")
    assert "CREATE TABLE default.shown" in client.command("SHOW CREATE TABLE default.shown")


def test_a_dynamic_columns_shared_variant_is_sent_as_a_server_sends_it(server: EmbeddedClickHouseServer) -> None:
    """``Dynamic(max_types=0)`` keeps every value in its shared variant: each one its binary type
    code and its RowBinary value (a Date is ``0x0f`` and its day number, a String ``0x15`` and
    its length-prefixed bytes), exactly the bytes of a server at the client's revision."""
    client = _client(server)
    client.command("CREATE TABLE IF NOT EXISTS default.shared (id UInt8, d Dynamic(max_types=0)) ENGINE = MergeTree ORDER BY id")
    client.command("INSERT INTO default.shared SELECT 1, toDate('2024-01-02')")
    client.command("INSERT INTO default.shared SELECT 2, 'hello'")
    body = _post(server, "SELECT d FROM default.shared ORDER BY id FORMAT Native", client_protocol_version="54405").read()
    assert body.startswith(bytes.fromhex("010002ffffffff00"))  # BlockInfo at this revision
    assert b"\x14Dynamic(max_types=0)" in body
    assert b"\x0f\x0cM" in body  # Date 2024-01-02 = day 19724 = 0x4d0c, in the shared variant
    assert b"\x15\x05hello" in body
    # and clickhouse-connect decodes both from the shared variant
    assert [r[0] for r in client.query("SELECT d FROM default.shared ORDER BY id").result_rows] == [
        datetime.date(2024, 1, 2), "hello"
    ]  # fmt: skip
