"""The pure parts of exactly-once sinking: batch intents, the JSONL ledger, housekeeping, Avro containers."""

from __future__ import annotations

import gzip
import io
import itertools
import random
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError
from confluent_kafka import OFFSET_INVALID, KafkaError, KafkaException, TopicPartition

from pipeline.errors import TransientError
from producers.synthetic import generate_events
from schemas.serde import AvroSerde, schema_text
from sinks.avro_ocf import container
from sinks.batching import Batch, decode_intent, encode_intent
from sinks.clickhouse import AVRO_EVENT_SELECT, EVENT_COLUMNS, avro_insert_query
from sinks.jsonl import LEDGER, JsonlWriter, Ledger, event_json, housekeep

_NOW = datetime.now(UTC)


class _Killed(BaseException):
    """A SIGKILL, as far as the code under test can tell: nothing catches it."""


def test_intent_metadata_round_trips_and_ignores_anything_else() -> None:
    assert decode_intent(encode_intent(41)) == 41
    assert decode_intent("") is None and decode_intent(None) is None and decode_intent("batch-end:x") is None
    assert decode_intent("some other tool's metadata") is None


def test_avro_container_holds_the_message_bodies_as_records() -> None:
    serde = AvroSerde()
    events = list(generate_events(50, seed=4))
    values = [serde.encode(e.to_avro()) for e in events]
    data = container(schema_text("feedback_event_v1"), [v[len(serde.header) :] for v in values])
    records = list(fastavro.reader(io.BytesIO(data)))
    assert [r["event_id"] for r in records] == [e.event_id for e in events]
    assert records[3] == serde.decode(values[3])


def test_avro_insert_maps_every_column() -> None:
    query = avro_insert_query("db")
    assert query.startswith("INSERT INTO `db`.feedback_events (event_id, ts,") and query.endswith("FORMAT Avro")
    assert "client_ip" not in query.split("SELECT", 1)[1].split("FROM input", 1)[0]
    assert set(AVRO_EVENT_SELECT) <= set(EVENT_COLUMNS)


def test_insert_chunks_cut_a_range_the_same_way_every_time() -> None:
    from sinks.feedback_sink import INSERT_CHUNK_ROWS, insert_chunks

    small = list(range(INSERT_CHUNK_ROWS))
    assert insert_chunks(small, "t:p:0:0-9") == [(small, "t:p:0:0-9")]  # one chunk: the range's own token
    msgs = list(range(2 * INSERT_CHUNK_ROWS + 1))
    chunks = insert_chunks(msgs, "tok")
    assert [token for _, token in chunks] == ["tok#0", "tok#1", "tok#2"]
    assert [m for chunk, _ in chunks for m in chunk] == msgs  # in order, nothing lost or repeated
    assert max(len(c) for c, _ in chunks) - min(len(c) for c, _ in chunks) <= 1
    assert insert_chunks(list(msgs), "tok") == chunks


_SEEDS = itertools.count(100)


def _records(n: int, day: str = "2026-11-22") -> list[dict[str, object]]:
    """``n`` events on ``day``; each call's ids are new (the writer keeps one line per event id)."""
    serde = AvroSerde()
    ts = datetime.fromisoformat(f"{day}T12:00:00+00:00")
    events = generate_events(n, seed=next(_SEEDS))
    return [serde.decode(serde.encode({**e.to_avro(), "ts": int(ts.timestamp() * 1e6)})) for e in events]


def test_ledger_records_lengths_and_offsets_after_each_write(tmp_path: Path) -> None:
    writer = JsonlWriter(tmp_path)
    writer.write(_records(3), {("clean", 0): 3})
    ledger = Ledger.load(tmp_path)
    day = tmp_path / "feedback-2026-11-22.jsonl"
    assert ledger.lengths == {day.name: day.stat().st_size} and ledger.offsets == {"clean:0": 3}
    writer.close()  # a restart: the writer lock is released with the process
    assert JsonlWriter(tmp_path).next_offsets() == {("clean", 0): 3}


