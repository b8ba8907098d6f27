"""The embedded ClickHouse server's sandbox: chDB's own access control, and a lexer for what it lacks.

chDB is clickhouse-local underneath: by default its user may read and write any file
(``file()``, ``INTO OUTFILE``, the ``default`` database's view of the file system), reach
other hosts (``url()``, ``remote()``, ``s3()``, ...) and create ``File``/``URL`` tables.
Most of that is shut with the engine's own controls, written into a config file that
every chDB handle of the process loads (:func:`write_engine_config`):

* the user ``default`` is given explicit grants without ``SOURCES`` (no ``READ``/``WRITE``
  on FILE, URL, REMOTE, S3, HDFS, MYSQL, POSTGRES, ODBC, JDBC, SQLITE, AZURE, ...), without
  ``TABLE ENGINE`` except the MergeTree family, Memory, Null, views and the like, without
  ``SYSTEM`` (but ``SYSTEM RELOAD DICTIONARY``), ``BACKUP``, ``INTROSPECTION``; dictionaries
  are allowed (``CREATE DICTIONARY``), their sources checked by the lexer below;
* the settings that name files (``format_template_row``, ``format_schema``,
  ``output_format_schema``, ...) are constrained to their defaults in the profile;
* ``user_files_path`` and ``user_scripts_path`` point at empty folders inside the data
  directory, and no custom local disk has a base directory.

What clickhouse-local does without asking the access control, :func:`check_statement` refuses
from a real tokenization of the statement (comments, quoted strings and identifiers,
heredocs, nested comments): ``INTO OUTFILE`` and ``FROM INFILE`` (client-side features a
server never runs), more than one statement per request, chDB's ``Python()`` table function,
ad-hoc ``disk(...)`` definitions (a ``web`` disk fetches URLs), ``ATTACH ... FROM 'path'``, and, as
a second line behind the grants, every table function that reaches files, URLs or other
servers. Dictionaries are allowed over this server's own tables only
(:func:`_check_dictionary`): a ``CLICKHOUSE`` source without a host or a named collection,
or ``NULL``; the queries a source holds as strings pass the same checks; no layout that keeps
a file (``SSD_CACHE``). Anything the lexer cannot read the way ClickHouse would (an unterminated string
or comment, a stray ``#``) is refused rather than guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

__all__ = [
    "GuardError",
    "Statement",
    "Token",
    "check_statement",
    "tokenize",
    "write_engine_config",
]


class GuardError(Exception):
    """A statement the sandbox refuses; ``code`` is the ClickHouse error code it answers with."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # word, number, string, quoted, heredoc, punct, space, comment
    text: str
    pos: int


_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_NUMBER = re.compile(r"(?:0[xX][0-9A-Fa-f_]+|0[bB][01_]+|[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+)")

SYNTAX_ERROR = 62
ACCESS_DENIED = 497


def _quoted_end(sql: str, start: int) -> int:
    """Index just past the quoted token opening at ``start`` (``'``, `````, ``"``): backslash
    escapes and a doubled quote both stay inside, as ClickHouse reads them."""
    quote = sql[start]
    i = start + 1
    n = len(sql)
    while i < n:
        c = sql[i]
        if c == "\\":
            i += 2
            continue
        if c == quote:
            if i + 1 < n and sql[i + 1] == quote:
                i += 2
                continue
            return i + 1
        i += 1
    raise GuardError(
        f"Code: {SYNTAX_ERROR}. DB::Exception: Syntax error: unterminated quoted token. (SYNTAX_ERROR)", 62
    )


def _comment_end(sql: str, start: int) -> int:
    """Index just past the block comment opening at ``start``. ClickHouse nests block comments
    (``/* a /* b */ c */`` is one comment), so this does too: a lexer that stopped at the first
    ``*/`` would read a quote inside the rest of the comment as the start of a string, and miss
    code that ClickHouse runs after it."""
    depth, i, n = 0, start, len(sql)
    while i < n - 1:
        pair = sql[i : i + 2]
        if pair == "/*":
            depth += 1
            i += 2
        elif pair == "*/":
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    raise GuardError("Code: 62. DB::Exception: Syntax error: unterminated comment. (SYNTAX_ERROR)", 62)


