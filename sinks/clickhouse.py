"""ClickHouse access over HTTP (a real server, or the embedded chDB server locally)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import clickhouse_connect
import orjson
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
from urllib3.exceptions import HTTPError

from pipeline.errors import StackError, TransientError
from pipeline.settings import Settings

__all__ = [
    "AVRO_EVENT_SELECT",
    "AVRO_EVENT_STRUCTURE",
    "EVENT_COLUMNS",
    "ClickHouseWriter",
    "avro_insert_query",
    "batch_token",
    "connect",
    "event_row",
    "native_statement",
]

log = logging.getLogger(__name__)

EVENT_COLUMNS: tuple[str, ...] = (
    "event_id",
    "ts",
    "source",
    "type",
    "severity",
    "user_id",
    "session_id",
    "interaction_id",
    "model_version",
    "prompt_version",
    "value",
    "confidence",
    "sample_rate",
    "text_dropped",
    "propagation_weight",
    "tags",
    "idempotency_key",
    "payload_text",
    "payload_comment",
    "corrected_response",
    "payload",
    "hash",
    "kafka_partition",
    "kafka_offset",
)


#: ``feedback_event_v1`` as ClickHouse reads it from Avro, and the SELECT list that maps it onto
#: EVENT_COLUMNS (the same row :func:`event_row` builds in Python).
AVRO_EVENT_STRUCTURE = (
    "event_id String, ts DateTime64(6, 'UTC'), source String, type String, "
    "severity Enum8('debug' = 0, 'info' = 1, 'warn' = 2, 'error' = 3, 'critical' = 4), "
    "payload Tuple(text Nullable(String), comment Nullable(String), corrected_response Nullable(String), "
    "extra Map(String, Variant(Bool, Float64, Int64, String))), user_id Nullable(String), "
    "session_id Nullable(String), interaction_id Nullable(String), model_version Nullable(String), "
    "prompt_version Nullable(String), value Nullable(Float64), confidence Nullable(Float64), tags Array(String), "
    "idempotency_key Nullable(String), client_ip Nullable(String), sample_rate Nullable(Float64), "
    "text_dropped Bool, propagation_weight Nullable(Float64), hash String"
)
AVRO_EVENT_SELECT = {
    "severity": "toString(severity)",
    "payload_text": "payload.text",
    "payload_comment": "payload.comment",
    "corrected_response": "payload.corrected_response",
    "payload": "mapApply((k, v) -> (k, if(variantType(v) = 'String', variantElement(v, 'String'), "
    "toJSONString(v))), payload.extra)",
    "kafka_partition": "{partition:UInt32}",
    "kafka_offset": "{first:UInt64} + rowNumberInAllBlocks()",
}


def native_statement(database: str, table: str = "feedback_events", columns: Sequence[str] = EVENT_COLUMNS) -> bytes:
    """The head of a Native insert's body: ``INSERT INTO ... (columns) FORMAT Native`` and a newline."""
    return f"INSERT INTO `{database}`.{table} ({', '.join(columns)}) FORMAT Native\n".encode()


def avro_insert_query(database: str, table: str = "feedback_events") -> str:
    """``INSERT INTO feedback_events SELECT ... FROM input(...) FORMAT Avro`` for the fast path."""
    select = ", ".join(AVRO_EVENT_SELECT.get(c, c) for c in EVENT_COLUMNS)
    columns = ", ".join(EVENT_COLUMNS)
    return (
        f"INSERT INTO `{database}`.{table} ({columns}) SELECT {select} "
        f"FROM input('{AVRO_EVENT_STRUCTURE.replace(chr(39), chr(92) + chr(39))}') FORMAT Avro"
    )


_PARAMETER = re.compile(r"\{(\w+):(U?Int(?:8|16|32|64))\}")


def _dedup_settings(token: str) -> dict[str, Any]:
    """A repeated insert with ``token`` is dropped, and the rollups' materialized views skip it too.

    ``optimize_on_insert = 0``: ReplacingMergeTree would otherwise collapse equal keys
    inside each inserted block, which costs a sort-and-merge pass per insert (the sink
    runs ~1.7x faster without it on the embedded store). Nothing is lost: event ids in
    one batch are unique after the gate's dedup, a repeated batch is dropped by its
    token, and merges (or FINAL) collapse any remaining repeat as before.
    """
    return {
        "insert_deduplication_token": token,
        "deduplicate_blocks_in_dependent_materialized_views": 1,
        "optimize_on_insert": 0,
    }


