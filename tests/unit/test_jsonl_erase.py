"""One writer per JSONL folder, and GDPR erasure of a user's lines from the day files (pure: files only)."""

from __future__ import annotations

import errno
import gzip
import logging
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.errors import TransientError
from producers.synthetic import generate_events
from schemas.serde import AvroSerde
from sinks.jsonl import (
    ERASE_TMP,
    ERASURE_DIR,
    LEDGER,
    WRITER_LOCK,
    JsonlWriter,
    Ledger,
    WriterBusy,
    apply_erasure_requests,
    erase_offline,
    erase_users,
    erasure_receipt,
    find_user_lines,
    request_erasure,
)


def test_a_second_writer_on_the_same_folder_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    first = JsonlWriter(tmp_path)
    with pytest.raises(WriterBusy, match=f"another JSONL writer holds {tmp_path / WRITER_LOCK}"):
        JsonlWriter(tmp_path)
    assert isinstance(WriterBusy("x"), RuntimeError)
    other = JsonlWriter(tmp_path / "elsewhere")  # another folder has its own lock
    other.close()
    first.close()
    first.close()  # idempotent
    second = JsonlWriter(tmp_path)
    assert (tmp_path / WRITER_LOCK).read_text().strip() == str(os.getpid())
    del second  # a writer that is dropped releases the lock too (as a dead process does)
    with JsonlWriter(tmp_path):
        pass
    JsonlWriter(tmp_path).close()


def test_the_lock_is_refused_to_another_process(tmp_path: Path) -> None:
    code = "import sys; from pathlib import Path; from sinks.jsonl import JsonlWriter, WriterBusy\n"
    code += "try:\n    JsonlWriter(Path(sys.argv[1]))\nexcept WriterBusy:\n    sys.exit(3)\n"
    with JsonlWriter(tmp_path):
        busy = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=Path(__file__).parents[2], check=False)
    free = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=Path(__file__).parents[2], check=False)
    assert (busy.returncode, free.returncode) == (3, 0)


# --- erasure -------------------------------------------------------------------------------

ALICE, ALICE_PSEUDONYM = "alice", "p-6f1d0c2a9b"
ERASED = {ALICE, ALICE_PSEUDONYM}
_FAR = datetime.now(UTC) + timedelta(days=365)  # long after the files were written: they are quiet
_TODAY = date(2026, 11, 23)


class _Killed(BaseException):
    """A SIGKILL, as far as the code under test can tell: nothing catches it."""


def _failing_rename(
    monkeypatch: pytest.MonkeyPatch, error: BaseException, *, src_end: str = "", dst_end: str = ""
) -> Callable[[], None]:
    """``os.replace`` raises ``error`` for a rename from a path ending in ``src_end`` (or to one
    ending in ``dst_end``) and renames anything else; returns the undo."""
    real = os.replace

    def replace(src: Any, dst: Any) -> None:
        if (src_end and str(src).endswith(src_end)) or (dst_end and str(dst).endswith(dst_end)):
            raise error
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return lambda: monkeypatch.setattr(os, "replace", real)


def _records(users: list[str | None], day: str, seed: int = 5) -> list[dict[str, Any]]:
    serde = AvroSerde()
    micros = int(datetime.fromisoformat(f"{day}T12:00:00+00:00").timestamp() * 1e6)
    events = generate_events(len(users), seed=seed)
    return [
        serde.decode(serde.encode({**e.to_avro(), "ts": micros, "user_id": u}))
        for e, u in zip(events, users, strict=True)
    ]


