"""Run the real worker and sink as child processes for integration tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.settings import Settings


@contextmanager
def pipeline_process(settings: Settings, command: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``feedback <command>`` in a child process with ``settings``; stopped by PID on exit."""
    env = {**os.environ, **settings.to_env()}
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", command], env=env, stdout=fh, stderr=subprocess.STDOUT
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def run_cli(
    settings: Settings, *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """``feedback <args>`` in a child process with ``settings`` (wide terminal for rich tables)."""
    full = {**os.environ, **settings.to_env(), "COLUMNS": "250", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], env=full, capture_output=True, text=True, timeout=timeout
    )


def run_cli_ok(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """:func:`run_cli` that must succeed without a traceback."""
    result = run_cli(settings, *args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, procs: list[subprocess.Popen[bytes]] = ()
) -> None:  # type: ignore[assignment]
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout`` or if a process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: a pipeline process exited with {proc.returncode}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