def batch_token(table: str, topic: str, partition: int, first: int, last: int) -> str:
    """Deterministic insert_deduplication_token for one partition's offset range."""
    return f"{table}:{topic}:{partition}:{first}-{last}"


def connect(settings: Settings, database: str | None = None) -> Client:
    """A clickhouse-connect HTTP client for ``settings.clickhouse_endpoint``.

    Raises :class:`StackError` naming the URL when ClickHouse does not answer.
    """
    try:
        return clickhouse_connect.get_client(
            dsn=settings.clickhouse_endpoint,
            username=settings.clickhouse_user,
            password=settings.clickhouse_secret(),
            database=database or "default",
            compress="lz4",
            connect_timeout=5,
            send_receive_timeout=60,
            autogenerate_session_id=False,
        )
    except (OperationalError, HTTPError) as exc:
        raise StackError(
            f"cannot reach ClickHouse at {settings.clickhouse_endpoint}: {type(exc).__name__}. "
            "Start the local stack with `feedback up`, or set FEEDBACK_CLICKHOUSE_URL."
        ) from None


def _json_value(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def event_row(record: dict[str, Any], partition: int, offset: int) -> list[Any]:
    """One ``feedback_events`` row (in :data:`EVENT_COLUMNS` order) from a decoded Avro record.

    ``client_ip`` is deliberately not stored.
    """
    payload = record["payload"]
    ts: datetime = record["ts"]
    return [
        record["event_id"],
        ts,
        record["source"],
        record["type"],
        record["severity"],
        record["user_id"],
        record["session_id"],
        record["interaction_id"],
        record["model_version"],
        record["prompt_version"],
        record["value"],
        record["confidence"],
        record["sample_rate"],
        record["text_dropped"],
        record.get("propagation_weight"),
        record["tags"],
        record["idempotency_key"],
        payload["text"],
        payload["comment"],
        payload["corrected_response"],
        {k: _json_value(v) for k, v in payload["extra"].items()},
        record["hash"],
        partition,
        offset,
    ]


class ClickHouseWriter:
    """Inserts rows into one table with a deterministic deduplication token per batch."""

    def __init__(self, client: Client, database: str, table: str, columns: Sequence[str]) -> None:
        self.client = client
        self.database = database
        self.table = table
        self.columns = list(columns)

    def insert_select(self, query: str, data: bytes, token: str, parameters: dict[str, int]) -> None:
        """Run ``INSERT ... SELECT ... FROM input(...) FORMAT X`` with ``data`` as the input,
        deduplicated by ``token`` like :meth:`insert`. ``parameters`` (``{name:Type}`` in the query)
        are integers, written into the statement as typed literals.

        The statement travels at the head of the body, as curl would send it (``raw_insert`` with no
        table): ``command(query, data=...)`` would first decode the whole body as text to decide
        whether the request may be retried (~125 ms of the sink's CPU, under the GIL, per 12 MB batch).
        """
        statement = _PARAMETER.sub(lambda m: f"CAST({int(parameters[m.group(1)])} AS {m.group(2)})", query)
        # max_threads 1: rows in input order, since the offsets are numbered by position.
        self.insert_body(b"".join((statement.encode(), b"\n", data)), token, {"max_threads": 1})

    def insert_body(self, body: bytes, token: str, settings: dict[str, Any] | None = None) -> None:
        """Send ``body``, an ``INSERT ... FORMAT X`` statement, a newline and its data, as it is,
        deduplicated by ``token`` like :meth:`insert` (:func:`native_statement` heads a Native block)."""
        try:
            self.client.raw_insert(
                None,  # type: ignore[arg-type]  # no table: the body is sent as it is
                insert_block=body,
                settings={**_dedup_settings(token), **(settings or {})},
            )
        except (OperationalError, HTTPError, ConnectionError) as exc:
            raise TransientError(f"ClickHouse unavailable: {type(exc).__name__}") from None

    def insert(self, rows: list[list[Any]], token: str) -> None:
        """Insert ``rows``; a retried insert with the same ``token`` is not applied twice.

        Raises :class:`TransientError` when ClickHouse is unreachable (retry later) and
        ``DatabaseError`` when it rejects the data.
        """
        if not rows:
            return
        try:
            self.client.insert(
                self.table,
                rows,
                column_names=self.columns,
                database=self.database,
                settings=_dedup_settings(token),
            )
        except (OperationalError, HTTPError, ConnectionError) as exc:
            raise TransientError(f"ClickHouse unavailable: {type(exc).__name__}") from None
        except DatabaseError:
            raise
