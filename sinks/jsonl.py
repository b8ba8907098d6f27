"""Daily JSONL files under ``$FEEDBACK_PATH``: ``feedback-YYYY-MM-DD.jsonl`` (UTC day of ``ts``).

Exactly once, whatever is killed when
-------------------------------------
A ledger (``.ledger.json`` beside the files) records each file's committed
length, each compressed day's committed ``.gz`` length, and the next Kafka
offset per ``topic:partition``. Bytes past a committed length do not exist as
far as the sink is concerned. The JSONL sink's steps for one batch are:

1. append the lines to their day files;
2. fsync the files (and the folder, for new files);
3. write the ledger: new lengths and the next offsets (tmp file, fsync, rename,
   fsync the folder, so the ledger is either the old one or the new one);
4. commit the offsets to Kafka (the JSONL sink's own consumer group).

ClickHouse is a separate sink with its own group (and its own exactness, see
:mod:`sinks.batching`), so an insert is never a step between these; the JSONL
files never wait for ClickHouse, and a ClickHouse outage never holds them back.

On start the writer cuts every day file back to its ledger length, removes day
files the ledger does not know, and the sink reads each partition from
``max(ledger offset, committed offset)``. A kill

* before or during 1, or between 1 and 2: the ledger is the old one, so the new
  bytes (whole lines, or a partial last line) are cut and the sink reads from
  the old offsets again: the same events are appended once more, exactly once;
* between 2 and 3 (or during 3, before the rename): the same: the lines are on
  disk but not in the ledger, so they are cut and rewritten by the replay;
* between 3 and 4: the files are exact and the ledger's offsets are ahead of
  Kafka's; reading resumes at the ledger's offsets, so nothing is written twice;
* after 4: everything agrees.

All of this assumes one writer per folder. :class:`JsonlWriter` takes an exclusive
``flock`` on ``.writer.lock`` when it is created and keeps it until :meth:`JsonlWriter.close`
(the JSONL sink closes it when its run ends; a dead process loses it with its descriptors),
so a second sink on the same ``$FEEDBACK_PATH``, or ``feedback forget`` while a sink runs,
gets :class:`WriterBusy` instead of cutting back the lines the first one is writing.

Within a running sink, a failed write (disk full, I/O error) reloads the ledger
from disk, cuts the files back the same way and raises :class:`TransientError`;
the retried batch skips offsets the ledger already covers.

Each event id once (the seen-set)
---------------------------------
The ledger makes each *message* of the clean topic land once. A worker killed after sending a
batch's events, before Kafka took its raw offsets, sends them again on restart: the same event
ids at new offsets. So the writer also remembers the ids it wrote (a 16-byte BLAKE2b digest of
each, with the batch's message time in ms) and skips a record whose id it holds: lines =
distinct ids. The ids go to a journal beside the files, ``.seen-NNNNNNNN.bin`` (24-byte
records), appended and fsynced in step 2 with the lines; the ledger records each journal
segment's committed length in step 3, so a kill cuts the journal back exactly like the day
files (a torn record is past the committed length). On start the segments are read back into
memory. Bounded two ways, whichever is smaller: a segment of :data:`SEEN_SEGMENT_IDS` ids is
dropped whole once its newest id is older than the window (the gate's dedup window,
``FEEDBACK_DEDUP_WINDOW_S``) measured from the newest id written, or once the set holds more
than ``seen_max_ids`` (:data:`SEEN_MAX_IDS`, about 100 MB). A re-sent event is at most the
worker's uncommitted batches behind its original, far fewer ids than that. A dropped segment
leaves the ledger in the next write, then its file goes (a kill in between: the file is
unknown on start and removed). Erased lines keep their ids here (digests, no personal data),
so an erased event re-sent by a worker stays erased.

Housekeeping
------------
A day before today (UTC) whose file is ``compress_after_days`` old, holds
exactly its committed length (no write in flight) and has not been written for
``quiet_s`` is gzip-compressed to ``feedback-YYYY-MM-DD.jsonl.gz``; days older
than ``retention_days`` are deleted (0 keeps them). Today's file is never
touched. Late events for a compressed day start a new ``.jsonl`` that is later
appended to the ``.gz`` as a further gzip member. Each step is crash-safe: the
new ``.gz`` is written to a tmp file from the *committed* part of the old one,
fsynced and renamed; then the ledger records its length and forgets the
``.jsonl``; then the ``.jsonl`` is removed. Killed before the ledger write, the
``.gz`` is cut back (or, if new, removed) on start and the day is compressed
again; killed after it, the left-over ``.jsonl`` is unknown and removed.
Deletions drop the ledger entries first, then the files.

Erasure (GDPR)
--------------
:func:`erase_users` removes every committed line whose ``user_id`` is one of a set of ids
(the id as sent and its pseudonym) from the ``.jsonl`` and ``.gz`` days; only the holder of
the writer lock may run it. A file with such lines is rewritten without them to
``<name>.erase.tmp`` (a ``.gz`` as one gzip member) and fsynced; the ledger records the
intent (``erasing``: name → new length); the tmp is renamed over the file and the folder
fsynced; the ledger records the new length and drops the intent. On start a kill

* before the intent is on disk: the ledger is the old one and the tmp is removed;
* after it, before the rename (the tmp is still there): the intent is dropped, the old file
  kept, the tmp removed;
* after the rename, before the last ledger write: the file has the recorded new length, and
  that length is adopted as committed;

so each file is either the old one or the new one, and erasing again finishes the job
(it is idempotent). Without a sink, ``feedback forget`` takes the lock itself
(:func:`erase_offline`). A running sink holds the lock, so forget drops a request into
``.erasure/`` instead (:func:`request_erasure`, mode 0600: it holds the ids) and polls for
its receipt (:func:`erasure_receipt`); the sink applies the requests between two batches
(:func:`apply_erasure_requests`, from its maintenance): erase, write the receipt (counts per
file, no ids), delete the request. Killed before the receipt, it erases again (nothing left
to find) on its next start. Nothing here logs ids or lines, only counts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import hashlib
import io
import logging
import os
import re
import shutil
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import PipelineError, TransientError
from pipeline.private_files import open_private, private_dir, private_fd, tighten_tree
from schemas.models import format_ts

__all__ = [
    "ERASURE_DIR",
    "LEDGER",
    "SEEN_MAX_IDS",
    "SEEN_SEGMENT_IDS",
    "WRITER_LOCK",
    "JsonlWriter",
    "Ledger",
    "SeenIds",
    "WriterBusy",
    "apply_erasure_requests",
    "erase_offline",
    "erase_users",
    "erasure_receipt",
    "event_json",
    "file_for",
    "find_user_lines",
    "housekeep",
    "id_key",
    "request_erasure",
]

log = logging.getLogger(__name__)

LEDGER = ".ledger.json"
WRITER_LOCK = ".writer.lock"
ERASE_TMP = ".erase.tmp"  # suffix of a day file's rewrite in progress
ERASURE_DIR = ".erasure"  # erasure requests for the running sink, and its receipts
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_RECEIPT = ".done.json"
_STALE_TMP_S = 60.0  # a request's tmp file this old belongs to a request_erasure that died
_DAY_FILE = re.compile(r"^feedback-(\d{4}-\d{2}-\d{2})\.jsonl(\.gz)?$")
_CHUNK = 1 << 20
_SEEN_FILE = re.compile(r"^\.seen-(\d{8})\.bin$")
_SEEN_RECORD = 24  # a 16-byte id digest, then the batch's message time in ms (8 bytes, big-endian)
SEEN_MAX_IDS = 1_000_000  # ids remembered at most (~100 MB in memory, 24 MB of journal)
SEEN_SEGMENT_IDS = 125_000  # ids per journal segment: the unit that is dropped
DEFAULT_SEEN_WINDOW_S = 24 * 3600.0  # the gate's default dedup window


class WriterBusy(PipelineError, RuntimeError):
    """Another JSONL writer (a running sink, or ``feedback forget``) holds the folder's lock."""