def _lines(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return (gzip.decompress(data) if path.name.endswith(".gz") else data).splitlines(keepends=True)


def _members(path: Path) -> int:
    data, n = path.read_bytes(), 0
    while data:
        d = zlib.decompressobj(31)
        d.decompress(data)
        data, n = d.unused_data, n + 1
    return n


def _user(line: bytes) -> Any:
    return orjson.loads(line)["user_id"]


def _folder(tmp_path: Path) -> JsonlWriter:
    """A ``.gz`` of two members (a day compressed, then late events compressed onto it), a closed
    ``.jsonl`` day and today's: alice's lines under both her ids among other users' lines,
    including bob's line whose comment mentions her, and a user whose id merely contains hers."""
    writer = JsonlWriter(tmp_path)
    writer.write(_records(["bob", ALICE, "carol", None, ALICE_PSEUDONYM, "bob"], "2026-11-20"), {("clean", 0): 6})
    writer.housekeep(today=_TODAY, now=_FAR)
    writer.write(_records([ALICE, "dave", "alice-2"], "2026-11-20", seed=6), {("clean", 0): 9})
    writer.housekeep(today=_TODAY, now=_FAR)
    mention = _records(["bob"], "2026-11-22", seed=8)
    mention[0]["payload"]["comment"] = f"ask {ALICE} about it"
    writer.write(_records([ALICE, "carol", ALICE], "2026-11-22", seed=7) + mention, {("clean", 0): 13})
    writer.write(_records(["erin", "frank"], "2026-11-23", seed=9), {("clean", 0): 15})
    assert _members(tmp_path / "feedback-2026-11-20.jsonl.gz") == 2
    assert sorted(p.name for p in tmp_path.glob("feedback-*")) == [
        "feedback-2026-11-20.jsonl.gz",
        "feedback-2026-11-22.jsonl",
        "feedback-2026-11-23.jsonl",
    ]
    return writer


def _day_files(directory: Path) -> dict[str, list[bytes]]:
    return {p.name: _lines(p) for p in sorted(directory.glob("feedback-*"))}


def _without_alice(files: dict[str, list[bytes]]) -> dict[str, list[bytes]]:
    return {name: [line for line in lines if _user(line) not in ERASED] for name, lines in files.items()}


def _assert_ledger_matches_the_files(directory: Path) -> None:
    ledger = Ledger.load(directory)
    sizes = {p.name: p.stat().st_size for p in directory.glob("feedback-*")}
    assert {**ledger.lengths, **ledger.gz} == sizes
    assert ledger.erasing == {}
    assert not list(directory.glob("*.tmp"))


def test_erase_removes_exactly_the_users_lines_from_jsonl_and_multi_member_gz(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    writer = _folder(tmp_path)
    before = _day_files(tmp_path)
    assert find_user_lines(tmp_path, ERASED) == {
        "feedback-2026-11-20.jsonl.gz": 4,  # alice, her pseudonym, alice again, and alice-2 (a substring)
        "feedback-2026-11-22.jsonl": 3,  # twice alice, and bob's comment that names her
    }
    assert find_user_lines(tmp_path, {ALICE_PSEUDONYM}) == {"feedback-2026-11-20.jsonl.gz": 1}

    assert writer.erase(ERASED) == {"feedback-2026-11-20.jsonl.gz": 3, "feedback-2026-11-22.jsonl": 2}

    after = _day_files(tmp_path)
    assert after == _without_alice(before)  # every other line byte for byte, in order
    assert [_user(line) for line in after["feedback-2026-11-20.jsonl.gz"]] == [
        "bob",
        "carol",
        None,
        "bob",
        "dave",
        "alice-2",
    ]
    assert [_user(line) for line in after["feedback-2026-11-22.jsonl"]] == ["carol", "bob"]
    assert after["feedback-2026-11-23.jsonl"] == before["feedback-2026-11-23.jsonl"]
    assert _members(tmp_path / "feedback-2026-11-20.jsonl.gz") == 1
    _assert_ledger_matches_the_files(tmp_path)
    assert writer.ledger.lengths == Ledger.load(tmp_path).lengths and writer.ledger.gz == Ledger.load(tmp_path).gz
    assert Ledger.load(tmp_path).offsets == {"clean:0": 15}  # erasure never moves the offsets
    # What is left: a longer id that contains hers, and another user's text that names her.
    assert find_user_lines(tmp_path, ERASED) == {"feedback-2026-11-20.jsonl.gz": 1, "feedback-2026-11-22.jsonl": 1}
    assert find_user_lines(tmp_path, {ALICE_PSEUDONYM}) == {}

    assert writer.erase(ERASED) == {}  # idempotent
    assert _day_files(tmp_path) == after

    # The sink writes on after an erasure: appended after the rewritten lines, and committed.
    late = _records(["gina", ALICE], "2026-11-22", seed=10)
    writer.write(late, {("clean", 0): 17})
    lines = _lines(tmp_path / "feedback-2026-11-22.jsonl")
    assert lines[:2] == after["feedback-2026-11-22.jsonl"]
    assert [orjson.loads(line)["event_id"] for line in lines[2:]] == [r["event_id"] for r in late]
    _assert_ledger_matches_the_files(tmp_path)
    writer.close()
    assert JsonlWriter(tmp_path).erase({ALICE}) == {"feedback-2026-11-22.jsonl": 1}  # after a restart too
    assert "jsonl_erased files=2 lines=5" in caplog.text  # counts only: no ids, no lines
    assert ALICE not in caplog.text and ALICE_PSEUDONYM not in caplog.text and "carol" not in caplog.text


def test_erase_looks_only_at_committed_lines_and_leaves_the_rest_where_it_is(tmp_path: Path) -> None:
    writer = JsonlWriter(tmp_path)
    writer.write(_records(["bob", "carol"], "2026-11-22"))
    day = tmp_path / "feedback-2026-11-22.jsonl"
    tail = orjson.dumps({"user_id": ALICE}) + b"\n" + b'{"user_id": "ali'  # a batch in flight: not committed
    with open(day, "ab") as fh:
        fh.write(tail)
    data = day.read_bytes()
    assert erase_users(tmp_path, writer.ledger, ERASED) == {}
    assert day.read_bytes() == data

    # With committed lines to erase, the uncommitted bytes follow the rewrite unchanged.
    writer.close()
    writer = JsonlWriter(tmp_path)  # cuts the tail
    writer.write(_records([ALICE, "dave"], "2026-11-22", seed=6))
    kept = [line for line in _lines(day) if _user(line) != ALICE]
    with open(day, "ab") as fh:
        fh.write(tail)
    assert erase_users(tmp_path, writer.ledger, ERASED) == {day.name: 1}
    assert day.read_bytes() == b"".join(kept) + tail
    assert Ledger.load(tmp_path).lengths[day.name] == len(b"".join(kept))
    writer.close()
    JsonlWriter(tmp_path).close()  # a restart cuts the tail: nothing uncommitted is ever kept
    assert day.read_bytes() == b"".join(kept)


def test_erase_matches_the_user_id_field_exactly_whatever_its_characters(tmp_path: Path) -> None:
    writer = JsonlWriter(tmp_path)
    odd = ['quo"te\\back', "ünïcødé", "tab\there"]
    lines = [orjson.dumps({"user_id": u, "n": i}) + b"\n" for i, u in enumerate([*odd, "other", None])]
    lines.append(b"not json but names " + odd[1].encode() + b"\n")  # not a user's line: kept
    day = tmp_path / "feedback-2026-11-22.jsonl"
    day.write_bytes(b"".join(lines))
    writer.ledger.lengths[day.name] = day.stat().st_size
    writer.ledger.save(tmp_path)
    assert writer.erase(set(odd)) == {day.name: 3}
    assert day.read_bytes() == b"".join(lines[3:])
    assert writer.erase(set()) == {} and writer.erase({""}) == {}


def test_a_ledger_without_erasure_intents_still_loads_and_an_empty_one_is_not_written(tmp_path: Path) -> None:
    (tmp_path / LEDGER).write_bytes(b'{"lengths": {}, "offsets": {"clean:0": 4}, "gz": {}}')
    ledger = Ledger.load(tmp_path)
    assert ledger.erasing == {} and ledger.offsets == {"clean:0": 4}
    ledger.save(tmp_path)
    assert "erasing" not in orjson.loads((tmp_path / LEDGER).read_bytes())
    ledger.erasing["feedback-2026-11-22.jsonl"] = 10
    ledger.save(tmp_path)
    assert Ledger.load(tmp_path).erasing == {"feedback-2026-11-22.jsonl": 10}


# Erasing two files renames six times: per file the ledger's intent, the file, the ledger's commit.
_KILLS = [("fsync", 1, "before")] + [("replace", k, when) for k in range(1, 7) for when in ("before", "after")]


@pytest.mark.parametrize(("call", "k", "when"), _KILLS)
def test_a_kill_at_any_step_of_an_erasure_leaves_each_file_old_or_new_and_the_ledger_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, call: str, k: int, when: str
) -> None:
    writer = _folder(tmp_path)
    old = _day_files(tmp_path)
    new = _without_alice(old)
    real = getattr(os, call)
    calls = {"n": 0}

    def step(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == k and when == "before":
            raise _Killed
        result = real(*args, **kwargs)
        if calls["n"] == k:
            raise _Killed
        return result

    monkeypatch.setattr(os, call, step)
    with pytest.raises(_Killed):
        writer.erase(ERASED)
    monkeypatch.setattr(os, call, real)
    writer.close()  # the process is gone, and its lock with it

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sinks.jsonl"):
        restarted = JsonlWriter(tmp_path)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    files = _day_files(tmp_path)
    assert set(files) == set(old)
    for name, lines in files.items():
        assert lines in (old[name], new[name]), name  # never a mix
    _assert_ledger_matches_the_files(tmp_path)
    assert Ledger.load(tmp_path).offsets == {"clean:0": 15}

    restarted.erase(ERASED)  # run again (the request is still pending): finishes the job
    assert _day_files(tmp_path) == new
    _assert_ledger_matches_the_files(tmp_path)
    restarted.write(_records(["hal"], "2026-11-22", seed=11))
    assert _user(_lines(tmp_path / "feedback-2026-11-22.jsonl")[-1]) == "hal"
    _assert_ledger_matches_the_files(tmp_path)


def test_a_failed_erasure_is_undone_and_raised_as_transient(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = _folder(tmp_path)
    old = _day_files(tmp_path)
    undo = _failing_rename(monkeypatch, OSError(errno.EIO, "Input/output error"), src_end=ERASE_TMP)
    with pytest.raises(TransientError, match="cannot erase"):
        writer.erase(ERASED)
    undo()
    assert _day_files(tmp_path) == old
    _assert_ledger_matches_the_files(tmp_path)
    assert writer.erase(ERASED) == {"feedback-2026-11-20.jsonl.gz": 3, "feedback-2026-11-22.jsonl": 2}
    assert _day_files(tmp_path) == _without_alice(old)


@pytest.mark.parametrize("renamed", [False, True])
def test_a_kill_with_uncommitted_bytes_after_the_lines_still_leaves_old_or_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renamed: bool
) -> None:
    writer = JsonlWriter(tmp_path)
    writer.write(_records([ALICE, "bob", ALICE, "carol"], "2026-11-22"))
    day = tmp_path / "feedback-2026-11-22.jsonl"
    old = day.read_bytes()
    with open(day, "ab") as fh:
        fh.write(b'{"user_id": "in flight"}\n{"user_')
    real = os.replace

    def killed(src: Any, dst: Any) -> None:
        if str(src).endswith(ERASE_TMP):
            if renamed:
                real(src, dst)
            raise _Killed
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(_Killed):
        erase_users(tmp_path, writer.ledger, ERASED)
    monkeypatch.setattr(os, "replace", real)
    writer.close()
    JsonlWriter(tmp_path).close()
    expected = b"".join(line for line in old.splitlines(keepends=True) if _user(line) != ALICE) if renamed else old
    assert day.read_bytes() == expected
    _assert_ledger_matches_the_files(tmp_path)


# --- requests for a running sink -------------------------------------------------------------


def test_a_request_is_applied_by_the_writer_and_leaves_a_receipt_without_ids(tmp_path: Path) -> None:
    writer = _folder(tmp_path)
    old = _day_files(tmp_path)
    path = request_erasure(tmp_path, "req-1", ERASED)
    assert path == tmp_path / ERASURE_DIR / "req-1.json"
    assert path.stat().st_mode & 0o777 == 0o600  # it holds the ids
    request = orjson.loads(path.read_bytes())
    assert request["request_id"] == "req-1" and request["user_ids"] == sorted(ERASED)
    assert isinstance(request["requested_s"], float)
    assert erasure_receipt(tmp_path, "req-1") is None  # pending

    receipts = apply_erasure_requests(writer)
    files = {"feedback-2026-11-20.jsonl.gz": 3, "feedback-2026-11-22.jsonl": 2}
    receipt = erasure_receipt(tmp_path, "req-1")
    assert receipts == [receipt]
    assert receipt is not None and receipt["files"] == files and receipt["lines"] == 5
    assert receipt["request_id"] == "req-1" and receipt["requested_s"] == request["requested_s"]
    assert receipt["done_s"] >= receipt["requested_s"]
    assert not path.exists()
    spool_text = b"".join(p.read_bytes() for p in (tmp_path / ERASURE_DIR).iterdir())
    assert ALICE.encode() not in spool_text and ALICE_PSEUDONYM.encode() not in spool_text
    assert _day_files(tmp_path) == _without_alice(old)
    assert find_user_lines(tmp_path, {ALICE_PSEUDONYM}) == {}
    assert apply_erasure_requests(writer) == []  # nothing pending

    # Oldest first; a request for lines already gone gets a receipt with nothing in it.
    request_erasure(tmp_path, "req-3", {"carol"})
    request_erasure(tmp_path, "req-2", {ALICE})
    os.utime(tmp_path / ERASURE_DIR / "req-2.json", (1, 1))
    assert [r["request_id"] for r in apply_erasure_requests(writer)] == ["req-2", "req-3"]
    assert erasure_receipt(tmp_path, "req-2") == {**erasure_receipt(tmp_path, "req-2"), "files": {}, "lines": 0}
    assert erasure_receipt(tmp_path, "req-3")["files"] == {  # type: ignore[index]
        "feedback-2026-11-20.jsonl.gz": 1,
        "feedback-2026-11-22.jsonl": 1,
    }
    _assert_ledger_matches_the_files(tmp_path)


def test_request_ids_and_ids_are_checked(tmp_path: Path) -> None:
    for bad in ("", "a" * 65, "../x", "a.b", "a b"):
        with pytest.raises(ValueError, match="request id"):
            request_erasure(tmp_path, bad, ERASED)
        with pytest.raises(ValueError):
            erasure_receipt(tmp_path, bad)
    with pytest.raises(ValueError, match="user id"):
        request_erasure(tmp_path, "r", set())
    with pytest.raises(ValueError, match="user id"):
        request_erasure(tmp_path, "r", {""})
    assert not (tmp_path / ERASURE_DIR / "r.json").exists()
    request_erasure(tmp_path, "A-z_09", {"x"})  # the whole alphabet of ids


def test_a_malformed_request_is_set_aside_by_name_and_the_rest_still_applied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = _folder(tmp_path)
    spool = tmp_path / ERASURE_DIR
    spool.mkdir()
    (spool / "garbage.json").write_bytes(b'{"user_ids": ["alice"')
    (spool / "renamed.json").write_bytes(orjson.dumps({"request_id": "other", "user_ids": [ALICE]}))
    (spool / "empty.json").write_bytes(orjson.dumps({"request_id": "empty", "user_ids": []}))
    request_erasure(tmp_path, "good", ERASED)
    with caplog.at_level(logging.INFO, logger="sinks.jsonl"):
        receipts = apply_erasure_requests(writer)
    assert [r["request_id"] for r in receipts] == ["good"]
    assert sorted(p.name for p in spool.iterdir()) == [
        "empty.json.bad",
        "garbage.json.bad",
        "good.done.json",
        "renamed.json.bad",
    ]
    assert "jsonl_erasure_request_bad file=garbage.json" in caplog.text
    assert ALICE not in caplog.text


def test_a_request_left_by_a_kill_before_its_receipt_is_applied_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = _folder(tmp_path)
    request_erasure(tmp_path, "req", ERASED)
    undo = _failing_rename(monkeypatch, _Killed(), dst_end=".done.json")
    with pytest.raises(_Killed):
        apply_erasure_requests(writer)
    undo()
    writer.close()
    assert erasure_receipt(tmp_path, "req") is None
    restarted = JsonlWriter(tmp_path)
    (receipt,) = apply_erasure_requests(restarted)
    assert receipt["lines"] == 0 and not (tmp_path / ERASURE_DIR / "req.json").exists()
    assert find_user_lines(tmp_path, {ALICE_PSEUDONYM}) == {}


def test_a_stale_request_tmp_is_removed(tmp_path: Path) -> None:
    writer = JsonlWriter(tmp_path)
    spool = tmp_path / ERASURE_DIR
    spool.mkdir()
    stale, fresh = spool / "old.json.tmp", spool / "new.json.tmp"
    stale.write_bytes(b'{"user_ids": ["alice"]}')
    fresh.write_bytes(b"{")
    os.utime(stale, (1, 1))
    assert apply_erasure_requests(writer) == []
    assert not stale.exists() and fresh.exists()  # fresh: a request_erasure may be writing it


def test_erase_offline_takes_the_lock_or_says_a_sink_holds_it(tmp_path: Path) -> None:
    writer = _folder(tmp_path)
    old = _day_files(tmp_path)
    with pytest.raises(WriterBusy):
        erase_offline(tmp_path, ERASED)
    assert _day_files(tmp_path) == old
    writer.close()
    assert erase_offline(tmp_path, ERASED) == {"feedback-2026-11-20.jsonl.gz": 3, "feedback-2026-11-22.jsonl": 2}
    assert _day_files(tmp_path) == _without_alice(old)
    JsonlWriter(tmp_path).close()  # released again
    assert erase_offline(tmp_path / "missing", ERASED) == {}
    assert not (tmp_path / "missing").exists()


def _jsonl_sink(path: Path) -> Any:
    from pipeline.settings import Settings
    from sinks.feedback_sink import JsonlSink

    return JsonlSink(Settings(bootstrap_servers="127.0.0.1:1", path=path))


def test_the_running_sink_applies_requests_between_batches_and_releases_its_lock(tmp_path: Path) -> None:
    from sinks.feedback_sink import ERASURE_POLL_S

    _folder(tmp_path).close()
    old = _day_files(tmp_path)
    sink = _jsonl_sink(tmp_path)
    # forget's path while a sink runs: the folder is busy, so it asks.
    with pytest.raises(WriterBusy):
        erase_offline(tmp_path, ERASED)
    request_erasure(tmp_path, "r1", ERASED)
    sink.maintenance()
    assert erasure_receipt(tmp_path, "r1")["lines"] == 5  # type: ignore[index]
    assert _day_files(tmp_path) == _without_alice(old)
    request_erasure(tmp_path, "r2", {"carol"})
    sink.maintenance()  # within the poll interval: the folder is not even listed
    assert erasure_receipt(tmp_path, "r2") is None
    time.sleep(ERASURE_POLL_S + 0.05)
    sink.maintenance()
    assert erasure_receipt(tmp_path, "r2")["lines"] == 2  # type: ignore[index]
    _assert_ledger_matches_the_files(tmp_path)

    sink.stop()
    sink.run()  # stopped at once: the run ends, and with it the writer lock
    assert erase_offline(tmp_path, {"bob"}) == {"feedback-2026-11-20.jsonl.gz": 2, "feedback-2026-11-22.jsonl": 1}


def test_a_sink_whose_erasure_fails_keeps_running_and_retries_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _folder(tmp_path).close()
    sink = _jsonl_sink(tmp_path)
    request_erasure(tmp_path, "r", ERASED)
    undo = _failing_rename(monkeypatch, OSError(errno.ENOSPC, "No space left on device"), src_end=ERASE_TMP)
    with caplog.at_level(logging.WARNING):
        sink.maintenance()  # logged, never raised
    assert "jsonl_erasure_deferred retry_in_s=1.0" in caplog.text
    assert erasure_receipt(tmp_path, "r") is None and (tmp_path / ERASURE_DIR / "r.json").exists()
    undo()
    sink._erasure_due = 0.0  # the backoff has passed
    sink.maintenance()
    assert erasure_receipt(tmp_path, "r")["lines"] == 5  # type: ignore[index]
    _assert_ledger_matches_the_files(tmp_path)
    sink.close()
