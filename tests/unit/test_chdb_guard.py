"""The embedded ClickHouse server's statement guard: what the lexer refuses, and what it lets through."""

from __future__ import annotations

from pathlib import Path

import pytest

from sinks.chdb_guard import GuardError, check_statement, tokenize, write_engine_config
from sinks.migrations import MIGRATIONS

# Each must be refused by the lexer itself (the engine's grants refuse more: see the integration corpus).
REFUSED = [
    "SELECT 1 INTO OUTFILE '/tmp/x'",
    "select 1 into outfile '/tmp/x' format TSV",
    "SELECT 1 INTO/**/OUTFILE '/tmp/x'",
    "SELECT 1 INTO\n\tOUTFILE\n'/tmp/x'",
    "INSERT INTO t FROM INFILE '/etc/passwd' FORMAT RawBLOB",
    "INSERT INTO t FROM infile '/etc/passwd'",
    "SELECT 1; SELECT 2",
    "SELECT 1;SET max_threads = 1",
    "SELECT 1 ; -- a comment\n DROP DATABASE x",
    "SELECT * FROM file('/proc/self/environ', 'RawBLOB')",
    "SELECT * FROM FILE ('/etc/passwd')",
    "SELECT * FROM fIlE/**/('/etc/passwd')",
    "SELECT * FROM `file`('/etc/passwd')",
    "SELECT * FROM \"file\"('/etc/passwd')",
    "SELECT * FROM (SELECT * FROM (SELECT * FROM file('/etc/passwd')))",
    "SELECT (SELECT count() FROM url('http://example.com', RawBLOB))",
    "CREATE VIEW v AS SELECT * FROM file('/etc/passwd', 'RawBLOB')",
    "INSERT INTO FUNCTION file('/tmp/x', 'TSV') SELECT 1",
    "SELECT * FROM remote('127.0.0.1', system.one)",
    "SELECT * FROM remoteSecure('127.0.0.1', system.one)",
    "SELECT * FROM s3('http://127.0.0.1/b/k', 'RawBLOB')",
    "SELECT * FROM mysql('h:3306', 'db', 't', 'u', 'p')",
    "SELECT * FROM postgresql('h:5432', 'db', 't', 'u', 'p')",
    "SELECT * FROM executable('cat', 'TSV', 'x String')",
    "SELECT * FROM Python(os)",
    "SELECT * FROM cluster('c', system.one)",
    "SELECT * FROM azureBlobStorage('http://h', 'c', 'b')",
    "SELECT * FROM hdfs('hdfs://h/x', 'RawBLOB')",
    "SELECT * FROM odbc('dsn', 't')",
    "SELECT * FROM jdbc('dsn', 't')",
    "SELECT * FROM sqlite('/tmp/x.db', 't')",
    "CREATE TABLE t (a String) ENGINE = MergeTree ORDER BY a SETTINGS disk = disk(type = 'web', endpoint = 'http://h/')",
    "ATTACH TABLE t FROM '/etc/' (a String) ENGINE = MergeTree ORDER BY a",
    "SELECT 1 /* unterminated",
    "SELECT '/* unterminated string",
    "SELECT `unterminated identifier",
    "/* /* */ ' */ SELECT * FROM file('/etc/passwd') -- '",  # comments nest in ClickHouse: the quote is comment
    "SELECT 1 # c\n, * FROM file('/etc/passwd')",
    "SELECT 1 #x",
    "SELECT 1 /* a /* b */",  # still open: comments nest
    "SELECT $$ not a heredoc, file('/etc/passwd')",
    # dictionaries: only this server's own tables, whatever the spelling
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(CLICKHOUSE(HOST '10.0.0.1' PORT 9000 TABLE 't')) "
    "LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(clickhouse(host 'localhost' table 't')) LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(CLICKHOUSE(TABLE 't' /* x */ USER 'u' PASSWORD 'p')) "
    "LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(CLICKHOUSE(NAME my_collection)) LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(CLICKHOUSE(TABLE 't' SECURE 1)) LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(FILE(PATH '/etc/passwd' FORMAT 'TSV')) LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(HTTP(URL 'http://h/x' FORMAT 'TSV')) LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(EXECUTABLE(COMMAND 'cat /etc/passwd' FORMAT 'TSV')) "
    "LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(YAMLRegExpTree(PATH '/etc/x.yaml')) LAYOUT(REGEXP_TREE) LIFETIME(0)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(`ClickHouse`(HOST 'h' TABLE 't')) LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(CLICKHOUSE(QUERY 'SELECT * FROM file(\\'/etc/passwd\\')')) "
    "LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(CLICKHOUSE(QUERY 'SELECT * FROM fi\\x6ce(''/etc/passwd'')')) "
    "LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(CLICKHOUSE(QUERY 'SELECT 1 \\x4')) LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(CLICKHOUSE(TABLE 't' WHERE 'id IN (SELECT 1 FROM "
    "url(''http://h/''))')) LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(CLICKHOUSE(TABLE 't' INVALIDATE_QUERY "
    "'SELECT 1 FROM remote(''h'', system.one)')) LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(CLICKHOUSE(TABLE 't')) SOURCE(FILE(PATH '/x')) "
    "LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(CLICKHOUSE(TABLE 't')) "
    "LAYOUT(SSD_CACHE(PATH '/var/lib/x' BLOCK_SIZE 4096)) LIFETIME(0)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(CLICKHOUSE(TABLE 't')) LAYOUT(FLAT()) LIFETIME(0) "
    "SETTINGS(format_csv_allow_single_quotes = 0)",
    "ATTACH DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(CLICKHOUSE(HOST 'h' TABLE 't')) LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE OR REPLACE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(MYSQL(HOST 'h' TABLE 't')) LAYOUT(FLAT()) LIFETIME(0)",
    "",
    "   -- only a comment",
]

