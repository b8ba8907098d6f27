"""Daily JSONL files under ``$FEEDBACK_PATH``: ``feedback-YYYY-MM-DD.jsonl`` (UTC day of ``ts``)."""

from __future__ import annotations

import os
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from schemas.models import format_ts

__all__ = ["JsonlWriter", "event_json", "file_for"]


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


class JsonlWriter:
    """Appends events to their day's file and fsyncs before returning."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def write(self, records: list[dict[str, Any]]) -> None:
        """Append one line per record, grouped by day; durable (fsynced) on return."""
        by_file: dict[Path, list[bytes]] = defaultdict(list)
        for record in records:
            by_file[file_for(self.directory, record["ts"])].append(orjson.dumps(event_json(record)))
        for path, lines in by_file.items():
            with open(path, "ab") as fh:
                fh.write(b"\n".join(lines) + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
        if by_file:
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # new files must survive a crash too
            finally:
                os.close(dir_fd)