def test_restart_cuts_partial_and_uncommitted_lines_and_unknown_files(tmp_path: Path) -> None:
    writer = JsonlWriter(tmp_path)
    records = _records(4)
    writer.write(records[:2], {("clean", 0): 2})
    day = tmp_path / "feedback-2026-11-22.jsonl"
    committed = day.read_bytes()
    with open(day, "ab") as fh:  # a kill after writing, before the ledger: a whole line and a partial one
        fh.write(b'{"event_id": "uncommitted"}\n{"event_id": "par')
    stray = tmp_path / "feedback-2026-11-23.jsonl"
    stray.write_bytes(b'{"event_id": "never committed"}\n')

    writer.close()  # killed: the writer lock goes with the process
    again = JsonlWriter(tmp_path)
    assert day.read_bytes() == committed and not stray.exists()
    again.write(records[2:], {("clean", 0): 4})
    lines = [orjson.loads(line) for line in day.read_bytes().splitlines()]
    assert [line["event_id"] for line in lines] == [str(r["event_id"]) for r in records]


def test_housekeeping_compresses_closed_days_and_removes_old_ones(tmp_path: Path) -> None:
    writer = JsonlWriter(tmp_path)
    for day in ("2026-08-01", "2026-11-20", "2026-11-22", "2026-11-23"):
        writer.write(_records(2, day))
    old_lines = (tmp_path / "feedback-2026-11-20.jsonl").read_bytes()
    now = _NOW + timedelta(days=365)  # long after the files were written: they are quiet
    done = writer.housekeep(today=date(2026, 11, 23), now=now, compress_after_days=1, retention_days=90)
    assert done == {
        "compressed": ["feedback-2026-11-20.jsonl", "feedback-2026-11-22.jsonl"],
        "removed": ["feedback-2026-08-01.jsonl"],
    }
    assert gzip.decompress((tmp_path / "feedback-2026-11-20.jsonl.gz").read_bytes()) == old_lines
    assert (tmp_path / "feedback-2026-11-23.jsonl").exists()  # today's file is never touched
    assert not (tmp_path / "feedback-2026-11-20.jsonl").exists()
    # A late event for a compressed day is appended as a further gzip member on the next run.
    writer.close()
    writer = JsonlWriter(tmp_path)
    late = _records(1, "2026-11-20")
    writer.write(late)
    writer.housekeep(today=date(2026, 11, 23), now=now)
    lines = gzip.decompress((tmp_path / "feedback-2026-11-20.jsonl.gz").read_bytes()).splitlines()
    assert len(lines) == 3 and orjson.loads(lines[-1])["event_id"] == late[0]["event_id"]
    ledger = Ledger.load(tmp_path)
    assert "feedback-2026-11-20.jsonl" not in ledger.lengths
    assert ledger.gz["feedback-2026-11-20.jsonl.gz"] == (tmp_path / "feedback-2026-11-20.jsonl.gz").stat().st_size
    with pytest.raises(FileNotFoundError):
        (tmp_path / "feedback-2026-08-01.jsonl").stat()
    # Retention 0 keeps everything (and compresses the last day); later, retention removes the .gz files.
    assert writer.housekeep(today=date(2027, 6, 1), now=now, retention_days=0) == {
        "compressed": ["feedback-2026-11-23.jsonl"],
        "removed": [],
    }
    done = writer.housekeep(today=date(2027, 6, 1), now=now, retention_days=90)
    assert done["removed"] == [
        "feedback-2026-11-20.jsonl.gz",
        "feedback-2026-11-22.jsonl.gz",
        "feedback-2026-11-23.jsonl.gz",
    ]
    assert not list(tmp_path.glob("feedback-*")) and Ledger.load(tmp_path).lengths == {}