# Legit statements: the lexer must let them through unchanged.
ALLOWED = [
    "SELECT 1",
    "SELECT 1;",
    "SELECT 'file(' AS s, \"into outfile\" AS q, `url(` FROM system.one",
    "SELECT 'a\\'; SELECT 2' AS s",
    "SELECT 'a'';SELECT 2' AS s",
    "SELECT $$ ; INTO OUTFILE file() $$ AS s",
    "SELECT 1 -- ; INTO OUTFILE\n",
    "SELECT 1 /* ; file() */",
    "SELECT t.file(1) FROM t",  # a dotted name is not the table function
    "SELECT profile_file, url_path FROM t WHERE file_name = 'x'",
    "SELECT * FROM input('a String')",
    "INSERT INTO t (a) SELECT a FROM input('a String') FORMAT Avro",
    "SET max_threads = 1",
    "SELECT {id:UInt64} AS x",
    "SELECT 0x1F, 1e5, .5, 1_000",
    "SELECT 'ünïcödé' AS s",
    "SELECT 1 /* a /* b */ , file() */",
    "SELECT 1 # a MySQL comment, file()\n",
    "SELECT 1 #! shebang-style comment\n",
    "SELECT $tag$ file('x') $tag$, $ab$$ab$ AS s",
    "SELECT a$b, $1 FROM t",
    "CREATE DICTIONARY db.d (`id` UInt32, `value` String) PRIMARY KEY id SOURCE(CLICKHOUSE(TABLE 'system.one')) "
    "LAYOUT(FLAT()) LIFETIME(MIN 0 MAX 10)",
    "CREATE DICTIONARY IF NOT EXISTS d (id UInt64, v String DEFAULT '') PRIMARY KEY id "
    "SOURCE(CLICKHOUSE(DB 'db' TABLE 'src' WHERE 'id > 3' UPDATE_FIELD 'ts' UPDATE_LAG 15)) "
    "LAYOUT(HASHED()) LIFETIME(300)",
    "CREATE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(CLICKHOUSE(QUERY 'SELECT id FROM db.src')) "
    "LAYOUT(COMPLEX_KEY_HASHED()) LIFETIME(0)",
    "CREATE OR REPLACE DICTIONARY d (id UInt64) PRIMARY KEY id SOURCE(NULL()) LAYOUT(CACHE(SIZE_IN_CELLS 10)) LIFETIME(0)",
    "DROP DICTIONARY IF EXISTS d",
    "SYSTEM RELOAD DICTIONARY d",
]


@pytest.mark.parametrize("sql", REFUSED)
def test_the_guard_refuses_each_bypass_attempt(sql: str) -> None:
    with pytest.raises(GuardError) as info:
        check_statement(sql)
    assert info.value.code in (62, 497)
    assert str(info.value).startswith(f"Code: {info.value.code}. DB::Exception: ")


@pytest.mark.parametrize("sql", ALLOWED)
def test_the_guard_lets_legit_statements_through(sql: str) -> None:
    check_statement(sql)


def test_every_migration_passes_the_guard() -> None:
    from sinks.migrations import _render

    statements = [_render(s, "feedback") for m in MIGRATIONS for s in m.statements]
    assert len(statements) > 5
    for statement in statements:
        check_statement(statement)


def test_statement_kind_and_temporary_flag() -> None:
    assert check_statement("  (SELECT 1)").kind == "SELECT"
    assert check_statement("set max_threads = 1").kind == "SET"
    assert check_statement("CREATE TEMPORARY TABLE x (a UInt8)").temporary
    assert not check_statement("CREATE TABLE x (a UInt8) ENGINE = Memory").temporary


def test_tokens_cover_the_text_exactly() -> None:
    sql = "SELECT 'a''b', `c`, $t$x$t$, 1.5 /* c */ -- d\n FROM t"
    assert "".join(t.text for t in tokenize(sql)) == sql


def test_engine_config_grants_no_sources_and_pins_file_settings(tmp_path: Path) -> None:
    config = write_engine_config(tmp_path / "cfg", tmp_path / "data")
    users = (tmp_path / "cfg" / "users.xml").read_text()
    assert "SOURCES" not in users and "READ ON" not in users
    assert users.count("SYSTEM") == 1 and "SYSTEM RELOAD DICTIONARY ON" in users  # no other SYSTEM privilege
    assert "TABLE ENGINE ON File" not in users and "TABLE ENGINE ON URL" not in users
    assert "<format_template_row><const/></format_template_row>" in users
    assert f"<user_files_path>{tmp_path / 'data' / 'user_files'}/</user_files_path>" in config.read_text()
