"""``run_sinks``: a sink that dies stops the others and is reported, so ``feedback sink`` exits non-zero."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from sinks.batching import run_sinks


class _Sink:
    def __init__(self, name: str, fail_after_s: float | None = None) -> None:
        self.name = name
        self.fail_after_s = fail_after_s
        self._stop = threading.Event()
        self.stopped_cleanly = False

    def run(self, idle_exit_s: float | None = None) -> None:
        if self.fail_after_s is not None:
            time.sleep(self.fail_after_s)
            raise ValueError("payload says: my email is someone@example.com")
        deadline = time.monotonic() + 10
        while not self._stop.is_set():
            assert time.monotonic() < deadline, "never asked to stop"
            time.sleep(0.01)
        self.stopped_cleanly = True

    def stop(self) -> None:
        self._stop.set()


def test_a_failing_sink_stops_the_others_and_is_named(caplog: pytest.LogCaptureFixture) -> None:
    healthy, broken = _Sink("clickhouse"), _Sink("jsonl", fail_after_s=0.05)
    with caplog.at_level(logging.ERROR, logger="sinks.batching"):
        started = time.monotonic()
        failed = run_sinks([healthy, broken])  # type: ignore[list-item]
    assert failed == ["jsonl"]
    assert healthy.stopped_cleanly
    assert time.monotonic() - started < 5
    text = caplog.text
    assert "sink_failed sink=jsonl error=ValueError" in text
    assert "someone@example.com" not in text and "payload says" not in text


def test_all_stopping_normally_is_not_a_failure() -> None:
    sinks = [_Sink("a"), _Sink("b")]
    threading.Timer(0.1, lambda: [s.stop() for s in sinks]).start()
    assert run_sinks(sinks) == []  # type: ignore[arg-type]
    assert all(s.stopped_cleanly for s in sinks)


def test_feedback_sink_exits_non_zero_when_a_sink_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import sinks.feedback_sink
    from pipeline.cli import app

    monkeypatch.setattr(sinks.feedback_sink, "all_sinks", lambda _s: [_Sink("clickhouse"), _Sink("dlq", 0.01)])
    result = CliRunner().invoke(app, ["sink"])
    assert result.exit_code == 1
    assert "dlq stopped with an error" in result.output