def _lock_folder(directory: Path) -> int:
    """Take the folder's writer lock (exclusive, non-blocking ``flock``); the open descriptor holds it."""
    path = directory / WRITER_LOCK
    fd = private_fd(path, "r+")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WriterBusy(f"another JSONL writer holds {path}: one writer per folder") from None
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):  # for an operator wondering who holds it; the lock is the flock
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def file_for(directory: Path, ts: datetime) -> Path:
    """The daily file an event with timestamp ``ts`` belongs to."""
    return directory / f"feedback-{ts.strftime('%Y-%m-%d')}.jsonl"


def event_json(record: dict[str, Any]) -> dict[str, Any]:
    """The JSON line for a decoded Avro record: flat payload, UTC text timestamp, no client_ip."""
    payload = record["payload"]
    flat = {k: payload[k] for k in ("text", "comment", "corrected_response") if payload[k] is not None}
    flat.update(payload["extra"])
    out = {k: v for k, v in record.items() if k not in ("payload", "client_ip")}
    out["ts"] = format_ts(record["ts"])
    out["payload"] = flat
    return out


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _truncate(path: Path, length: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(length)
        os.fsync(fh.fileno())


def _complete_length(path: Path) -> int:
    """The length of ``path`` up to and including its last newline (0 if none)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        end = size
        while end > 0:
            start = max(0, end - _CHUNK)
            fh.seek(start)
            chunk = fh.read(end - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                return start + nl + 1
            end = start
    return 0


def id_key(event_id: str) -> bytes:
    """The seen-set's key of an event id: its 16-byte BLAKE2b digest (any id, any length)."""
    return hashlib.blake2b(event_id.encode(), digest_size=16).digest()


def _seen_name(seq: int) -> str:
    return f".seen-{seq:08d}.bin"


class SeenIds:
    """The ids written lately, held per journal segment (name → records), bounded by time and count.

    Pure bookkeeping, no I/O: the writer appends to the journal and calls :meth:`add` once the
    ledger has it. :meth:`expire` decides which segments to drop from the data alone (their
    newest time against the newest of all, and the count), so a restart that reloads the same
    journal decides the same. The last segment is never dropped: it is the one being written.
    """

    def __init__(self, window_ms: int, max_ids: int) -> None:
        if window_ms <= 0 or max_ids <= 0:
            raise ValueError("the seen-set's window and max_ids must be positive")
        self.window_ms = window_ms
        self.max_ids = max_ids
        self.keys: set[bytes] = set()
        self.segments: dict[str, tuple[int, int]] = {}  # name → (ids, newest ms), in name order
        self._blobs: dict[str, list[bytes]] = {}
        self.newest_ms = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self.keys

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, name: str, blob: bytes) -> None:
        """Take the whole records of ``blob`` (as appended to segment ``name``) into the set."""
        n = len(blob) // _SEEN_RECORD
        if not n:
            return
        view = memoryview(blob)
        newest = 0
        for i in range(0, n * _SEEN_RECORD, _SEEN_RECORD):
            self.keys.add(bytes(view[i : i + 16]))
            newest = max(newest, int.from_bytes(view[i + 16 : i + _SEEN_RECORD], "big"))
        ids, seg_newest = self.segments.get(name, (0, 0))
        self.segments[name] = (ids + n, max(seg_newest, newest))
        self._blobs.setdefault(name, []).append(bytes(blob[: n * _SEEN_RECORD]))
        self.newest_ms = max(self.newest_ms, newest)

    def expire(self) -> list[str]:
        """Drop the oldest segments while the set holds more than ``max_ids``, or while the oldest
        one's newest id is more than ``window_ms`` older than the newest id; returns their names."""
        dropped: list[str] = []
        while len(self.segments) > 1:
            name = next(iter(self.segments))
            newest = self.segments[name][1]
            if len(self.keys) <= self.max_ids and newest >= self.newest_ms - self.window_ms:
                break
            for blob in self._blobs.pop(name):
                view = memoryview(blob)
                for i in range(0, len(blob), _SEEN_RECORD):
                    self.keys.discard(bytes(view[i : i + 16]))
            del self.segments[name]
            dropped.append(name)
        return dropped


