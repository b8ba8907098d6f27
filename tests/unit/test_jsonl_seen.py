"""The JSONL writer's seen-set: one line per event id, whatever is re-sent or killed, in bounded state."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from producers.synthetic import generate_events
from schemas.serde import AvroSerde
from sinks import jsonl
from sinks.jsonl import JsonlWriter, Ledger, SeenIds, id_key


def _records(n: int, seed: int, day: str = "2026-11-22") -> list[dict[str, Any]]:
    serde = AvroSerde()
    micros = int(datetime.fromisoformat(f"{day}T12:00:00+00:00").timestamp() * 1e6)
    return [serde.decode(serde.encode({**e.to_avro(), "ts": micros})) for e in generate_events(n, seed=seed)]


def _ids(folder: Path) -> Counter[str]:
    found: Counter[str] = Counter()
    for path in sorted(folder.glob("feedback-*.jsonl")):
        found.update(orjson.loads(line)["event_id"] for line in path.read_bytes().splitlines())
    return found


def _journal(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".seen-*.bin"))


def test_a_re_sent_event_id_is_written_once_across_restarts(tmp_path: Path) -> None:
    first, second = _records(6, seed=1), _records(4, seed=2)
    writer = JsonlWriter(tmp_path)
    assert writer.write(first + first[:2], {("clean", 0): 8}, at_ms=1_000) == 6  # repeats inside a batch too
    writer.close()
    writer = JsonlWriter(tmp_path)  # a restarted sink: the set is rebuilt from the journal
    assert len(writer.seen) == 6
    # A worker re-sent first[3:] at new offsets, among new events.
    assert writer.write(first[3:] + second, {("clean", 0): 15}, at_ms=2_000) == 4
    assert writer.repeats == 3
    lines = _ids(tmp_path)
    assert set(lines) == {str(r["event_id"]) for r in first + second} and max(lines.values()) == 1
    ledger = Ledger.load(tmp_path)
    assert ledger.seen == {".seen-00000001.bin": 10 * 24}  # ten ids, 24 bytes each, committed
    assert ledger.offsets == {"clean:0": 15}


def test_a_kill_before_the_ledger_cuts_lines_and_ids_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = _records(5, seed=3)
    writer = JsonlWriter(tmp_path)
    writer.write(records[:2], {("clean", 0): 2}, at_ms=1_000)
    journal = tmp_path / ".seen-00000001.bin"
    committed = journal.read_bytes()

    class Killed(BaseException):
        pass

    def killed(self: Ledger, directory: Path) -> None:
        raise Killed

    monkeypatch.setattr(Ledger, "save", killed)
    with pytest.raises(Killed):  # lines and ids appended and fsynced, the ledger never written
        writer.write(records[2:], {("clean", 0): 5}, at_ms=2_000)
    monkeypatch.undo()
    writer.close()
    with open(journal, "ab") as fh:  # and a torn record past them
        fh.write(b"\x01" * 11)
    writer = JsonlWriter(tmp_path)
    assert journal.read_bytes() == committed and len(writer.seen) == 2
    assert writer.write(records[2:], {("clean", 0): 5}, at_ms=2_000) == 3  # the replay lands, once
    lines = _ids(tmp_path)
    assert set(lines) == {str(r["event_id"]) for r in records} and max(lines.values()) == 1


def test_an_unknown_journal_segment_is_removed_on_start(tmp_path: Path) -> None:
    JsonlWriter(tmp_path).close()
    stray = tmp_path / ".seen-00000009.bin"
    stray.write_bytes(id_key("x") + (1).to_bytes(8, "big"))
    writer = JsonlWriter(tmp_path)
    assert not stray.exists() and id_key("x") not in writer.seen


def test_the_set_is_bounded_by_count_and_old_segments_leave_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jsonl, "SEEN_SEGMENT_IDS", 10)
    writer = JsonlWriter(tmp_path, seen_max_ids=25)
    batches = [_records(10, seed=10 + i) for i in range(6)]
    for i, batch in enumerate(batches):
        assert writer.write(batch, {("clean", 0): 10 * (i + 1)}, at_ms=1_000 + i) == 10
        assert len(writer.seen) <= 25 + 10  # at most one segment over the bound, until the next write
    assert len(writer.seen) <= 25
    assert _journal(tmp_path) == sorted(Ledger.load(tmp_path).seen)  # the files are the ledger's
    assert len(_journal(tmp_path)) <= 4
    assert id_key(str(batches[-1][0]["event_id"])) in writer.seen
    assert id_key(str(batches[0][0]["event_id"])) not in writer.seen  # the oldest ids were let go
    kept = set(writer.seen.keys)
    writer.close()
    assert JsonlWriter(tmp_path, seen_max_ids=25).seen.keys == kept  # a restart decides the same


def test_the_set_is_bounded_by_the_window_in_message_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonl, "SEEN_SEGMENT_IDS", 4)
    writer = JsonlWriter(tmp_path, seen_window_s=60.0)
    old = _records(4, seed=20)
    writer.write(old, {("clean", 0): 4}, at_ms=0)
    writer.write(_records(4, seed=21), {("clean", 0): 8}, at_ms=30_000)
    assert id_key(str(old[0]["event_id"])) in writer.seen  # 30 s later: inside the window
    writer.write(_records(4, seed=22), {("clean", 0): 12}, at_ms=61_000)
    assert id_key(str(old[0]["event_id"])) not in writer.seen  # 61 s after them: out of it
    assert len(writer.seen) == 8


def test_an_erased_event_re_sent_stays_erased(tmp_path: Path) -> None:
    serde = AvroSerde()
    records = [serde.decode(serde.encode({**r, "user_id": "alice"})) for r in _records(2, seed=30)]
    writer = JsonlWriter(tmp_path)
    writer.write(records, {("clean", 0): 2}, at_ms=1_000)
    assert writer.erase({"alice"}) == {"feedback-2026-11-22.jsonl": 2}
    assert writer.write(records, {("clean", 0): 4}, at_ms=2_000) == 0
    assert _ids(tmp_path) == Counter()


def test_seen_ids_expire_keeps_the_segment_being_written() -> None:
    seen = SeenIds(window_ms=10, max_ids=1)
    seen.add(".seen-00000001.bin", b"".join(id_key(str(i)) + (0).to_bytes(8, "big") for i in range(3)))
    assert seen.expire() == [] and len(seen) == 3  # over the bound, but the only segment
    seen.add(".seen-00000002.bin", id_key("new") + (100).to_bytes(8, "big"))
    assert seen.expire() == [".seen-00000001.bin"] and seen.keys == {id_key("new")}
    with pytest.raises(ValueError, match="window and max_ids must be positive"):
        SeenIds(window_ms=0, max_ids=1)
