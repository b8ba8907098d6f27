"""ManagedProcess: PID files, our-process checks, stop by PID."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import StackError
from pipeline.localstack import LocalKafka, ManagedProcess, port_in_use
from pipeline.settings import Settings


def _sleeper(tmp_path: Path, marker: str = "feedback-test-sleeper") -> ManagedProcess:
    argv = [sys.executable, "-c", "import time, sys; time.sleep(60)", marker]
    return ManagedProcess("sleeper", argv, tmp_path / "p.pid", tmp_path / "p.log", marker=marker)


def test_start_running_stop(tmp_path: Path) -> None:
    proc = _sleeper(tmp_path)
    pid = proc.start()
    try:
        assert proc.pid() == pid
        assert proc.is_running()
    finally:
        proc.stop(timeout=5)
    assert not proc.is_running()
    assert not proc.pid_file.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_stale_pid_file_is_cleaned(tmp_path: Path) -> None:
    proc = _sleeper(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    proc.pid_file.write_text(str(dead.pid))
    assert proc.pid() is None
    assert not proc.pid_file.exists()
    proc.stop()  # a no-op, not an error


def test_a_foreign_pid_is_never_ours(tmp_path: Path) -> None:
    foreign = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        proc = _sleeper(tmp_path)
        proc.pid_file.write_text(str(foreign.pid))
        assert proc.pid() is None
        proc.stop()
        assert foreign.poll() is None  # not signalled
    finally:
        foreign.kill()
        foreign.wait()


def test_missing_java_names_the_fix(tmp_path: Path) -> None:
    from tests.conftest import _free_port

    settings = Settings(state_dir=tmp_path, kafka_port=_free_port(), kafka_controller_port=_free_port())
    kafka = LocalKafka(settings, java=str(tmp_path / "no-java"))
    with pytest.raises(StackError, match=r"Java 17\+ is required.*openjdk-17-jre-headless.*JAVA_HOME"):
        kafka.start()


def test_taken_port_names_the_setting(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        kafka = LocalKafka(Settings(state_dir=tmp_path, kafka_port=port))
        with pytest.raises(StackError, match=rf"127\.0\.0\.1:{port} is in use.*FEEDBACK_KAFKA_PORT"):
            kafka.start()


def test_kafka_format_passes_a_dash_leading_cluster_id_as_one_argument(monkeypatch: Any, tmp_path: Path) -> None:
    import pipeline.localstack as ls

    seen: list[list[str]] = []

    def fake_run(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(ls, "_cluster_id", lambda: "-starts-with-a-dash")
    monkeypatch.setattr(ls.subprocess, "run", fake_run)
    kafka = ls.LocalKafka(Settings(state_dir=tmp_path))
    monkeypatch.setattr(kafka, "_classpath", lambda: "cp")
    kafka._format("java")
    assert "--cluster-id=-starts-with-a-dash" in seen[0] and "-t" not in seen[0]