@dataclass
class Ledger:
    """Committed file lengths (``.jsonl`` and ``.gz``) and the next offset per ``topic:partition``.

    ``found`` is False when no ledger file existed (a new folder, or a lost ledger: then the
    files present are adopted rather than deleted). ``has_gz`` is False for a ledger written
    before compressed lengths were recorded (its ``.gz`` files are adopted as they are).
    ``erasing`` names the day files being rewritten by :func:`erase_users` with their new
    committed length (the intent :meth:`JsonlWriter.recover` settles after a crash). ``seen``:
    the committed length of each segment of the id journal (see the module docstring).
    """

    lengths: dict[str, int] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)
    gz: dict[str, int] = field(default_factory=dict)
    found: bool = True
    has_gz: bool = True
    erasing: dict[str, int] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)  # journal segment → committed length

    @classmethod
    def load(cls, directory: Path) -> Ledger:
        path = directory / LEDGER
        if not path.exists():
            return cls(found=False)
        data = orjson.loads(path.read_bytes())
        return cls(
            dict(data.get("lengths", {})),
            dict(data.get("offsets", {})),
            dict(data.get("gz", {})),
            found=True,
            has_gz="gz" in data,
            erasing=dict(data.get("erasing", {})),
            seen=dict(data.get("seen", {})),
        )

    def save(self, directory: Path) -> None:
        """Replace the ledger atomically: tmp file, fsync, rename, fsync the folder."""
        tmp = directory / f"{LEDGER}.tmp"
        data: dict[str, Any] = {"lengths": self.lengths, "offsets": self.offsets, "gz": self.gz, "seen": self.seen}
        if self.erasing:
            data["erasing"] = self.erasing
        with open_private(tmp, "wb") as fh:
            fh.write(orjson.dumps(data, option=orjson.OPT_SORT_KEYS))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, directory / LEDGER)
        _fsync_dir(directory)
        self.found = self.has_gz = True


