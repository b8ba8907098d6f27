"""Daily JSONL files under ``$FEEDBACK_PATH``: ``feedback-YYYY-MM-DD.jsonl`` (UTC day of ``ts``).

Exactly once, whatever is killed when. A ledger (``.ledger.json`` beside the
files) records, after every fsync, each file's committed length and the next
Kafka offset per partition. The JSONL sink's steps for a batch are:

1. append the lines, 2. fsync the files (and the folder), 3. write the ledger
(tmp file, fsync, rename, fsync the folder), 4. commit the offsets to Kafka.

On start the sink truncates every file back to its ledger length and reads each
partition from the ledger's offset (ahead of Kafka's when it died between 3
and 4). So: killed during 1 or 2, the bytes past the ledger (whole lines or a
partial one) are cut and the same events are written again; killed after 3,
the files are exact and reading resumes after them; a file the ledger does not
know was created after the last ledger write and holds nothing committed, so it
is removed. Because the ledger, not Kafka, says where the files stand, the JSONL
sink has its own consumer group and never waits for ClickHouse.

Housekeeping: days before today (UTC) are gzip-compressed once no batch has
touched them for ``compress_after_days``, and files past ``retention_days``
are deleted (0 keeps them).
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson

from schemas.models import format_ts

__all__ = ["LEDGER", "JsonlWriter", "Ledger", "event_json", "file_for", "housekeep"]

log = logging.getLogger(__name__)

LEDGER = ".ledger.json"
_DAY_FILE = re.compile(r"^feedback-(\d{4}-\d{2}-\d{2})\.jsonl(\.gz)?$")


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


@dataclass
class Ledger:
    """Committed file lengths and the next offset per ``topic:partition``."""

    lengths: dict[str, int] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: Path) -> Ledger:
        path = directory / LEDGER
        if not path.exists():
            return cls()
        data = orjson.loads(path.read_bytes())
        return cls(dict(data.get("lengths", {})), dict(data.get("offsets", {})))

    def save(self, directory: Path) -> None:
        tmp = directory / f"{LEDGER}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps({"lengths": self.lengths, "offsets": self.offsets}, option=orjson.OPT_SORT_KEYS))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, directory / LEDGER)
        _fsync_dir(directory)


class JsonlWriter:
    """Appends events to their day's file; durable and recorded in the ledger on return."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger.load(self.directory)
        self.recover()

    def recover(self) -> list[str]:
        """Cut every day file back to its committed length; remove files the ledger never saw.

        Returns the names of the files changed.
        """
        changed = []
        for path in sorted(self.directory.glob("feedback-*.jsonl")):
            committed = self.ledger.lengths.get(path.name)
            size = path.stat().st_size
            if committed is None:
                path.unlink()
                changed.append(path.name)
            elif size != committed:
                with open(path, "r+b") as fh:
                    fh.truncate(committed)
                    os.fsync(fh.fileno())
                changed.append(path.name)
        if changed:
            _fsync_dir(self.directory)
            log.warning("jsonl_recovered files=%s", ",".join(changed))
        return changed

    def next_offsets(self) -> dict[tuple[str, int], int]:
        """Where reading must resume for the files to stay exact: ``(topic, partition) → offset``."""
        out = {}
        for key, offset in self.ledger.offsets.items():
            topic, _, partition = key.rpartition(":")
            out[(topic, int(partition))] = offset
        return out

    def write(self, records: list[dict[str, Any]], offsets: dict[tuple[str, int], int] | None = None) -> None:
        """Append one line per record, grouped by day; fsync; then record lengths and ``offsets``
        (the next offset per partition) in the ledger."""
        by_file: dict[Path, list[bytes]] = defaultdict(list)
        for record in records:
            by_file[file_for(self.directory, record["ts"])].append(orjson.dumps(event_json(record)))
        for path, lines in by_file.items():
            with open(path, "ab") as fh:
                fh.write(b"\n".join(lines) + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
                self.ledger.lengths[path.name] = fh.tell()
        if by_file:
            _fsync_dir(self.directory)  # new files must survive a crash too
        for (topic, partition), offset in (offsets or {}).items():
            self.ledger.offsets[f"{topic}:{partition}"] = offset
        if by_file or offsets:
            self.ledger.save(self.directory)


def housekeep(
    directory: Path,
    ledger: Ledger,
    *,
    today: date | None = None,
    compress_after_days: int = 1,
    retention_days: int = 90,
) -> dict[str, list[str]]:
    """Compress closed days and delete days past retention. Today's file is never touched, nor
    a day written to within ``compress_after_days`` (late events still go to it)."""
    today = today or datetime.now(UTC).date()
    done: dict[str, list[str]] = {"compressed": [], "removed": []}
    for path in sorted(directory.iterdir()):
        m = _DAY_FILE.match(path.name)
        if not m:
            continue
        day = date.fromisoformat(m.group(1))
        age = (today - day).days
        if retention_days and age > retention_days:
            path.unlink()
            ledger.lengths.pop(path.name, None)
            done["removed"].append(path.name)
        elif not m.group(2) and age > max(0, compress_after_days) and day < today:
            gz = path.with_name(path.name + ".gz")
            tmp = path.with_name(path.name + ".gz.tmp")
            if gz.exists():  # late events for a compressed day: a further gzip member after the first
                shutil.copyfile(gz, tmp)
            with open(path, "rb") as src, gzip.open(tmp, "ab") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, gz)
            path.unlink()
            ledger.lengths.pop(path.name, None)
            done["compressed"].append(path.name)
    if done["compressed"] or done["removed"]:
        ledger.save(directory)
        log.info("jsonl_housekeeping compressed=%d removed=%d", len(done["compressed"]), len(done["removed"]))
    return done
