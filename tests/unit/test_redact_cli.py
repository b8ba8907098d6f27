"""``feedback redact``: the gate's redaction over JSON lines, in order, streaming."""

from __future__ import annotations

import select
import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[2]


def _run(stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "redact"], input=stdin, capture_output=True, cwd=ROOT, timeout=60
    )


def test_redacts_payload_and_flat_fields_in_order() -> None:
    events = [
        {"source": "ui", "type": "thumbs", "user_id": "u1", "payload": {"comment": "mail bob@example.com", "n": 3}},
        {"source": "ui", "type": "correction", "comment": "call +1 415 555 0100", "corrected_response": "ok"},
        {"source": "ui", "type": "x", "payload": {"text": "card 4111 1111 1111 1111, v2.3.1 on 2026-11-20"}},
        {"source": "ui", "type": "y", "payload": {"text": None, "comment": "c", "corrected_response": None,
                                                  "extra": {"note": "ssn 123-45-6789"}}},
    ]  # fmt: skip
    stdin = b"\n".join(orjson.dumps(e) for e in events) + b"\n\n"
    result = _run(stdin)
    assert result.returncode == 0, result.stderr
    out = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert len(out) == 4 and [e["type"] for e in out] == ["thumbs", "correction", "x", "y"]
    assert out[0]["payload"] == {"comment": "mail [EMAIL]", "n": 3} and out[0]["user_id"] == "u1"
    assert out[1]["comment"] == "call [PHONE]" and out[1]["corrected_response"] == "ok"
    assert out[2]["payload"]["text"] == "card [CARD], v2.3.1 on 2026-11-20"
    assert out[3]["payload"]["extra"]["note"] == "ssn [SSN]"


def test_a_bad_line_stops_with_its_number_and_never_echoes_it() -> None:
    good = orjson.dumps({"source": "ui", "type": "t", "comment": "a@b.co"})
    result = _run(good + b"\n" + b"secret alice@example.com not json\n" + good + b"\n")
    assert result.returncode == 2
    assert result.stdout.splitlines() == [orjson.dumps({"source": "ui", "type": "t", "comment": "[EMAIL]"})]
    assert b"line 2: not a JSON object" in result.stderr and b"alice" not in result.stderr
    assert _run(b"[1, 2]\n").returncode == 2


def test_streams_line_by_line_before_stdin_closes() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "redact"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(orjson.dumps({"source": "ui", "text": "call 415-555-0132 now"}) + b"\n")
        proc.stdin.flush()
        # stdin stays open: the first line must come out on its own.
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "no output before stdin was closed"
        assert orjson.loads(proc.stdout.readline()) == {"source": "ui", "text": "call [PHONE] now"}
        proc.stdin.write(b"\n" + orjson.dumps({"source": "ui", "payload": {"direction": "up", "k": None}}) + b"\n")
        proc.stdin.close()
        assert orjson.loads(proc.stdout.readline()) == {"source": "ui", "payload": {"direction": "up", "k": None}}
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