class JsonlWriter:
    """Appends events to their day's file; durable and recorded in the ledger on return.

    The only writer of its folder: it holds ``<dir>/.writer.lock`` (``flock``) from construction
    until :meth:`close` (or until it is garbage-collected, or the process dies); a second writer
    on the same folder, in this process or another, gets :class:`WriterBusy`.
    """

    _lock_fd: int | None = None

    def __init__(
        self, directory: Path, *, seen_window_s: float = DEFAULT_SEEN_WINDOW_S, seen_max_ids: int = SEEN_MAX_IDS
    ) -> None:
        self.directory = private_dir(directory)
        self._lock_fd = _lock_folder(self.directory)  # before anything is cut back or rewritten
        try:
            tighten_tree(self.directory)  # files from before they were private, or copied in
            self.ledger = Ledger.load(self.directory)
            self._dirty = False
            self._seen_window_ms = max(1, round(seen_window_s * 1000))
            self._seen_max_ids = seen_max_ids
            self.repeats = 0  # records skipped because their event id was written already
            self.recover()
            if not (self.directory / LEDGER).exists():
                # From now on a file the ledger does not know holds nothing committed.
                self.ledger.save(self.directory)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the folder's writer lock (idempotent). The writer must not write afterwards."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the process releases it anyway
            self.close()

    def recover(self) -> list[str]:
        """Cut every file back to its committed length; remove day files the ledger never saw.

        Without a ledger (a new folder, or a lost ledger) the files present are adopted up
        to their last complete line instead. Returns the names of the files changed.
        """
        ledger = self.ledger
        adopt = not ledger.found
        if adopt and any(self.directory.glob("feedback-*")):
            log.warning("jsonl_ledger_missing dir=%s adopting=existing files", self.directory)
        changed: list[str] = []
        dirty = False
        if ledger.erasing:  # before the tmp files go: a rewrite's tmp says it was never renamed
            self._settle_erasures()
        for tmp in self.directory.glob("*.tmp"):  # never renamed: never committed
            tmp.unlink()
        for path in sorted(self.directory.glob("feedback-*.jsonl")):
            if not _DAY_FILE.match(path.name):
                continue
            size = path.stat().st_size
            committed = ledger.lengths.get(path.name)
            if committed is None and not adopt:
                path.unlink()
                changed.append(path.name)
                continue
            if committed is None or committed > size:
                if committed is not None:  # lost bytes the ledger says were fsynced: keep whole lines
                    log.error("jsonl_shorter_than_ledger file=%s size=%d ledger=%d", path.name, size, committed)
                committed = ledger.lengths[path.name] = _complete_length(path)
                dirty = True
            if size != committed:
                _truncate(path, committed)
                changed.append(path.name)
        for name in [n for n in ledger.lengths if not (self.directory / n).exists()]:
            del ledger.lengths[name]
            dirty = True
        for path in sorted(self.directory.glob("feedback-*.jsonl.gz")):
            size = path.stat().st_size
            committed = ledger.gz.get(path.name)
            if committed is None:
                if not adopt and ledger.has_gz and path.name.removesuffix(".gz") in ledger.lengths:
                    path.unlink()  # a first compression killed before its ledger write; the .jsonl stays
                    changed.append(path.name)
                else:
                    ledger.gz[path.name] = size
                    dirty = True
            elif size > committed:  # a further member killed before its ledger write
                _truncate(path, committed)
                changed.append(path.name)
            elif size < committed:
                log.error("jsonl_gz_shorter_than_ledger file=%s size=%d ledger=%d", path.name, size, committed)
                ledger.gz[path.name] = size
                dirty = True
        for name in [n for n in ledger.gz if not (self.directory / n).exists()]:
            del ledger.gz[name]
            dirty = True
        dirty = self._recover_seen(adopt, changed) or dirty
        if changed:
            _fsync_dir(self.directory)
            log.warning("jsonl_recovered files=%s", ",".join(changed))
        if dirty and ledger.found:
            ledger.save(self.directory)
        self._dirty = False
        self._load_seen()
        return changed

    def _recover_seen(self, adopt: bool, changed: list[str]) -> bool:
        """Cut the id journal's segments back to their committed length (whole records) and
        remove the ones the ledger does not know; without a ledger, adopt their whole records.
        Returns True if the ledger changed."""
        ledger = self.ledger
        dirty = False
        for path in sorted(self.directory.glob(".seen-*.bin")):
            if not _SEEN_FILE.match(path.name):
                continue
            size = path.stat().st_size
            committed = ledger.seen.get(path.name)
            if committed is None and not adopt:
                path.unlink()
                changed.append(path.name)
                continue
            if committed is None or committed > size:
                if committed is not None:
                    log.error("jsonl_seen_shorter_than_ledger file=%s size=%d ledger=%d", path.name, size, committed)
                committed = ledger.seen[path.name] = size - size % _SEEN_RECORD
                dirty = True
            if size != committed:
                _truncate(path, committed)
                changed.append(path.name)
        for name in [n for n in ledger.seen if not (self.directory / n).exists()]:
            del ledger.seen[name]
            dirty = True
        return dirty

    def _load_seen(self) -> None:
        """Rebuild the seen-set from the journal's committed records, oldest segment first."""
        seen = SeenIds(self._seen_window_ms, self._seen_max_ids)
        for name in sorted(self.ledger.seen):
            with open(self.directory / name, "rb") as fh:
                seen.add(name, fh.read(self.ledger.seen[name]))
        self._seen_gone = seen.expire()  # left in the ledger until the next write drops them
        self.seen = seen

    def _seen_segment(self) -> str:
        """The journal segment the next ids go to: the last one until it holds SEEN_SEGMENT_IDS."""
        names = sorted(self.ledger.seen)
        if names and self.ledger.seen[names[-1]] < SEEN_SEGMENT_IDS * _SEEN_RECORD:
            return names[-1]
        last = _SEEN_FILE.match(names[-1]) if names else None
        return _seen_name(int(last.group(1)) + 1 if last else 1)

    def _settle_erasures(self) -> None:
        """Finish or forget the rewrites :func:`erase_users` recorded but did not commit.

        The rewrite's tmp file still there: it was never renamed, the old file is in place, the
        intent is dropped. Otherwise the file is the rewritten one when its size is the recorded
        new length (adopted), or when it is not its old committed length either (renamed, with an
        uncommitted tail that the cut-back below removes). The ledger is saved before the tmp
        files are removed, so a kill in between cannot leave an intent without its tmp file.
        """
        ledger = self.ledger
        adopted = 0
        for name, new_length in sorted(ledger.erasing.items()):
            path = self.directory / name
            table = ledger.gz if name.endswith(".gz") else ledger.lengths
            if not path.exists() or (self.directory / f"{name}{ERASE_TMP}").exists():
                continue
            size = path.stat().st_size
            if size == new_length or size != table.get(name):
                table[name] = new_length
                adopted += 1
        log.warning("jsonl_erasure_settled intents=%d completed=%d", len(ledger.erasing), adopted)
        ledger.erasing.clear()
        ledger.save(self.directory)

    def _rollback(self) -> None:
        """After a failed write or housekeeping step: the ledger on disk is the truth again."""
        self.ledger = Ledger.load(self.directory)
        self.recover()

    def next_offsets(self) -> dict[tuple[str, int], int]:
        """Where reading must resume for the files to stay exact: ``(topic, partition) → offset``."""
        out = {}
        for key, offset in self.ledger.offsets.items():
            topic, _, partition = key.rpartition(":")
            out[(topic, int(partition))] = offset
        return out

    def write(
        self,
        records: list[dict[str, Any]],
        offsets: dict[tuple[str, int], int] | None = None,
        at_ms: int | None = None,
    ) -> int:
        """Append one line per record whose event id is not in the seen-set (nor earlier in
        ``records``), grouped by day; journal the ids; fsync; then record lengths and
        ``offsets`` (the next offset per partition) in the ledger. ``at_ms``: the batch's
        message time (the seen-set's clock; default now). Returns the lines written.

        Raises :class:`TransientError` if the disk fails; the files are cut back to the
        ledger first, so a retry of the same batch leaves them exact.
        """
        with self._undone_on_disk_error("jsonl_write_failed", "cannot write JSONL files"):
            return self._write(records, offsets, at_ms)

    @contextlib.contextmanager
    def _undone_on_disk_error(self, event: str, what: str) -> Iterator[None]:
        """Run a change to the files from the ledger on disk; on an ``OSError`` cut the files back
        to it and raise :class:`TransientError`, so the change can simply be tried again."""
        try:
            if self._dirty:
                self._rollback()
            yield
        except OSError as exc:
            self._dirty = True
            log.error("%s dir=%s error=%s", event, self.directory, exc.strerror or type(exc).__name__)
            with contextlib.suppress(OSError):  # if this fails too, it is tried again before the next change
                self._rollback()
            raise TransientError(f"{what}: {exc.strerror or type(exc).__name__}") from None

    def _write(
        self, records: list[dict[str, Any]], offsets: dict[tuple[str, int], int] | None, at_ms: int | None
    ) -> int:
        stamp = (int(time.time() * 1000) if at_ms is None else at_ms).to_bytes(8, "big")
        by_file: dict[Path, list[bytes]] = defaultdict(list)
        journal: list[bytes] = []
        batch: set[bytes] = set()
        seen = self.seen
        for record in records:
            key = id_key(str(record["event_id"]))
            if key in seen or key in batch:
                self.repeats += 1
                continue
            batch.add(key)
            journal.append(key + stamp)
            by_file[file_for(self.directory, record["ts"])].append(orjson.dumps(event_json(record)))
        for path, lines in by_file.items():
            with open_private(path, "ab") as fh:
                fh.write(b"\n".join(lines) + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
                self.ledger.lengths[path.name] = fh.tell()
        segment, blob = self._seen_segment(), b"".join(journal)
        if blob:
            with open_private(self.directory / segment, "ab") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
                self.ledger.seen[segment] = fh.tell()
        if by_file:
            _fsync_dir(self.directory)  # new files must survive a crash too
        for (topic, partition), offset in (offsets or {}).items():
            self.ledger.offsets[f"{topic}:{partition}"] = offset
        gone, self._seen_gone = self._seen_gone, []
        for name in gone:  # dropped from memory earlier: now from the ledger, then from the disk
            self.ledger.seen.pop(name, None)
        if by_file or offsets or gone:
            self.ledger.save(self.directory)
        for name in gone:
            (self.directory / name).unlink(missing_ok=True)
        if blob:
            seen.add(segment, blob)
            self._seen_gone = seen.expire()
        return len(journal)

    def housekeep(self, **kwargs: Any) -> dict[str, list[str]]:
        """:func:`housekeep` on this folder; a failure is logged and undone, never raised."""
        try:
            if self._dirty:
                self._rollback()
            return housekeep(self.directory, self.ledger, **kwargs)
        except OSError as exc:
            self._dirty = True
            log.error("jsonl_housekeeping_failed dir=%s error=%s", self.directory, exc.strerror or type(exc).__name__)
            return {"compressed": [], "removed": []}

    def erase(self, user_ids: set[str]) -> dict[str, int]:
        """:func:`erase_users` on this folder: ``{file name: lines removed}`` for the files rewritten.

        Raises :class:`TransientError` if the disk fails; the ledger on disk is reloaded and the
        files recovered first (each file is then either the old or the rewritten one), so the
        (idempotent) erasure can simply be run again.
        """
        with self._undone_on_disk_error("jsonl_erase_failed", "cannot erase from the JSONL files"):
            erased = erase_users(self.directory, self.ledger, user_ids)
        return erased


def _copy(src: Any, dst: Any, length: int) -> None:
    while length > 0:
        chunk = src.read(min(_CHUNK, length))
        if not chunk:
            raise OSError(f"{getattr(src, 'name', 'file')}: shorter than its committed length")
        dst.write(chunk)
        length -= len(chunk)


def _compress(directory: Path, path: Path, length: int, ledger: Ledger) -> None:
    """Append the first ``length`` bytes of ``path`` to its day's ``.gz`` as one gzip member, then
    forget and remove ``path``: tmp + fsync + rename, ledger, unlink (see the module docstring)."""
    gz = path.with_name(path.name + ".gz")
    tmp = path.with_name(path.name + ".gz.tmp")
    kept = ledger.gz.get(gz.name, 0) if gz.exists() else 0
    with open_private(tmp, "wb") as out:
        if kept:
            with open(gz, "rb") as old:
                _copy(old, out, kept)
        with open(path, "rb") as src, gzip.GzipFile(filename=path.name, mode="wb", fileobj=out, mtime=0) as member:
            _copy(src, member, length)
        out.flush()
        os.fsync(out.fileno())
        size = out.tell()
    os.replace(tmp, gz)
    _fsync_dir(directory)
    ledger.gz[gz.name] = size
    ledger.lengths.pop(path.name, None)
    ledger.save(directory)
    path.unlink()
    _fsync_dir(directory)


def housekeep(
    directory: Path,
    ledger: Ledger,
    *,
    today: date | None = None,
    now: datetime | None = None,
    compress_after_days: int = 1,
    retention_days: int = 90,
    quiet_s: float = 3600.0,
) -> dict[str, list[str]]:
    """Compress closed days and delete days past retention.

    A ``.jsonl`` is compressed when its day is before ``today`` (UTC) and at least
    ``compress_after_days`` old (0 counts as 1), its size is exactly its ledger length (no
    write in flight, and the file is ours) and it has not been modified for ``quiet_s``
    seconds (late events still go to it). Files older than ``retention_days`` are deleted
    (0: never). Today's file is never touched.
    """
    now = now or datetime.now(UTC)
    today = today or now.astimezone(UTC).date()
    done: dict[str, list[str]] = {"compressed": [], "removed": []}
    days: list[tuple[Path, date, bool]] = []
    for path in sorted(directory.iterdir()):
        m = _DAY_FILE.match(path.name)
        if m:
            days.append((path, date.fromisoformat(m.group(1)), bool(m.group(2))))
    expired = [(p, gz) for p, day, gz in days if retention_days and day < today and (today - day).days > retention_days]
    if expired:
        for path, gz in expired:  # forget first: a kill before the unlink leaves files removed on start
            (ledger.gz if gz else ledger.lengths).pop(path.name, None)
        ledger.save(directory)
        for path, _ in expired:
            path.unlink(missing_ok=True)
            done["removed"].append(path.name)
        _fsync_dir(directory)
    gone = {p for p, _ in expired}
    for path, day, gz in days:
        if gz or path in gone or day >= today or (today - day).days < max(1, compress_after_days):
            continue
        committed = ledger.lengths.get(path.name)
        stat = path.stat()
        if committed is None or stat.st_size != committed or now.timestamp() - stat.st_mtime < quiet_s:
            continue
        _compress(directory, path, committed, ledger)
        done["compressed"].append(path.name)
    if done["compressed"] or done["removed"]:
        log.info("jsonl_housekeeping compressed=%d removed=%d", len(done["compressed"]), len(done["removed"]))
    return done


# --- erasure -------------------------------------------------------------------------------


class _Limited(io.RawIOBase):
    """The first ``limit`` bytes of ``fh``: a ``.gz`` read up to its committed length."""

    def __init__(self, fh: Any, limit: int) -> None:
        self._fh = fh
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._left)
        if n <= 0:
            return 0
        got = self._fh.readinto(memoryview(buffer)[:n]) or 0
        self._left -= got
        return got


