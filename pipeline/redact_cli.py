"""``feedback redact``: the gate's PII redaction over JSON lines, streaming."""

from __future__ import annotations

from collections import Counter
from typing import IO, Any

import orjson

from stream_processors.redact import redact_payload, redact_text

__all__ = ["FREE_TEXT_FIELDS", "redact_event", "redact_stream"]

FREE_TEXT_FIELDS = ("text", "comment", "corrected_response")


def _redact_strings(value: Any, counts: Counter[str] | None) -> Any:
    if isinstance(value, str):
        return redact_text(value, counts)
    if isinstance(value, dict):
        return {k: _redact_strings(v, counts) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_strings(v, counts) for v in value]
    return value


def redact_event(event: dict[str, Any], counts: Counter[str] | None = None) -> dict[str, Any]:
    """``event`` with its payload strings and top-level free-text fields redacted (a copy).

    Takes the flat payload ``feedback produce`` reads and the Avro form (``extra`` map) alike.
    """
    out = dict(event)
    payload = out.get("payload")
    if isinstance(payload, dict) and isinstance(payload.get("extra"), dict):
        out["payload"] = redact_payload(payload, counts)
    elif isinstance(payload, dict):
        out["payload"] = _redact_strings(payload, counts)
    for name in FREE_TEXT_FIELDS:
        if isinstance(out.get(name), str):
            out[name] = redact_text(out[name], counts)
    return out


def redact_stream(lines: IO[bytes], out: IO[bytes], err: IO[str]) -> int:
    """Redact each JSON line of ``lines`` to ``out``, flushing per line. Returns the exit code:
    0, or 2 at the first line that is not a JSON object (named by number, never echoed)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            err.write(f"line {number}: not a JSON object\n")
            return 2
        out.write(orjson.dumps(redact_event(event)) + b"\n")
        out.flush()
    return 0
