"""Child processes of the benchmark: started with an environment and a source tree, stopped by PID.

Like ``tests/integration/pipeline_procs.py`` (``feedback <command>`` as a child with the
settings as ``FEEDBACK_*`` variables), plus what the benchmark needs: another source tree
(``PYTHONPATH`` and working directory), a log per process, the resident memory from
``/proc/<pid>/status`` and a scrape of the worker's Prometheus endpoint. Every child is
stopped by its own PID: SIGTERM, then SIGKILL after a timeout; never by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.stats import parse_prometheus
from pipeline.settings import PROJECT_ROOT, Settings

__all__ = ["Child", "cpu_seconds", "rss_mb", "scrape", "stop_all", "tree_env"]

_LIVE: list[Child] = []  # every child started and not yet stopped, for stop_all()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far (``/proc/<pid>/stat``), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def tree_env(settings: Settings | None, src: Path | None = None, **extra: Any) -> dict[str, str]:
    """The environment for a child running ``src``'s code (default: this tree) with ``settings``."""
    env = {**os.environ, **(settings.to_env() if settings is not None else {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src or PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Child:
    """One child process; ``stop()`` (or leaving the ``with`` block) ends it by its PID."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None,
        stdout: Path | None = None,
    ) -> None:  # fmt: skip
        """``log`` takes stderr (and stdout unless ``stdout`` names a file of its own)."""
        self.name, self.argv, self.env, self.log, self.cwd, self.stdout = name, argv, env, log, cwd, stdout
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None

    @classmethod
    def python(
        cls, name: str, args: list[str], env: dict[str, str], log: Path, cwd: Path | None = None,
        stdout: Path | None = None,
    ) -> Child:  # fmt: skip
        return cls(name, [sys.executable, *args], env, log, cwd, stdout)

    def start(self) -> Child:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log, open(self.stdout or os.devnull, "wb") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out if self.stdout else log,
                                         stderr=log, stdin=subprocess.DEVNULL, cwd=self.cwd)  # fmt: skip
        self.started_at = time.time()
        _LIVE.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        if self in _LIVE:
            _LIVE.remove(self)
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        return self.proc.returncode

    def wait(self, timeout: float) -> int:
        """Wait for the child to exit by itself; stopped and an error after ``timeout``."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise SystemExit(f"{self.name} did not finish within {timeout:.0f} s (log: {self.log})") from None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def rss_mb(self) -> float | None:
        return rss_mb(self.pid) if self.alive() else None

    def __enter__(self) -> Child:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_all(timeout: float = 30.0) -> list[str]:
    """Stop every child still running (by its PID), whatever failed on the way; their names."""
    stopped = []
    for child in list(_LIVE):
        try:
            if child.alive():
                stopped.append(child.name)
            child.stop(timeout)
        except Exception:  # the next child must still be stopped
            continue
    return stopped


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MB (VmRSS of /proc/<pid>/status), None if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def scrape(port: int, timeout: float = 1.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    """The samples of ``127.0.0.1:<port>/metrics``, None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
            return parse_prometheus(r.read().decode(errors="replace"))
    except (OSError, ValueError):
        return None