def _blocks(fh: Any, limit: int | None = None, *, tolerant: bool = False) -> Iterator[bytes]:
    """Line-aligned blocks of about :data:`_CHUNK` bytes from ``fh`` (at most ``limit`` bytes in
    all): each ends with a newline but perhaps the last. Undecodable gzip data raises
    :class:`OSError`, or with ``tolerant`` ends the blocks (a member still being written)."""
    rest = b""
    left = limit
    while left is None or left > 0:
        try:
            chunk = fh.read(_CHUNK if left is None else min(_CHUNK, left))
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            if tolerant:
                break
            raise OSError(errno.EIO, f"unreadable gzip data ({type(exc).__name__})") from None
        if not chunk:
            break
        if left is not None:
            left -= len(chunk)
        data = rest + chunk if rest else chunk
        nl = data.rfind(b"\n")
        if nl < 0:
            rest = data
            continue
        yield data[: nl + 1]
        rest = data[nl + 1 :]
    if rest:
        yield rest


def _needles(user_ids: set[str]) -> tuple[bytes, ...]:
    """The byte forms an id takes in a line: as is (UTF-8), and as orjson escapes it in a JSON string."""
    return tuple({u.encode() for u in user_ids} | {orjson.dumps(u)[1:-1] for u in user_ids})


