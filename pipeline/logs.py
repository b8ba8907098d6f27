"""Structured logging: ``key=value`` lines by default, JSON with FEEDBACK_LOG_JSON=true.

Log event ids, hashes, counts and reasons — never payload text or personal data.
"""

from __future__ import annotations

import logging
import sys

import orjson

from pipeline.settings import Settings

__all__ = ["configure_logging"]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = record.exc_info[0].__name__ if record.exc_info[0] else ""
        return orjson.dumps(doc).decode()


def configure_logging(settings: Settings) -> None:
    """Configure the root logger once for a process."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