def _heredoc_end(sql: str, start: int) -> int:
    """As ClickHouse's lexer: ``$tag$ ... $tag$`` (the tag is whatever lies up to the next ``$``)
    is a heredoc when the same ``$tag$`` closes it; else 0 and the ``$`` is an ordinary character."""
    tag_end = sql.find("$", start + 1)
    if tag_end < 0:
        return 0
    tag = sql[start : tag_end + 1]
    end = sql.find(tag, tag_end + 1)
    return end + len(tag) if end >= 0 else 0


def tokenize(sql: str) -> list[Token]:
    """ClickHouse SQL as tokens. Raises :class:`GuardError` (SYNTAX_ERROR) for text it cannot
    read unambiguously: unterminated strings, identifiers or comments; a ``#`` that is not
    ``# ``/``#!`` (an error in ClickHouse too)."""
    tokens: list[Token] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c.isspace():
            m = _SPACE.match(sql, i)
            assert m is not None
            tokens.append(Token("space", m.group(), i))
            i = m.end()
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            tokens.append(Token("comment", sql[i:end], i))
            i = end
        elif sql.startswith("/*", i):
            end = _comment_end(sql, i)
            tokens.append(Token("comment", sql[i:end], i))
            i = end
        elif c == "#":
            # ClickHouse reads "# " and "#!" as comments to the end of the line, any other # as an error.
            if not sql.startswith(("# ", "#!"), i):
                raise GuardError("Code: 62. DB::Exception: Syntax error: unrecognized token '#'. (SYNTAX_ERROR)", 62)
            end = sql.find("\n", i)
            end = n if end < 0 else end
            tokens.append(Token("comment", sql[i:end], i))
            i = end
        elif c in "'`\"":
            end = _quoted_end(sql, i)
            tokens.append(Token("string" if c == "'" else "quoted", sql[i:end], i))
            i = end
        elif c == "$" and (heredoc := _heredoc_end(sql, i)):
            tokens.append(Token("heredoc", sql[i:heredoc], i))
            i = heredoc
        elif c.isascii() and (c.isalpha() or c == "_"):
            m = _WORD.match(sql, i)
            assert m is not None
            tokens.append(Token("word", m.group(), i))
            i = m.end()
        elif c.isdigit() or (c == "." and i + 1 < n and sql[i + 1].isdigit()):
            m = _NUMBER.match(sql, i)
            assert m is not None
            tokens.append(Token("number", m.group(), i))
            i = m.end()
        else:
            tokens.append(Token("punct", c, i))
            i += 1
    return tokens


def _name(token: Token) -> str:
    """A word or a quoted identifier as the lower-case name it stands for."""
    if token.kind == "quoted":
        return token.text[1:-1].replace("\\", "").lower()
    return token.text.lower()


#: Table functions that reach files, URLs, processes or other servers (refused even though the
#: grants already refuse most of them: a clearer error, and a second line of defence).
DENIED_FUNCTIONS = frozenset(
    {
        "file",
        "filecluster",
        "url",
        "urlcluster",
        "s3",
        "s3cluster",
        "gcs",
        "oss",
        "cosn",
        "hdfs",
        "hdfscluster",
        "remote",
        "remotesecure",
        "cluster",
        "clusterallreplicas",
        "mysql",
        "postgresql",
        "odbc",
        "jdbc",
        "sqlite",
        "mongodb",
        "redis",
        "executable",
        "azureblobstorage",
        "azureblobstoragecluster",
        "iceberg",
        "icebergs3",
        "icebergazure",
        "icebergcluster",
        "iceberglocal",
        "deltalake",
        "deltalakecluster",
        "deltalakelocal",
        "hudi",
        "hudicluster",
        "paimon",
        "arrowflight",
        "arrowflightcluster",
        "ytsaurus",
        "python",
        "pythondict",
        "disk",
    }
)
#: Keywords of client-side features that clickhouse-local would run inside the server process.
DENIED_KEYWORDS = frozenset({"infile", "outfile"})