def _users_line(line: bytes, needles: tuple[bytes, ...], user_ids: set[str]) -> bool:
    """True if ``line`` is a JSON object whose ``user_id`` is one of ``user_ids`` (a bytes search
    first, so only candidate lines are parsed)."""
    if not any(n in line for n in needles):
        return False
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    user_id = value.get("user_id") if isinstance(value, dict) else None
    return isinstance(user_id, str) and user_id in user_ids


def _filter(block: bytes, needles: tuple[bytes, ...], user_ids: set[str]) -> tuple[bytes, int]:
    """``block`` without the users' lines, and how many were removed."""
    if not any(n in block for n in needles):
        return block, 0
    lines = block.split(b"\n")
    last = lines.pop()  # b"" when the block ends with a newline
    kept = [line for line in lines if not _users_line(line, needles, user_ids)]
    removed = len(lines) - len(kept)
    out = b"".join(line + b"\n" for line in kept)
    if last:
        if _users_line(last, needles, user_ids):
            removed += 1
        else:
            out += last
    return out, removed


def _open_committed(raw: Any, name: str, committed: int) -> tuple[Any, int | None]:
    """The committed lines of a day file opened as ``raw``: (readable, byte limit)."""
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=_Limited(raw, committed), mode="rb"), None
    return raw, committed