def test_housekeeping_leaves_recent_in_flight_and_todays_files(tmp_path: Path) -> None:
    writer = JsonlWriter(tmp_path)
    for day in ("2026-11-20", "2026-11-21", "2026-11-23"):
        writer.write(_records(2, day))
    with open(tmp_path / "feedback-2026-11-21.jsonl", "ab") as fh:
        fh.write(b'{"event_id": "in fli')  # a batch being written: past its ledger length
    today, now = date(2026, 11, 23), _NOW + timedelta(days=365)
    # Written just now (real time): not quiet yet, so nothing is compressed.
    assert housekeep(tmp_path, writer.ledger, today=today, quiet_s=3600)["compressed"] == []
    done = housekeep(tmp_path, writer.ledger, today=today, now=now, quiet_s=3600)
    assert done["compressed"] == ["feedback-2026-11-20.jsonl"]  # not the one in flight, not today's
    # compress_after_days: a day must be at least that old.
    assert housekeep(tmp_path, writer.ledger, today=today, now=now, compress_after_days=5)["compressed"] == []


def test_a_kill_during_compression_leaves_each_line_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    today, now = date(2026, 11, 23), _NOW + timedelta(days=365)
    writer = JsonlWriter(tmp_path)
    first, late = _records(3, "2026-11-20"), _records(2, "2026-11-20")
    writer.write(first)
    writer.housekeep(today=today, now=now)
    writer.write(late)  # late events: a new .jsonl beside the .gz
    real_save = Ledger.save

    def killed(self: Ledger, directory: Path) -> None:
        raise _Killed

    # Killed after the new .gz was renamed into place, before the ledger recorded it.
    monkeypatch.setattr(Ledger, "save", killed)
    with pytest.raises(_Killed):
        housekeep(tmp_path, writer.ledger, today=today, now=now)
    monkeypatch.setattr(Ledger, "save", real_save)
    gz = tmp_path / "feedback-2026-11-20.jsonl.gz"
    assert len(gzip.decompress(gz.read_bytes()).splitlines()) == 5  # the member is there, uncommitted
    writer.close()  # killed: the writer lock goes with the process
    restarted = JsonlWriter(tmp_path)  # cuts the .gz back to its committed length
    assert len(gzip.decompress(gz.read_bytes()).splitlines()) == 3
    restarted.housekeep(today=today, now=now)
    ids = [orjson.loads(line)["event_id"] for line in gzip.decompress(gz.read_bytes()).splitlines()]
    assert ids == [r["event_id"] for r in first + late]

    # Killed after the ledger write, before the .jsonl was removed: the .jsonl is unknown, so removed.
    day = tmp_path / "feedback-2026-11-20.jsonl"
    day.write_bytes(b"".join(orjson.dumps(event_json(r)) + b"\n" for r in late))
    restarted.close()
    JsonlWriter(tmp_path)
    assert not day.exists() and len(gzip.decompress(gz.read_bytes()).splitlines()) == 5

    # A first compression killed before its ledger write: the orphan .gz goes, the .jsonl stays.
    other = _records(2, "2026-11-19")
    writer = JsonlWriter(tmp_path)
    writer.write(other)
    monkeypatch.setattr(Ledger, "save", killed)
    with pytest.raises(_Killed):
        housekeep(tmp_path, writer.ledger, today=today, now=now)
    monkeypatch.setattr(Ledger, "save", real_save)
    writer.close()
    JsonlWriter(tmp_path).housekeep(today=today, now=now)
    lines = gzip.decompress((tmp_path / "feedback-2026-11-19.jsonl.gz").read_bytes()).splitlines()
    assert [orjson.loads(line)["event_id"] for line in lines] == [r["event_id"] for r in other]