@dataclass(frozen=True, slots=True)
class Statement:
    """What the server needs to know about a statement that passed :func:`check_statement`."""

    kind: str  # the first keyword, upper case: SELECT, INSERT, SET, USE, CREATE, ...
    temporary: bool  # mentions TEMPORARY (session state)


def _significant(tokens: list[Token]) -> list[Token]:
    return [t for t in tokens if t.kind not in ("space", "comment")]


def check_statement(sql: str) -> Statement:
    """Refuse what the sandbox does not allow; returns the statement's kind.

    Raises :class:`GuardError` with ClickHouse's code: SYNTAX_ERROR (62) for text that cannot
    be read unambiguously or holds several statements, ACCESS_DENIED (497) for the rest.
    """
    tokens = _significant(tokenize(sql))
    if not tokens:
        raise GuardError("Code: 62. DB::Exception: Empty query. (SYNTAX_ERROR)", 62)
    while tokens and tokens[-1].text == ";":
        tokens.pop()
    for token in tokens:
        if token.kind == "punct" and token.text == ";":
            raise GuardError("Code: 62. DB::Exception: Multi-statements are not allowed. (SYNTAX_ERROR)", 62)
    kind = ""
    for token in tokens:
        if token.kind == "word":
            kind = token.text.upper()
            break
        if token.text != "(":
            break
    for i, token in enumerate(tokens):
        if token.kind == "word" and token.text.lower() in DENIED_KEYWORDS:
            raise GuardError(
                f"Code: 497. DB::Exception: {token.text.upper()} is not allowed on this server: the server never "
                "reads or writes files a query names. (ACCESS_DENIED)",
                497,
            )
        if token.kind in ("word", "quoted") and i + 1 < len(tokens) and tokens[i + 1].text == "(":
            name = _name(token)
            if name in DENIED_FUNCTIONS and not (i > 0 and tokens[i - 1].text == "."):
                raise GuardError(
                    f"Code: 497. DB::Exception: {name}() is not allowed on this server: it reaches files, URLs, "
                    "processes or other servers. (ACCESS_DENIED)",
                    497,
                )
    if kind in ("CREATE", "ATTACH", "REPLACE") and _is_dictionary(tokens):
        _check_dictionary(tokens)
    elif kind == "ATTACH" and any(t.kind == "word" and t.text.upper() == "FROM" for t in tokens):
        raise GuardError(
            "Code: 497. DB::Exception: ATTACH ... FROM a path is not allowed on this server. (ACCESS_DENIED)", 497
        )
    temporary = any(t.kind == "word" and t.text.upper() == "TEMPORARY" for t in tokens)
    return Statement(kind, temporary)


# --- dictionaries ------------------------------------------------------------------------------

#: The keys a ``CLICKHOUSE`` dictionary source may have: a table or query of this server. No
#: ``HOST``/``PORT``/``USER``/``PASSWORD``/``SECURE`` (another server) and no ``NAME`` (a named
#: collection, which can hold one).
_SOURCE_KEYS = frozenset(
    {"table", "db", "database", "where", "query", "invalidate_query", "update_field", "update_lag"}
)
#: The source keys whose string is SQL the engine runs: checked as statements of their own.
_SOURCE_SQL = {"query": "{}", "invalidate_query": "{}", "where": "SELECT 1 WHERE ({})"}
#: Layouts that keep the dictionary in memory (``SSD_CACHE`` writes to a ``PATH`` it is given).
_LAYOUTS = frozenset(
    {
        "flat",
        "hashed",
        "sparse_hashed",
        "complex_key_hashed",
        "complex_key_sparse_hashed",
        "hashed_array",
        "complex_key_hashed_array",
        "range_hashed",
        "complex_key_range_hashed",
        "cache",
        "complex_key_cache",
        "direct",
        "complex_key_direct",
        "ip_trie",
        "polygon",
        "polygon_simple",
        "polygon_index_each",
        "polygon_index_cell",
    }
)
_STRING_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "b": "\b", "f": "\f", "a": "\a", "v": "\v", "e": "\x1b"}


def _denied(what: str) -> GuardError:
    return GuardError(f"Code: 497. DB::Exception: {what} (ACCESS_DENIED)", ACCESS_DENIED)