def _has_users_lines(path: Path, committed: int, needles: tuple[bytes, ...], user_ids: set[str]) -> bool:
    with open(path, "rb") as raw:
        src, limit = _open_committed(raw, path.name, committed)
        for block in _blocks(src, limit):
            if any(n in block for n in needles) and _filter(block, needles, user_ids)[1]:
                return True
    return False


def _rewrite_without(path: Path, committed: int, needles: tuple[bytes, ...], user_ids: set[str]) -> tuple[int, int]:
    """Write ``path`` without the users' committed lines to its ``.erase.tmp`` (fsynced; a ``.gz`` as
    one member; bytes past ``committed`` copied unchanged after them). Returns (lines removed,
    new committed length)."""
    tmp = path.with_name(path.name + ERASE_TMP)
    stat = path.stat()
    removed = 0
    with open_private(tmp, "wb") as out, open(path, "rb") as raw:
        src, limit = _open_committed(raw, path.name, committed)
        if path.name.endswith(".gz"):
            name = path.name.removesuffix(".gz")
            with gzip.GzipFile(filename=name, mode="wb", fileobj=out, mtime=0) as dst:
                for block in _blocks(src, limit):
                    kept, n = _filter(block, needles, user_ids)
                    dst.write(kept)
                    removed += n
        else:
            for block in _blocks(src, limit):
                kept, n = _filter(block, needles, user_ids)
                out.write(kept)
                removed += n
        new_length = out.tell()
        raw.seek(committed)
        shutil.copyfileobj(raw, out)  # not committed: not ours to judge, and cut back on the next start
        out.flush()
        os.fsync(out.fileno())
    # The same mtime: housekeeping's "quiet for quiet_s" is about the sink's writes, not this one.
    os.utime(tmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return removed, new_length


def erase_users(directory: Path, ledger: Ledger, user_ids: set[str]) -> dict[str, int]:
    """Remove every committed line whose ``user_id`` is in ``user_ids`` from the day files the
    ledger knows (``.jsonl`` and ``.gz``); for the holder of the folder's writer lock.

    Returns ``{file name: lines removed}`` for the files rewritten (``{}``: nothing left to
    erase; running it again is harmless). Other lines keep their bytes and order; bytes past a
    committed length are not looked at and stay where they are. Each file: the rewrite goes to
    ``<name>.erase.tmp`` (fsync), the ledger records the intent (``erasing``), the tmp is renamed
    over the file (fsync the folder), and the ledger records the new length and forgets the
    intent; :meth:`JsonlWriter.recover` settles a kill anywhere in between (module docstring).
    A rewritten ``.gz`` is one gzip member. Logs counts only, never ids or lines.
    """
    ids = {u for u in user_ids if u}
    if not ids:
        return {}
    needles = _needles(ids)
    done: dict[str, int] = {}
    for name, committed in sorted([*ledger.lengths.items(), *ledger.gz.items()]):
        path = directory / name
        if not committed or not _DAY_FILE.match(name) or not _has_users_lines(path, committed, needles, ids):
            continue
        removed, new_length = _rewrite_without(path, committed, needles, ids)
        ledger.erasing[name] = new_length
        ledger.save(directory)
        os.replace(path.with_name(name + ERASE_TMP), path)
        _fsync_dir(directory)
        (ledger.gz if name.endswith(".gz") else ledger.lengths)[name] = new_length
        del ledger.erasing[name]
        ledger.save(directory)
        done[name] = removed
    if done:
        log.info("jsonl_erased files=%d lines=%d", len(done), sum(done.values()))
    return done


def find_user_lines(directory: Path, user_ids: set[str]) -> dict[str, int]:
    """Lines holding any of ``user_ids`` anywhere (a bytes search, payload text included), per day
    file: ``{file name: lines}`` for the files with any. Reads every byte of every
    ``feedback-*.jsonl`` and ``.jsonl.gz``, committed or not; read-only, safe while the sink
    writes (the ``.jsonl`` files are read before the ``.gz``, so a day compressed meanwhile is
    still seen). A substring search: an id that is part of a longer one counts too.
    """
    ids = {u for u in user_ids if u}
    if not ids:
        return {}
    needles = _needles(ids)
    directory = Path(directory)
    names = sorted(p.name for p in directory.glob("feedback-*.jsonl") if _DAY_FILE.match(p.name))
    names += sorted(p.name for p in directory.glob("feedback-*.jsonl.gz") if _DAY_FILE.match(p.name))
    found: dict[str, int] = {}
    for name in names:
        count = 0
        try:
            with open(directory / name, "rb") as raw:
                src = gzip.GzipFile(fileobj=raw, mode="rb") if name.endswith(".gz") else raw
                for block in _blocks(src, tolerant=True):
                    if any(n in block for n in needles):
                        count += sum(1 for line in block.split(b"\n") if line and any(n in line for n in needles))
        except FileNotFoundError:  # compressed or expired meanwhile
            continue
        if count:
            found[name] = count
    return found


# --- erasure requests for a running sink --------------------------------------------------


def _check_request_id(request_id: str) -> str:
    if not isinstance(request_id, str) or not _REQUEST_ID.match(request_id):
        raise ValueError("an erasure request id is 1-64 characters of A-Z, a-z, 0-9, _ and -")
    return request_id


def _write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data``, readable by the owner only: tmp (0600), fsync,
    rename, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    fd = private_fd(tmp, "w")  # a tmp left over with wider bits is tightened
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def request_erasure(directory: Path, request_id: str, user_ids: set[str]) -> Path:
    """Ask the sink that holds ``directory`` to erase ``user_ids`` from its files: writes
    ``.erasure/<request_id>.json`` atomically (mode 0600, it holds the ids). Poll
    :func:`erasure_receipt` for the result. ``request_id`` must be new (a uuid4 hex, say);
    a stale receipt under the same id is removed first so it is never taken for this one.
    """
    _check_request_id(request_id)
    ids = sorted(user_ids)
    if not ids or not all(isinstance(u, str) and u for u in ids):
        raise ValueError("an erasure request needs at least one non-empty user id")
    spool = Path(directory) / ERASURE_DIR
    private_dir(spool)
    (spool / f"{request_id}{_RECEIPT}").unlink(missing_ok=True)
    path = spool / f"{request_id}.json"
    request = {"request_id": request_id, "user_ids": ids, "requested_s": time.time()}
    _write_private(path, orjson.dumps(request))
    return path


def erasure_receipt(directory: Path, request_id: str) -> dict[str, Any] | None:
    """The receipt of an applied request: ``{"request_id", "files": {name: lines}, "lines",
    "requested_s", "done_s"}``; None while it is pending."""
    path = Path(directory) / ERASURE_DIR / f"{_check_request_id(request_id)}{_RECEIPT}"
    try:
        receipt: dict[str, Any] = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    return receipt


def _parse_request(path: Path, data: bytes) -> tuple[str, set[str], float] | None:
    """(request id, user ids, requested_s) from a request file; None if it is malformed."""
    try:
        request = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(request, dict):
        return None
    request_id, ids, requested = request.get("request_id"), request.get("user_ids"), request.get("requested_s", 0.0)
    if not isinstance(request_id, str) or not _REQUEST_ID.match(request_id) or path.name != f"{request_id}.json":
        return None
    if not isinstance(ids, list) or not ids or not all(isinstance(u, str) and u for u in ids):
        return None
    if not isinstance(requested, int | float) or isinstance(requested, bool):
        return None
    return request_id, set(ids), float(requested)


def _pending_requests(spool: Path) -> list[Path]:
    """The request files, oldest first; tmp files of requests that died long ago are removed
    (they hold ids)."""
    now = time.time()
    found: list[tuple[int, str, Path]] = []
    for path in spool.iterdir():
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        if path.name.endswith(".tmp"):
            if now - stat.st_mtime > _STALE_TMP_S:
                path.unlink(missing_ok=True)
        elif path.name.endswith(".json") and not path.name.endswith(_RECEIPT):
            found.append((stat.st_mtime_ns, path.name, path))
    return [path for *_, path in sorted(found)]


def apply_erasure_requests(writer: JsonlWriter) -> list[dict[str, Any]]:
    """Apply the pending requests in ``writer``'s ``.erasure/`` folder, oldest first: erase, write
    the receipt (no ids), delete the request. Returns the receipts written.

    For the writer's own thread, between writes (the JSONL sink's maintenance). A malformed
    request is renamed to ``<name>.bad`` and logged by file name. Raises :class:`TransientError`
    when the disk fails; the request then stays and is applied on a later call. Cheap when
    there is nothing to do: one listing of the folder.
    """
    spool = writer.directory / ERASURE_DIR
    receipts: list[dict[str, Any]] = []
    try:
        if not spool.is_dir():
            return receipts
        for path in _pending_requests(spool):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            request = _parse_request(path, data)
            if request is None:
                os.replace(path, path.with_name(path.name + ".bad"))
                _fsync_dir(spool)
                log.warning("jsonl_erasure_request_bad file=%s", path.name)
                continue
            request_id, ids, requested = request
            files = writer.erase(ids)  # a TransientError leaves the request for a later call
            receipt = {
                "request_id": request_id,
                "files": files,
                "lines": sum(files.values()),
                "requested_s": requested,
                "done_s": time.time(),
            }
            _write_private(spool / f"{request_id}{_RECEIPT}", orjson.dumps(receipt, option=orjson.OPT_SORT_KEYS))
            path.unlink(missing_ok=True)
            _fsync_dir(spool)
            log.info("jsonl_erasure_applied request=%s files=%d lines=%d", request_id, len(files), receipt["lines"])
            receipts.append(receipt)
    except OSError as exc:
        log.error("jsonl_erasure_spool_failed dir=%s error=%s", spool, exc.strerror or type(exc).__name__)
        raise TransientError(f"cannot apply erasure requests: {exc.strerror or type(exc).__name__}") from None
    return receipts


def erase_offline(directory: Path, user_ids: set[str]) -> dict[str, int]:
    """Erase ``user_ids`` from ``directory`` when no sink runs: take the folder's writer lock
    (recovering the files as a starting sink does), erase, release. Raises :class:`WriterBusy`
    if a sink holds the folder (then :func:`request_erasure`). ``{}`` for a missing folder.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    with JsonlWriter(directory) as writer:
        return writer.erase(user_ids)