def test_a_failed_write_is_cut_back_and_a_retry_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = JsonlWriter(tmp_path)
    records = _records(4)
    writer.write(records[:2], {("clean", 0): 2})
    real_save = Ledger.save
    calls = {"n": 0}

    def full_disk(self: Ledger, directory: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        real_save(self, directory)

    monkeypatch.setattr(Ledger, "save", full_disk)
    with pytest.raises(TransientError):
        writer.write(records[2:], {("clean", 0): 4})
    day = tmp_path / "feedback-2026-11-22.jsonl"
    assert len(day.read_bytes().splitlines()) == 2 and writer.next_offsets() == {("clean", 0): 2}
    writer.write(records[2:], {("clean", 0): 4})
    assert [orjson.loads(line)["event_id"] for line in day.read_bytes().splitlines()] == [
        r["event_id"] for r in records
    ]


def test_a_lost_ledger_adopts_the_files_and_a_short_file_is_never_padded(tmp_path: Path) -> None:
    writer = JsonlWriter(tmp_path)
    writer.write(_records(3), {("clean", 0): 3})
    day = tmp_path / "feedback-2026-11-22.jsonl"
    data = day.read_bytes()
    # The ledger says more than the file holds (a lost tail): keep the whole lines, no NUL padding.
    day.write_bytes(data[:-10])
    writer.close()
    JsonlWriter(tmp_path)
    assert day.read_bytes() == data[: data[:-10].rfind(b"\n") + 1]
    assert Ledger.load(tmp_path).lengths[day.name] == day.stat().st_size
    # No ledger at all: the files are adopted up to their last complete line, not deleted.
    (tmp_path / LEDGER).unlink()
    with open(day, "ab") as fh:
        fh.write(b'{"partial')
    adopted = JsonlWriter(tmp_path)
    assert day.read_bytes().endswith(b"\n") and len(day.read_bytes().splitlines()) == 2
    assert adopted.ledger.lengths == {day.name: day.stat().st_size} and (tmp_path / LEDGER).exists()


def _sink() -> Any:
    from pipeline.settings import Settings
    from sinks.batching import BatchingSink

    class Null(BatchingSink):
        def flush(self, messages: Any) -> None:
            pass

    return Null(Settings(bootstrap_servers="127.0.0.1:1"), "clean", "g")


def test_intent_batches_end_exactly_and_redeliveries_are_not_taken_twice() -> None:
    sink = _sink()
    sink._intents = {("clean", 0): 2}
    sink._closed = set()
    batch = Batch()
    sink._batch = batch
    for p, o in [(0, 0), (1, 5), (0, 1), (0, 1), (0, 2), (0, 3), (1, 6), (0, 4)]:
        sink._take(_Record(p, o), batch)
    assert [(m.partition(), m.offset()) for m in batch] == [(0, 0), (1, 5), (0, 1), (0, 2), (1, 6)]
    parts = {k: [m.offset() for m in v] for k, v in batch.parts.items()}
    assert parts == {("clean", 0): [0, 1, 2], ("clean", 1): [5, 6]}
    assert [m.offset() for m in sink._carry] == [3, 4] and not sink._intents
    # A rebalance hands partition 1 back: what was collected for it is read again, not kept twice.
    sink._forget({("clean", 1)})
    assert [(m.partition(), m.offset()) for m in batch] == [(0, 0), (0, 1), (0, 2)]
    assert list(batch.parts) == [("clean", 0)]
    sink._take(_Record(1, 5), batch)
    assert batch[-1].offset() == 5


def test_runs_of_one_partition_are_taken_whole_and_anything_odd_message_by_message() -> None:
    sink = _sink()
    batch = sink._batch = Batch()
    sink._take_many([_Record(0, o) for o in (0, 1, 2)] + [_Record(1, 7), _Record(1, 9)] + [_Record(0, 3)], batch)
    # Delivered again (a run starting at or below what was taken), or out of order: one by one.
    sink._take_many([_Record(0, 2), _Record(0, 3), _Record(0, 4), _Record(1, 11), _Record(1, 10)], batch)
    assert [(m.partition(), m.offset()) for m in batch] == [
        (0, 0), (0, 1), (0, 2), (1, 7), (1, 9), (0, 3), (0, 4), (1, 11),
    ]  # fmt: skip
    assert {k: [m.offset() for m in v] for k, v in batch.parts.items()} == {
        ("clean", 0): [0, 1, 2, 3, 4],
        ("clean", 1): [7, 9, 11],
    }


# --- batches rebuilt after a crash, against an in-memory Kafka ------------------------------


class _Record:
    """A consumed message: what BatchingSink and the sinks read of one."""

    def __init__(self, partition: int, offset: int) -> None:
        self._p, self._o = partition, offset

    def topic(self) -> str:
        return "clean"

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return f"{self._p}:{self._o}".encode()

    def key(self) -> bytes:
        return b"k"


class _Kafka:
    """Partitions of messages and one group's committed offsets (with metadata)."""

    def __init__(self, partitions: int, per_partition: int) -> None:
        self.log = {p: [_Record(p, o) for o in range(per_partition)] for p in range(partitions)}
        self.committed: dict[int, tuple[int, str]] = {}


class _Consumer:
    """Enough of confluent_kafka.Consumer for BatchingSink; hands out messages in random chunks,
    so two runs over the same log form different batches unless something pins them."""

    def __init__(self, kafka: _Kafka, seed: int, fail_commits: int = 0) -> None:
        self.kafka, self.rng, self.fail_commits = kafka, random.Random(seed), fail_commits
        self.pos: dict[int, int] = {}
        self.on_assign: Any = None

    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None) -> None:
        self.on_assign = on_assign

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[_Record]:
        if not self.pos:
            self.pos = {p: self.kafka.committed.get(p, (0, ""))[0] for p in self.kafka.log}
            self.on_assign(self, [TopicPartition("clean", p, OFFSET_INVALID) for p in self.kafka.log])
        out: list[_Record] = []
        want = self.rng.randint(1, num_messages)
        while len(out) < want:
            ready = [p for p, msgs in self.kafka.log.items() if self.pos[p] < len(msgs)]
            if not ready:
                break
            p = self.rng.choice(ready)
            take = self.kafka.log[p][self.pos[p] : self.pos[p] + self.rng.randint(1, 4)]
            self.pos[p] += len(take)
            out.extend(take)
        if not out:
            time.sleep(0.005)
        return out

    def committed(self, partitions: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]:
        out = []
        for tp in partitions:
            offset, metadata = self.kafka.committed.get(tp.partition, (OFFSET_INVALID, ""))
            out.append(TopicPartition("clean", tp.partition, offset, metadata=metadata))
        return out

    def assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            if tp.offset >= 0:
                self.pos[tp.partition] = tp.offset

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        if self.fail_commits:
            self.fail_commits -= 1
            raise KafkaException(KafkaError(KafkaError.REBALANCE_IN_PROGRESS))
        for tp in offsets:
            self.kafka.committed[tp.partition] = (tp.offset, tp.metadata or "")

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("clean", p) for p in self.kafka.log]

    def pause(self, partitions: list[TopicPartition]) -> None:
        pass

    def resume(self, partitions: list[TopicPartition]) -> None:
        pass

    def poll(self, timeout: float = -1) -> None:
        return None

    def close(self) -> None:
        pass


