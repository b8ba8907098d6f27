"""The sinks: clean events to ClickHouse and JSONL, rejections and dead letters to ClickHouse."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import UTC, datetime
from typing import Any

import orjson
from clickhouse_connect.driver.exceptions import DatabaseError
from confluent_kafka import Message, Producer, TopicPartition

from pipeline.errors import PoisonEvent, TransientError
from pipeline.settings import Settings
from schemas.dead_letter import dead_letter
from schemas.serde import SINGLE_OBJECT_MAGIC, AvroSerde, schema_text
from schemas.topics import Topics
from sinks.avro_ocf import container
from sinks.batching import BatchingSink, by_partition
from sinks.clickhouse import (
    EVENT_COLUMNS,
    ClickHouseWriter,
    avro_insert_query,
    batch_token,
    connect,
    event_row,
    native_statement,
)
from sinks.jsonl import JsonlWriter, apply_erasure_requests
from sinks.migrations import migrate
from sinks.native import NativeEncoder, event_plan

__all__ = [
    "INSERT_CHUNK_ROWS",
    "REJECTED_COLUMNS",
    "DeadLetterSink",
    "EventSink",
    "JsonlSink",
    "RejectedSink",
    "all_sinks",
    "batch_token",
    "insert_chunks",
    "rejected_row",
]

log = logging.getLogger(__name__)

ERASURE_POLL_S = 0.5  # how often the JSONL sink looks for erasure requests (one folder listing)
_ERASURE_BACKOFF_MAX_S = 60.0


REJECTED_COLUMNS: tuple[str, ...] = (
    "event_id",
    "source",
    "type",
    "ts",
    "hash",
    "reason",
    "field",
    "rule",
    "topic",
    "partition",
    "offset",
    "rejected_at",
)

# DateTime64's range in ClickHouse; a refused event's ts may lie outside it (that may be why it was refused).
_CH_MIN_TS = datetime(1900, 1, 1, tzinfo=UTC)
_CH_MAX_TS = datetime(2299, 12, 31, 23, 59, 59, tzinfo=UTC)


def rejected_row(record: dict[str, Any]) -> list[Any]:
    """One ``rejected_events`` row (in :data:`REJECTED_COLUMNS` order) from a decoded ``rejected_v1`` record.

    ``topic``/``partition``/``offset`` are the refused raw message's coordinates (the table's
    key), not the rejected topic's. A ``ts`` ClickHouse cannot represent is stored as NULL.
    """
    ts: datetime | None = record["ts"]
    if ts is not None and not _CH_MIN_TS <= ts <= _CH_MAX_TS:
        ts = None
    return [
        record["event_id"],
        record["source"],
        record["type"],
        ts,
        record["hash"],
        record["reason"],
        record["field"],
        record["rule"],
        record["topic"],
        record["partition"],
        record["offset"],
        record["rejected_at"],
    ]


#: ClickHouse error codes that mean "this data is refused" (the same rows are refused every time):
#: those rows are isolated and dead-lettered. Any other error (memory, too many parts, read-only,
#: timeouts, a missing table, 5xx of any kind) is a :class:`TransientError`: retried, never bisected,
#: since bisecting on a passing failure would insert the halves under tokens a retry does not use.
REFUSED_CODES: frozenset[int] = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        25,  # CANNOT_PARSE_ESCAPE_SEQUENCE
        26,  # CANNOT_PARSE_QUOTED_STRING
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        32,  # ATTEMPT_TO_READ_AFTER_EOF
        33,  # CANNOT_READ_ALL_DATA
        36,  # BAD_ARGUMENTS
        38,  # CANNOT_PARSE_DATE
        41,  # CANNOT_PARSE_DATETIME
        53,  # TYPE_MISMATCH
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        72,  # CANNOT_PARSE_NUMBER
        117,  # INCORRECT_DATA
        131,  # TOO_LARGE_STRING_SIZE
        190,  # SIZES_OF_ARRAYS_DONT_MATCH
        321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
        407,  # DECIMAL_OVERFLOW
        469,  # VIOLATED_CONSTRAINT
    }
)


def _error_code(exc: Exception) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    match = re.search(r"[Cc]ode: (\d+)", str(exc))
    return int(match.group(1)) if match else None


def _error_name(exc: Exception) -> str:
    name = getattr(exc, "name", None)
    if isinstance(name, str) and name:
        return name
    match = re.search(r"\(([A-Z][A-Z0-9_]+)\)", str(exc))
    return match.group(1) if match else "?"


def refused(exc: Exception) -> bool:
    """True if ClickHouse refused the data itself (a 4xx, or a data error code); False for a
    failure of the server (5xx without a data code: retry later)."""
    code = _error_code(exc)
    if code is not None:
        return code in REFUSED_CODES
    return bool(re.search(r"HTTP status 4\d\d", str(exc)))


class _DeadLetters:
    """Sends undecodable messages to the DLQ topic (stage ``sink``); mixed into sinks."""

    dead_lettered: int

    def _init_dead_letters(self, settings: Settings, topics: Topics) -> None:
        self.dlq_serde = AvroSerde("dead_letter_v1")
        self.dlq_topic = topics.dlq
        self._dlq = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True, "acks": "all"})
        self.dead_lettered = 0
        self._dead_letter_lock = threading.Lock()

    def _dead_letter(self, msg: Message, reason: str) -> None:
        # Coordinates and reason only: the bytes go to the DLQ topic, never to the log.
        log.warning(
            "sink_undecodable sink=%s partition=%d offset=%d reason=%s",
            getattr(self, "name", "sink"),
            msg.partition(),
            msg.offset(),
            reason,
        )
        record = dead_letter(
            stage="sink",
            error=reason,
            topic=msg.topic(),
            partition=msg.partition(),
            offset=msg.offset(),
            key=msg.key(),
            raw=msg.value(),
            now=datetime.now(UTC),
        )
        self._dlq.produce(self.dlq_topic, value=self.dlq_serde.encode(record), key=msg.key())
        with self._dead_letter_lock:
            self.dead_lettered += 1

    def _flush_dead_letters(self) -> None:
        if self._dlq.flush(30) > 0:
            raise TransientError("dead letters not acknowledged by Kafka")


#: A partition's range in a batch is inserted in chunks of at most this many rows, side by side
#: (:func:`insert_chunks`). A constant, not a setting: a replayed batch must be cut the same way to
#: get the same deduplication tokens.
INSERT_CHUNK_ROWS = 25_000
INSERT_THREADS = 2


def insert_chunks(msgs: Sequence[Message], token: str) -> list[tuple[Sequence[Message], str]]:
    """A partition's range cut into ``ceil(n / INSERT_CHUNK_ROWS)`` near-equal runs, each with its
    own token (``<token>#<i>``; a range of one chunk keeps ``token`` as it is). The cut depends
    only on the range, so a replay rebuilds the same chunks and tokens."""
    n = len(msgs)
    k = -(-n // INSERT_CHUNK_ROWS)
    if k <= 1:
        return [(msgs, token)]
    bounds = [n * i // k for i in range(k + 1)]
    return [(msgs[bounds[i] : bounds[i + 1]], f"{token}#{i}") for i in range(k)]


class EventSink(_DeadLetters, BatchingSink):
    """``feedback.clean.v1`` → ClickHouse ``feedback_events``.

    Fast path: the messages of a partition written with the current schema become one
    ClickHouse Native block, built in C from their Avro bodies (:mod:`sinks.native`; no
    Python object per event, and ClickHouse parses no Avro). Without the C extension the
    bodies go under an Avro container header instead, mapped onto the table by
    ``INSERT ... SELECT FROM input()``. Anything else (older
    schemas, Confluent framing, gaps in the offsets, data ClickHouse refuses) takes the
    Python path: decode, build rows, insert, and bisect a refused batch so only the bad rows
    go to the DLQ (stage ``sink``) with ClickHouse's reason. The sink never stops for one message.
    """

    overlap_flush = True  # ClickHouse inserts while the next batch is consumed: both cores busy

    name = "events"

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        topics = Topics(settings.topic_prefix)
        super().__init__(settings, topics.clean, settings.sink_group, **kwargs)
        self.serde = AvroSerde.from_url(settings.schema_registry_url)
        self._init_dead_letters(settings, topics)
        client = connect(settings)
        migrate(client, settings)
        self.clickhouse = ClickHouseWriter(client, settings.clickhouse_database, "feedback_events", EVENT_COLUMNS)
        self._fast_header = self.serde.header if self.serde.header[:1] == SINGLE_OBJECT_MAGIC[:1] else None
        self._schema_text = schema_text("feedback_event_v1")
        self._avro_query = avro_insert_query(settings.clickhouse_database)
        # Native blocks built in C when the extension is there; else the bodies under an Avro header.
        plan = event_plan(orjson.loads(self._schema_text), EVENT_COLUMNS)
        self._native = (
            NativeEncoder(plan, self._fast_header, native_statement(settings.clickhouse_database))
            if plan is not None and self._fast_header is not None
            else None
        )
        # The same blocks without the statement: a small batch's partitions go in as one insert.
        self._native_blocks = (
            NativeEncoder(plan, self._fast_header) if self._native is not None and self._fast_header else None
        )
        self._inserts = ThreadPoolExecutor(INSERT_THREADS, thread_name_prefix="events-insert")
        self.fast_batches = 0

    def run(self, idle_exit_s: float | None = None) -> None:
        """:meth:`BatchingSink.run`, then stop the insert threads however the run ends."""
        try:
            super().run(idle_exit_s=idle_exit_s)
        finally:
            self._inserts.shutdown(wait=True)

    def flush(self, messages: Sequence[Message]) -> None:
        parts = by_partition(messages)
        if len(parts) > 1 and len(messages) <= INSERT_CHUNK_ROWS and self._insert_whole(parts):
            self._flush_dead_letters()
            log.info("batch_written sink=events rows=%d dead_lettered=%d", len(messages), self.dead_lettered)
            return
        chunks = [
            (partition, chunk, token)
            for partition, msgs in parts.items()
            for chunk, token in insert_chunks(
                msgs, batch_token("feedback_events", self.topic, partition, msgs[0].offset(), msgs[-1].offset())
            )
        ]
        if len(chunks) == 1:
            written = self._insert_chunk(*chunks[0])
        else:  # each insert is single-threaded in ClickHouse: run them side by side, wait for all
            futures = [self._inserts.submit(self._insert_chunk, *chunk) for chunk in chunks]
            wait(futures)
            written = sum(f.result() for f in futures)  # the first failure, if any, is raised here
        self._flush_dead_letters()
        log.info("batch_written sink=events rows=%d dead_lettered=%d", written, self.dead_lettered)

    def _insert_whole(self, parts: dict[int, list[Message]]) -> bool:
        """A small batch (at most INSERT_CHUNK_ROWS rows) in one insert: one Native block per
        partition after one statement, under one token naming every partition's range. Every
        insert costs the server a fixed ~5-20 ms of CPU and makes a part in each table its views
        feed; a batch's partitions inserted one by one cost the embedded server ~3.5x the CPU per
        event of one insert at 5,000 events/s over 6 partitions (docs/performance.md). A replay
        rebuilds the batch whole (:mod:`sinks.batching`), so the token repeats. False (nothing
        inserted) when a partition is not the fast path's or ClickHouse refuses the rows: the
        batch then goes partition by partition, where refused rows are found and dead-lettered."""
        encoder = self._native_blocks
        if encoder is None or self._native is None or self._fast_header is None:
            return False
        blocks = [self._native.prefix]  # INSERT INTO ... FORMAT Native, then the blocks one after another
        for partition, msgs in sorted(parts.items()):
            block = encoder.encode(msgs, msgs[0].offset(), partition)
            if block is None:
                return False
            blocks.append(block)
        token = "+".join(
            batch_token("feedback_events", self.topic, partition, msgs[0].offset(), msgs[-1].offset())
            for partition, msgs in sorted(parts.items())
        )
        try:
            self.clickhouse.insert_body(b"".join(blocks), token)
        except DatabaseError as exc:
            log.warning("whole_insert_refused partitions=%d code=%s", len(parts), _code(exc))
            return False
        self.fast_batches += 1
        for partition, msgs in sorted(parts.items()):
            log.info(
                "inserted sink=events partition=%d first=%d last=%d rows=%d path=whole",
                partition, msgs[0].offset(), msgs[-1].offset(), len(msgs),
            )  # fmt: skip
        return True

    def _insert_chunk(self, partition: int, msgs: Sequence[Message], token: str) -> int:
        fast = self._fast(partition, msgs, token)
        written = len(msgs) if fast else self._python_path(partition, msgs, token)
        log.info(
            "inserted sink=events partition=%d first=%d last=%d rows=%d path=%s",
            partition, msgs[0].offset(), msgs[-1].offset(), len(msgs), "fast" if fast else "python",
        )  # fmt: skip
        return written

    def _fast(self, partition: int, msgs: Sequence[Message], token: str) -> bool:
        """Insert ``msgs`` without decoding them in Python; False leaves them to the Python path
        (a gap in the offsets, another schema or framing, a body that does not decode, rows
        ClickHouse refuses)."""
        header = self._fast_header
        if header is None:
            return False
        first = msgs[0].offset()
        try:
            if self._native is not None:
                body = self._native.encode(msgs, first, partition)
                if body is None:
                    return False
                self.clickhouse.insert_body(body, token)
            else:
                if any(
                    m.offset() != first + i or not (m.value() or b"").startswith(header) for i, m in enumerate(msgs)
                ):
                    return False
                n = len(header)
                data = container(self._schema_text, [m.value()[n:] for m in msgs])
                self.clickhouse.insert_select(self._avro_query, data, token, {"partition": partition, "first": first})
        except DatabaseError as exc:
            log.warning("fast_insert_refused partition=%d first=%d code=%s", partition, first, _code(exc))
            return False
        self.fast_batches += 1
        return True

    def _python_path(self, partition: int, msgs: Sequence[Message], token: str) -> int:
        rows: list[list[Any]] = []
        kept: list[Message] = []
        for msg in msgs:
            try:
                record = self.serde.decode(msg.value())
            except PoisonEvent as exc:
                self._dead_letter(msg, exc.reason)
                continue
            rows.append(event_row(record, partition, msg.offset()))
            kept.append(msg)
        return self._insert_isolating(rows, kept, token)

    def _insert_isolating(self, rows: list[list[Any]], msgs: list[Message], token: str) -> int:
        """Insert ``rows``; if ClickHouse refuses them, halve until the refused rows are found and
        dead-letter those. Sub-batches get tokens derived from ``token``, so replays repeat them."""
        if not rows:
            return 0
        try:
            self.clickhouse.insert(rows, token)
            return len(rows)
        except DatabaseError as exc:
            if not refused(exc):
                # Never bisect on a passing failure: a retry must insert under the same tokens.
                raise TransientError(f"ClickHouse failed the insert: code {_code(exc)} ({_error_name(exc)})") from None
            if len(rows) == 1:
                # Code and name only: ClickHouse's message may quote the row's values.
                self._dead_letter(msgs[0], f"ClickHouse refused the row: code {_code(exc)} ({_error_name(exc)})")
                return 0
        half = len(rows) // 2
        return self._insert_isolating(rows[:half], msgs[:half], f"{token}/a") + self._insert_isolating(
            rows[half:], msgs[half:], f"{token}/b"
        )


class JsonlSink(BatchingSink):
    """``feedback.clean.v1`` → the daily JSONL files under ``$FEEDBACK_PATH``, exactly once.

    Its own consumer group: the files' ledger says where reading resumes (see
    :mod:`sinks.jsonl`), and the files never wait for ClickHouse. An event id already written
    (a worker re-sent it after a crash) is skipped by the writer's seen-set, so lines = distinct
    ids. Undecodable messages are skipped here (the ClickHouse sink dead-letters them). It holds
    the folder's writer lock from construction until its run ends (:meth:`close`).
    """

    name = "jsonl"

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(settings, Topics(settings.topic_prefix).clean, f"{settings.sink_group}-jsonl", **kwargs)
        self.serde = AvroSerde.from_url(settings.schema_registry_url)
        # Cuts the files back to the ledger; ids re-sent within the gate's dedup window are skipped.
        self.jsonl = JsonlWriter(settings.path, seen_window_s=settings.dedup_window_s)
        self._housekept = 0.0
        self._erasure_due = 0.0
        self._erasure_backoff = 0.0
        self.housekeeping()

    def start_offsets(
        self, partitions: list[TopicPartition], committed: dict[tuple[str, int], int]
    ) -> dict[tuple[str, int], int]:
        """The ledger's offsets: ahead of Kafka's when the sink died between the ledger write and
        the commit. If Kafka is further still, another sink (another folder) wrote that range."""
        ledger = self.jsonl.next_offsets()
        return {
            (tp.topic, tp.partition): max(ledger[(tp.topic, tp.partition)], committed.get((tp.topic, tp.partition), -1))
            for tp in partitions
            if (tp.topic, tp.partition) in ledger
        }

    def run(self, idle_exit_s: float | None = None) -> None:
        """:meth:`BatchingSink.run`, then release the folder's writer lock however the run ends
        (stopped, failed, or killed by an exception), so ``feedback forget`` can erase offline."""
        try:
            super().run(idle_exit_s=idle_exit_s)
        finally:
            self.close()

    def close(self) -> None:
        """Release the JSONL writer (and its lock on the folder); the sink must not flush afterwards."""
        self.jsonl.close()

    def maintenance(self) -> None:
        """Between batches, on the sink's thread (the writer is never mid-write): housekeeping
        every ``jsonl_housekeeping_interval_s``, erasure requests every :data:`ERASURE_POLL_S`."""
        if time.monotonic() - self._housekept >= self.settings.jsonl_housekeeping_interval_s:
            self.housekeeping()
        if time.monotonic() >= self._erasure_due:
            self.apply_erasures()

    def apply_erasures(self) -> list[dict[str, Any]]:
        """Apply ``feedback forget``'s pending requests (:func:`sinks.jsonl.apply_erasure_requests`).
        A disk failure is logged and retried later with backoff; it never stops the sink."""
        try:
            receipts = apply_erasure_requests(self.jsonl)
        except TransientError as exc:
            self._erasure_backoff = min(max(2 * self._erasure_backoff, 1.0), _ERASURE_BACKOFF_MAX_S)
            self._erasure_due = time.monotonic() + self._erasure_backoff
            log.warning("jsonl_erasure_deferred retry_in_s=%.1f error=%s", self._erasure_backoff, exc)
            return []
        self._erasure_backoff = 0.0
        self._erasure_due = time.monotonic() + ERASURE_POLL_S
        return receipts

    def housekeeping(self) -> dict[str, list[str]]:
        """Compress closed days and delete expired ones (see :func:`sinks.jsonl.housekeep`)."""
        self._housekept = time.monotonic()
        return self.jsonl.housekeep(
            compress_after_days=self.settings.jsonl_compress_after_days,
            retention_days=self.settings.jsonl_retention_days,
            quiet_s=self.settings.jsonl_compress_quiet_s,
        )

    def flush(self, messages: Sequence[Message]) -> None:
        records: list[dict[str, Any]] = []
        offsets: dict[tuple[str, int], int] = {}
        written = self.jsonl.next_offsets()
        at_ms = 0
        for msg in messages:
            key = (msg.topic(), msg.partition())
            if msg.offset() < written.get(key, -1):
                continue  # a retried batch: the ledger already holds this line
            offsets[key] = msg.offset() + 1
            at_ms = max(at_ms, msg.timestamp()[1])
            try:
                records.append(self.serde.decode(msg.value()))
            except PoisonEvent as exc:
                log.warning("jsonl_skipped partition=%d offset=%d reason=%s", msg.partition(), msg.offset(), exc.reason)
        repeats = self.jsonl.repeats
        # The messages' own time (when the worker sent them): a replay of this range decides the same.
        lines = self.jsonl.write(records, offsets, at_ms=at_ms if at_ms > 0 else None)
        log.info("batch_written sink=jsonl rows=%d repeats=%d", lines, self.jsonl.repeats - repeats)


def _code(exc: Exception) -> str:
    code = _error_code(exc)
    return "?" if code is None else str(code)


class DeadLetterSink(BatchingSink):
    """``feedback.dlq.v1`` → ClickHouse ``dlq_events`` (metadata only; the bytes stay in Kafka)."""

    side_table = True

    name = "dlq"
    COLUMNS = ("ts", "stage", "error", "topic", "partition", "offset", "raw_bytes")

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        topics = Topics(settings.topic_prefix)
        super().__init__(settings, topics.dlq, f"{settings.sink_group}-dlq", **kwargs)
        self.serde = AvroSerde("dead_letter_v1")
        client = connect(settings)
        migrate(client, settings)
        self.clickhouse = ClickHouseWriter(client, settings.clickhouse_database, "dlq_events", self.COLUMNS)

    def flush(self, messages: Sequence[Message]) -> None:
        for partition, msgs in by_partition(messages).items():
            rows = []
            for msg in msgs:
                try:
                    r = self.serde.decode(msg.value())
                except PoisonEvent as exc:
                    # Nowhere further to send it: count it loudly and keep going.
                    log.error("dlq_undecodable partition=%d offset=%d reason=%s", partition, msg.offset(), exc.reason)
                    continue
                rows.append([r["ts"], r["stage"], r["error"], r["topic"], r["partition"], r["offset"], len(r["raw"])])
            token = batch_token("dlq_events", self.topic, partition, msgs[0].offset(), msgs[-1].offset())
            self.clickhouse.insert(rows, token)


class RejectedSink(_DeadLetters, BatchingSink):
    """``feedback.rejected.v1`` → ClickHouse ``rejected_events`` (why the gate refused; never a payload).

    The table is keyed by the refused message's coordinates, so a replayed rejection
    collapses to one row. A message that does not decode goes to the DLQ (stage ``sink``)
    and never stops the sink.
    """

    side_table = True

    name = "rejected"

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        topics = Topics(settings.topic_prefix)
        super().__init__(settings, topics.rejected, f"{settings.sink_group}-rejected", **kwargs)
        self.serde = AvroSerde("rejected_v1")
        self._init_dead_letters(settings, topics)
        client = connect(settings)
        migrate(client, settings)
        self.clickhouse = ClickHouseWriter(client, settings.clickhouse_database, "rejected_events", REJECTED_COLUMNS)

    def flush(self, messages: Sequence[Message]) -> None:
        written = 0
        for partition, msgs in by_partition(messages).items():
            rows: list[list[Any]] = []
            for msg in msgs:
                try:
                    record = self.serde.decode(msg.value())
                except PoisonEvent as exc:
                    self._dead_letter(msg, exc.reason)
                    continue
                rows.append(rejected_row(record))
            token = batch_token("rejected_events", self.topic, partition, msgs[0].offset(), msgs[-1].offset())
            self.clickhouse.insert(rows, token)
            written += len(rows)
        self._flush_dead_letters()
        log.info("batch_written sink=rejected rows=%d dead_lettered=%d", written, self.dead_lettered)


def all_sinks(settings: Settings) -> list[BatchingSink]:
    """Every sink ``feedback sink`` runs, one thread each."""
    from sinks.state_sinks import BiasHistorySink, InteractionSink, ReputationHistorySink, TriageSink

    return [
        EventSink(settings),
        JsonlSink(settings),
        RejectedSink(settings),
        DeadLetterSink(settings),
        ReputationHistorySink(settings),
        BiasHistorySink(settings),
        TriageSink(settings),
        InteractionSink(settings),
    ]
