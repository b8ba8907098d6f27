"""The pure parts of exactly-once sinking: batch intents, the JSONL ledger, housekeeping, Avro containers."""

from __future__ import annotations

import gzip
import io
from datetime import date, datetime
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest

from producers.synthetic import generate_events
from schemas.serde import AvroSerde, schema_text
from sinks.avro_ocf import container, zigzag
from sinks.batching import decode_intent, encode_intent
from sinks.clickhouse import AVRO_EVENT_SELECT, EVENT_COLUMNS, avro_insert_query
from sinks.jsonl import LEDGER, JsonlWriter, Ledger, housekeep


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
    assert [zigzag(n) for n in (0, -1, 1, 64)] == [b"\x00", b"\x01", b"\x02", b"\x80\x01"]


def test_avro_insert_maps_every_column() -> None:
    query = avro_insert_query("db")
    assert query.startswith("INSERT INTO `db`.feedback_events (event_id, ts,") and query.endswith("FORMAT Avro")
    assert "client_ip" not in query.split("SELECT", 1)[1].split("FROM input", 1)[0]
    assert set(AVRO_EVENT_SELECT) <= set(EVENT_COLUMNS)


def _records(n: int, day: str = "2026-11-22") -> list[dict[str, object]]:
    serde = AvroSerde()
    ts = datetime.fromisoformat(f"{day}T12:00:00+00:00")
    return [serde.decode(serde.encode({**e.to_avro(), "ts": int(ts.timestamp() * 1e6)})) for e in generate_events(n)]


def test_ledger_records_lengths_and_offsets_after_each_write(tmp_path: Path) -> None:
    writer = JsonlWriter(tmp_path)
    writer.write(_records(3), {("clean", 0): 3})
    ledger = Ledger.load(tmp_path)
    day = tmp_path / "feedback-2026-11-22.jsonl"
    assert ledger.lengths == {day.name: day.stat().st_size} and ledger.offsets == {"clean:0": 3}
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
    done = housekeep(tmp_path, writer.ledger, today=date(2026, 11, 23), compress_after_days=1, retention_days=90)
    assert done == {"compressed": ["feedback-2026-11-20.jsonl"], "removed": ["feedback-2026-08-01.jsonl"]}
    assert gzip.decompress((tmp_path / "feedback-2026-11-20.jsonl.gz").read_bytes()) == old_lines
    assert (tmp_path / "feedback-2026-11-22.jsonl").exists() and (tmp_path / "feedback-2026-11-23.jsonl").exists()
    # A late event for a compressed day is appended as a further gzip member on the next run.
    writer = JsonlWriter(tmp_path)
    late = _records(1, "2026-11-20")
    writer.write(late)
    housekeep(tmp_path, writer.ledger, today=date(2026, 11, 23))
    lines = gzip.decompress((tmp_path / "feedback-2026-11-20.jsonl.gz").read_bytes()).splitlines()
    assert len(lines) == 3 and orjson.loads(lines[-1])["event_id"] == late[0]["event_id"]
    assert "feedback-2026-11-20.jsonl" not in Ledger.load(tmp_path).lengths
    assert (tmp_path / LEDGER).exists()
    with pytest.raises(FileNotFoundError):
        (tmp_path / "feedback-2026-08-01.jsonl").stat()


class _Msg:
    def __init__(self, partition: int, offset: int) -> None:
        self._p, self._o = partition, offset

    def topic(self) -> str:
        return "clean"

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o


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
    batch: list[Any] = []
    sink._batch = batch
    for p, o in [(0, 0), (1, 5), (0, 1), (0, 1), (0, 2), (0, 3), (1, 6), (0, 4)]:
        sink._take(_Msg(p, o), batch)
    assert [(m.partition(), m.offset()) for m in batch] == [(0, 0), (1, 5), (0, 1), (0, 2), (1, 6)]
    assert [m.offset() for m in sink._carry] == [3, 4] and not sink._intents
    # A rebalance hands partition 1 back: what was collected for it is read again, not kept twice.
    sink._forget({("clean", 1)})
    assert [(m.partition(), m.offset()) for m in batch] == [(0, 0), (0, 1), (0, 2)]
    sink._take(_Msg(1, 5), batch)
    assert batch[-1].offset() == 5