def _is_dictionary(tokens: list[Token]) -> bool:
    """``CREATE [OR REPLACE] DICTIONARY``, ``ATTACH DICTIONARY``, ``REPLACE DICTIONARY``."""
    for token in tokens[:5]:
        if token.kind == "word" and token.text.upper() == "DICTIONARY":
            return True
        if token.text == "(":
            return False
    return False


def _unquote(text: str) -> str:
    """A string literal's value, as ClickHouse reads it (backslash escapes, a doubled quote)."""
    out: list[str] = []
    i, body = 0, text[1:-1]
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt == "x":
                digits = body[i + 2 : i + 4]
                if len(digits) != 2 or any(c not in "0123456789abcdefABCDEF" for c in digits):
                    raise GuardError(
                        "Code: 62. DB::Exception: Syntax error: a \\x escape needs two hex digits. (SYNTAX_ERROR)",
                        SYNTAX_ERROR,
                    )
                out.append(chr(int(digits, 16)))
                i += 4
                continue
            out.append(_STRING_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        if c == "'" and i + 1 < len(body) and body[i + 1] == "'":
            out.append("'")
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _parenthesized(tokens: list[Token], open_at: int) -> int:
    """The index of the ``)`` closing the ``(`` at ``open_at``."""
    depth = 0
    for i in range(open_at, len(tokens)):
        if tokens[i].text == "(":
            depth += 1
        elif tokens[i].text == ")":
            depth -= 1
            if depth == 0:
                return i
    raise GuardError("Code: 62. DB::Exception: Syntax error: unbalanced parentheses. (SYNTAX_ERROR)", SYNTAX_ERROR)


def _clause(tokens: list[Token], keyword: str) -> list[tuple[int, int]]:
    """``(open, close)`` of each ``KEYWORD(...)`` clause at the statement's top level."""
    found: list[tuple[int, int]] = []
    depth = 0
    for i, token in enumerate(tokens):
        if token.text == "(":
            depth += 1
        elif token.text == ")":
            depth -= 1
        elif (
            depth <= 1
            and token.kind == "word"
            and token.text.upper() == keyword
            and i + 1 < len(tokens)
            and tokens[i + 1].text == "("
        ):
            found.append((i + 1, _parenthesized(tokens, i + 1)))
    return found


def _check_dictionary(tokens: list[Token]) -> None:
    """A dictionary over this server's own tables, or none at all: refuse every other source,
    a source's SQL that would be refused as a statement, and a layout that keeps a file."""
    sources = _clause(tokens, "SOURCE")
    if len(sources) != 1:
        raise _denied("a dictionary needs exactly one SOURCE(...) clause on this server.")
    open_at, close_at = sources[0]
    inner = tokens[open_at + 1 : close_at]
    if len(inner) < 3 or inner[0].kind != "word" or inner[1].text != "(" or inner[-1].text != ")":
        raise _denied("a dictionary's SOURCE must be CLICKHOUSE(...) or NULL() on this server.")
    source = inner[0].text.lower()
    if _parenthesized(inner, 1) != len(inner) - 1:
        raise _denied("a dictionary's SOURCE must be CLICKHOUSE(...) or NULL() on this server.")
    args = inner[2:-1]
    if source == "null":
        if args:
            raise _denied("a NULL() dictionary source takes no arguments.")
    elif source == "clickhouse":
        i = 0
        while i < len(args):
            key = args[i]
            if key.kind != "word" or i + 1 >= len(args) or args[i + 1].kind not in ("string", "number", "word"):
                raise _denied("a CLICKHOUSE dictionary source takes KEY 'value' pairs on this server.")
            name = key.text.lower()
            if name not in _SOURCE_KEYS:
                raise _denied(
                    f"a dictionary source may not set {key.text.upper()} on this server: it reads this "
                    "server's own tables only (no other host, port, user or named collection)."
                )
            value = args[i + 1]
            if name in _SOURCE_SQL and value.kind == "string":
                check_statement(_SOURCE_SQL[name].format(_unquote(value.text)))
            i += 2
    else:
        raise _denied(
            f"a dictionary source {inner[0].text.upper()}() is not allowed on this server: it reaches files, "
            "URLs, processes or other servers (use CLICKHOUSE over a table here, or NULL)."
        )
    if _clause(tokens, "SETTINGS"):
        raise _denied("a dictionary's SETTINGS(...) clause is not allowed on this server.")
    for open_at, close_at in _clause(tokens, "LAYOUT"):
        layout = tokens[open_at + 1] if open_at + 1 < close_at else None
        if layout is None or layout.kind != "word" or layout.text.lower() not in _LAYOUTS:
            raise _denied("this dictionary LAYOUT is not allowed on this server: it keeps a file (SSD_CACHE).")


# --- the engine's own controls ---------------------------------------------------------------

#: Privileges of the user ``default``: everything a project client or an analyst needs on
#: tables, nothing that reaches outside the data directory (no SOURCES, no SYSTEM, no BACKUP).
_GRANTS = (
    "SHOW, SELECT, INSERT, ALTER, CREATE DATABASE, CREATE TABLE, CREATE VIEW, CREATE TEMPORARY TABLE, "
    "CREATE FUNCTION, DROP DATABASE, DROP TABLE, DROP VIEW, DROP FUNCTION, UNDROP TABLE, TRUNCATE, OPTIMIZE, "
    "KILL QUERY, dictGet, CHECK, CREATE DICTIONARY, DROP DICTIONARY, SYSTEM RELOAD DICTIONARY ON *.*"
)
#: Table engines a client may create: data stays in the data directory.
ALLOWED_ENGINES = (
    "MergeTree",
    "ReplacingMergeTree",
    "SummingMergeTree",
    "AggregatingMergeTree",
    "CollapsingMergeTree",
    "VersionedCollapsingMergeTree",
    "CoalescingMergeTree",
    "GraphiteMergeTree",
    "Memory",
    "Null",
    "Log",
    "TinyLog",
    "StripeLog",
    "Set",
    "Join",
    "Buffer",
    "Merge",
    "View",
    "MaterializedView",
    "GenerateRandom",
    "Atomic",
    "Alias",
)
#: Query settings that name files (read or written by a format) or reach URLs: fixed at their defaults.
CONSTRAINED_SETTINGS = (
    "format_template_row",
    "format_template_resultset",
    "format_schema",
    "format_schema_source",
    "output_format_schema",
    "input_format_record_errors_file_path",
    "format_avro_schema_registry_url",
    "rename_files_after_processing",
    "dynamic_disk_allow_from_env",
    "dynamic_disk_allow_include",
    "dynamic_disk_allow_from_zk",
    "into_outfile_create_parent_directories",
    "url_base",
    "filesystem_cache_name",
)


def write_engine_config(config_dir: Path, data_dir: Path) -> Path:
    """Write the chDB config and users files into ``config_dir``; returns the config file's path."""
    config_dir.mkdir(parents=True, exist_ok=True)
    user_files = data_dir / "user_files"
    user_scripts = data_dir / "user_scripts"
    for folder in (user_files, user_scripts):
        folder.mkdir(parents=True, exist_ok=True)
    grants = [_GRANTS, *(f"TABLE ENGINE ON {engine}" for engine in dict.fromkeys(ALLOWED_ENGINES))]
    constraints = "".join(f"<{name}><const/></{name}>" for name in CONSTRAINED_SETTINGS)
    users = config_dir / "users.xml"
    users.write_text(
        "<clickhouse>\n  <users>\n    <default>\n      <password></password>\n"
        "      <profile>default</profile>\n      <quota>default</quota>\n      <grants>\n"
        + "".join(f"        <query>GRANT {escape(g)}</query>\n" for g in grants)
        + "      </grants>\n    </default>\n  </users>\n"
        f"  <profiles><default><constraints>{constraints}</constraints></default></profiles>\n"
        "  <quotas><default></default></quotas>\n</clickhouse>\n"
    )
    config = config_dir / "config.xml"
    config.write_text(
        "<clickhouse>\n"
        f"  <user_files_path>{escape(str(user_files))}/</user_files_path>\n"
        f"  <user_scripts_path>{escape(str(user_scripts))}/</user_scripts_path>\n"
        f"  <users_config>{escape(str(users))}</users_config>\n"
        "</clickhouse>\n"
    )
    return config