def _table_sink(
    kafka: _Kafka,
    table: dict[tuple[int, int, int], list[int]],
    seed: int,
    crash: tuple[int, str] | None = None,
    *,
    overlap: bool = False,
    transient_at: tuple[int, ...] = (),
) -> Any:
    """A sink whose "ClickHouse" keeps the first insert per token, like insert_deduplication_token."""
    from pipeline.settings import Settings
    from sinks.batching import BatchingSink

    class TableSink(BatchingSink):
        flushes = 0

        def flush(self, messages: Any) -> None:
            self.flushes += 1
            if self.flushes in transient_at:
                raise TransientError("ClickHouse unavailable: ConnectionError")
            by_partition: dict[int, list[int]] = {}
            for m in messages:
                by_partition.setdefault(m.partition(), []).append(m.offset())
            for n, (p, offsets) in enumerate(by_partition.items()):
                if crash == (self.flushes, "mid") and n == 1:
                    raise _Killed  # killed between two partitions' inserts
                table.setdefault((p, offsets[0], offsets[-1]), offsets)
            if crash == (self.flushes, "after"):
                raise _Killed  # inserted, offsets not committed

    sink = TableSink(Settings(bootstrap_servers="127.0.0.1:1"), "clean", "g", batch_rows=9, batch_ms=20)
    sink.overlap_flush = overlap  # flush on a worker thread while the next batch is collected
    sink._consumer.close()
    sink._consumer = _Consumer(kafka, seed, fail_commits=1 if seed == 3 else 0)  # one failed commit, retried
    return sink


def _whole_batch_sink(kafka: _Kafka, table: dict[Any, list[tuple[int, int]]], seed: int, crash: int | None) -> Any:
    """A sink inserting each batch whole under one token naming all of its ranges (the event
    sink's one insert for a small batch), into a "ClickHouse" that keeps the first per token."""
    from pipeline.settings import Settings
    from sinks.batching import BatchingSink

    class WholeBatchSink(BatchingSink):
        flushes = 0

        def flush(self, messages: Any) -> None:
            self.flushes += 1
            ranges: dict[int, list[int]] = {}
            for m in messages:
                ranges.setdefault(m.partition(), []).append(m.offset())
            token = tuple(sorted((p, o[0], o[-1]) for p, o in ranges.items()))
            table.setdefault(token, [(m.partition(), m.offset()) for m in messages])
            if crash == self.flushes:
                raise _Killed  # inserted, offsets not committed

    sink = WholeBatchSink(Settings(bootstrap_servers="127.0.0.1:1"), "clean", "g", batch_rows=9, batch_ms=20)
    sink._consumer.close()
    sink._consumer = _Consumer(kafka, seed)
    return sink


def _whole_batch_crash(flush: int, seed: int) -> Counter[tuple[int, int]]:
    kafka, table = _Kafka(partitions=3, per_partition=25), {}
    with pytest.raises(_Killed):
        _whole_batch_sink(kafka, table, seed, flush).run()
    _whole_batch_sink(kafka, table, seed + 100, None).run(idle_exit_s=0.1)
    rows: Counter[tuple[int, int]] = Counter(r for stored in table.values() for r in stored)
    assert set(rows) == {(p, o) for p in range(3) for o in range(25)}, "an event was lost"
    return rows


def test_a_replay_rebuilds_the_whole_batch_so_a_token_over_all_its_ranges_repeats() -> None:
    for flush in (1, 2, 4):
        for seed in (1, 2, 3, 4):
            rows = _whole_batch_crash(flush, seed)
            assert max(rows.values()) == 1, f"duplicates after a kill at flush {flush}, seed {seed}"


def test_a_replay_that_took_other_partitions_in_would_store_rows_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test above can fail: a replay that lets the other partitions into its batch forms
    # another batch, another token.
    from sinks.batching import BatchingSink

    monkeypatch.setattr(BatchingSink, "_holds_back", lambda self, key: False)
    dupes = sum(max(_whole_batch_crash(flush, seed).values()) > 1 for flush in (1, 2, 4) for seed in (1, 2, 3, 4))
    assert dupes > 0


def _stored(table: dict[tuple[int, int, int], list[int]]) -> Counter[tuple[int, int]]:
    rows: Counter[tuple[int, int]] = Counter()
    for (p, _, _), offsets in table.items():
        rows.update((p, o) for o in offsets)
    return rows


def _crash_then_finish(crash: tuple[int, str], seed: int, overlap: bool = False) -> Counter[tuple[int, int]]:
    kafka, table = _Kafka(partitions=3, per_partition=25), {}
    with pytest.raises(_Killed):
        _table_sink(kafka, table, seed, crash, overlap=overlap).run()
    _table_sink(kafka, table, seed + 100, overlap=overlap).run(idle_exit_s=0.1)  # the restart batches differently
    rows: Counter[tuple[int, int]] = Counter()
    for (p, _, _), offsets in table.items():
        rows.update((p, o) for o in offsets)
    assert set(rows) == {(p, o) for p in range(3) for o in range(25)}, "an event was lost"
    return rows


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
@pytest.mark.parametrize("when", ["mid", "after"])
def test_a_batch_rebuilt_after_a_kill_has_the_same_token_so_nothing_is_stored_twice(when: str, overlap: bool) -> None:
    for flush in (1, 2, 4):
        for seed in (1, 2, 3):
            rows = _crash_then_finish((flush, when), seed, overlap)
            assert max(rows.values()) == 1, f"duplicates after a kill at flush {flush} ({when}), seed {seed}"


def test_overlapped_flushes_commit_each_batch_only_once_it_is_durable() -> None:
    # Flushes 2 and 3 fail (ClickHouse down) while the next batch is being collected: the
    # failed batch is retried before the next intent, and every row is stored exactly once.
    kafka, table = _Kafka(partitions=3, per_partition=25), {}
    sink = _table_sink(kafka, table, seed=5, overlap=True, transient_at=(2, 3))
    sink.run(idle_exit_s=0.1)
    rows = _stored(table)
    assert set(rows) == {(p, o) for p in range(3) for o in range(25)} and max(rows.values()) == 1
    assert sink.flushes >= sink.batches + 2
    assert kafka.committed == {p: (25, "") for p in range(3)}, "the last batch was not committed as done"


def test_without_intents_the_same_kills_store_rows_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test above can fail: with the intents ignored, a replay forms other ranges, other tokens.
    monkeypatch.setattr("sinks.batching.decode_intent", lambda metadata: None)
    dupes = sum(max(_crash_then_finish((flush, "after"), seed).values()) > 1 for flush in (1, 2, 4) for seed in (1, 2))
    assert dupes > 0


# --- rows ClickHouse refuses ------------------------------------------------------------------


class _Writer:
    """A ClickHouse table that refuses rows whose value is out of range (code 469)."""

    def __init__(self, fail_code: int | None = None) -> None:
        self.tokens: dict[str, list[Any]] = {}
        self.fail_code = fail_code

    def insert(self, rows: list[list[Any]], token: str) -> None:
        if self.fail_code is not None:
            raise DatabaseError("Received ClickHouse exception, code: 241", code=self.fail_code)
        if any(abs(r[1]) > 1 for r in rows):
            raise DatabaseError(
                "Code: 469. DB::Exception: Constraint `value_range` is violated. (VIOLATED_CONSTRAINT)", code=469
            )
        self.tokens.setdefault(token, rows)


def _event_sink(writer: _Writer) -> tuple[Any, list[tuple[int, str]]]:
    from sinks.feedback_sink import EventSink

    sink = EventSink.__new__(EventSink)
    sink.clickhouse = writer
    letters: list[tuple[int, str]] = []
    sink._dead_letter = lambda msg, reason: letters.append((msg.offset(), reason))  # type: ignore[method-assign]
    return sink, letters


def test_refused_rows_are_bisected_out_and_the_rest_inserted_under_repeatable_tokens() -> None:
    msgs = [_Record(0, o) for o in range(37)]
    rows = [[m.offset(), 5.0 if m.offset() in (3, 30) else 0.5] for m in msgs]
    writer = _Writer()
    sink, letters = _event_sink(writer)
    assert sink._insert_isolating(rows, msgs, "T") == 35
    assert [o for o, _ in letters] == [3, 30]
    assert all(r.startswith("ClickHouse refused the row: code 469 (VIOLATED_CONSTRAINT)") for _, r in letters)
    stored = sorted(r[0] for rs in writer.tokens.values() for r in rs)
    assert stored == [o for o in range(37) if o not in (3, 30)]
    # A replay takes the same path: the same tokens, so ClickHouse drops every repeat.
    again, _ = _event_sink(_Writer())
    again._insert_isolating(rows, msgs, "T")
    assert set(again.clickhouse.tokens) == set(writer.tokens)


def test_a_server_failure_is_transient_and_never_dead_letters() -> None:
    from sinks.feedback_sink import refused

    sink, letters = _event_sink(_Writer(fail_code=241))  # MEMORY_LIMIT_EXCEEDED, an HTTP 500
    with pytest.raises(TransientError):
        sink._insert_isolating([[0, 0.5], [1, 5.0]], [_Record(0, 0), _Record(0, 1)], "T")
    assert letters == []
    assert refused(DatabaseError("x", code=469)) and refused(DatabaseError("x", code=41))
    assert not refused(DatabaseError("x", code=252)) and not refused(DatabaseError("x", code=60))
    assert refused(DatabaseError("HTTP driver received HTTP status 400"))
    assert not refused(DatabaseError("HTTP driver received HTTP status 503"))
