"""Everything the project writes is 0600 (files) / 0700 (folders), even under a permissive
umask, and what already exists with wider bits is tightened."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from pipeline.localstack import ManagedProcess
from pipeline.private_files import (
    make_private_dirs,
    open_private,
    private_dir,
    restrict_umask,
    tighten,
    tighten_tree,
    write_private,
)
from producers.synthetic import generate_events
from schemas.serde import AvroSerde
from sinks.jsonl import ERASURE_DIR, JsonlWriter, apply_erasure_requests, request_erasure


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    """The default of most systems: without the project's care every file would be 0644."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def assert_private_tree(root: Path) -> list[Path]:
    """Every file under ``root`` is 0600 and every folder 0700 (``root`` included); returns the files."""
    assert _mode(root) == 0o700, root
    files = []
    for folder, dirs, names in os.walk(root):
        for name in dirs:
            assert _mode(Path(folder, name)) == 0o700, Path(folder, name)
        for name in names:
            path = Path(folder, name)
            assert _mode(path) == 0o600, f"{path}: {oct(_mode(path))}"
            files.append(path)
    return files


def _records(users: list[str], day: str) -> list[dict[str, Any]]:
    serde = AvroSerde()
    micros = int(datetime.fromisoformat(f"{day}T12:00:00+00:00").timestamp() * 1e6)
    events = generate_events(len(users), seed=int(day.replace("-", "")))  # ids of their own per day
    return [
        serde.decode(serde.encode({**e.to_avro(), "ts": micros, "user_id": u}))
        for e, u in zip(events, users, strict=True)
    ]


def test_helpers_create_private_and_tighten(tmp_path: Path) -> None:
    public = tmp_path / "public"
    public.mkdir(mode=0o755)
    os.chmod(public, 0o755)
    made = make_private_dirs(public / "a" / "b")
    assert _mode(public) == 0o755  # an existing parent is the user's: untouched
    assert _mode(public / "a") == _mode(made) == 0o700
    write_private(made / "x.txt", "text")
    with open_private(made / "y.bin", "ab") as fh:
        fh.write(b"1")
    with open_private(made / "y.bin", "ab") as fh:  # appends
        fh.write(b"2")
    assert (made / "y.bin").read_bytes() == b"12"
    assert _mode(made / "x.txt") == _mode(made / "y.bin") == 0o600

    old = public / "old.txt"
    old.write_text("was 0644")
    os.chmod(old, 0o644)
    write_private(old, "now private")  # rewriting an existing file tightens it
    assert _mode(old) == 0o600 and old.read_text() == "now private"
    exe = public / "tool"
    exe.write_text("#!/bin/sh\n")
    os.chmod(exe, 0o755)
    tighten(exe)
    assert _mode(exe) == 0o700  # the owner's bits are kept
    link = public / "link"
    link.symlink_to("/etc/hostname")
    tighten(link)  # a symlink is never followed
    tighten(public / "missing")
    private_dir(public)
    assert _mode(public) == 0o700


def test_jsonl_day_files_ledger_gz_lock_and_erasure_spool_are_private(tmp_path: Path) -> None:
    folder = tmp_path / "jsonl"
    with JsonlWriter(folder) as writer:
        writer.write(_records(["alice", "bob"], "2026-11-20"), {("clean", 0): 2})
        writer.write(_records(["carol"], "2026-11-22"), {("clean", 0): 3})
        done = writer.housekeep(today=date(2026, 11, 22), now=datetime(2099, 1, 1, tzinfo=UTC))
        assert done["compressed"]
        request_erasure(folder, "r1", {"alice"})
        assert apply_erasure_requests(writer)
        assert writer.erase({"carol"})  # an uncompressed day rewritten
    files = {p.name for p in assert_private_tree(folder)}
    assert {"feedback-2026-11-20.jsonl.gz", "feedback-2026-11-22.jsonl", "r1.done.json"} <= files
    assert (folder / ERASURE_DIR).is_dir()


def test_jsonl_files_from_before_are_tightened_on_start(tmp_path: Path) -> None:
    folder = tmp_path / "jsonl"
    with JsonlWriter(folder) as writer:
        writer.write(_records(["alice"], "2026-11-20"), {("clean", 0): 1})
    for path in (folder, *folder.iterdir()):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    with JsonlWriter(folder) as writer:
        assert writer.next_offsets() == {("clean", 0): 1}
    assert len(assert_private_tree(folder)) >= 3  # day file, ledger, lock


def test_a_managed_process_its_log_pid_file_and_what_it_writes_are_private(tmp_path: Path) -> None:
    home = tmp_path / "state" / "svc"
    code = "import pathlib, time; pathlib.Path('made-by-child.txt').write_text('x'); time.sleep(60)"
    marker = "made-by-child-marker"
    proc = ManagedProcess(
        "svc", [sys.executable, "-c", code, marker], home / "svc.pid", home / "logs" / "out.log", marker
    )
    proc.start()
    try:
        deadline = time.monotonic() + 20
        while not (home / "made-by-child.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (home / "made-by-child.txt").exists()
    finally:
        proc.stop(10)
    assert {p.name for p in assert_private_tree(home)} == {"made-by-child.txt", "out.log"}  # pid file gone


def test_the_cli_sets_a_private_umask_before_anything_runs() -> None:
    code = "import os, sys; from pipeline.cli import main; sys.argv = ['feedback', '--help']\n"
    code += "try:\n    main()\nexcept SystemExit:\n    pass\nprint(oct(os.umask(0)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0o77"
    old = restrict_umask()
    assert os.umask(old) == 0o077


def test_tighten_tree_walks_everything(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_text("x")
    os.chmod(tmp_path / "a" / "b" / "f", 0o664)
    os.chmod(tmp_path / "a", 0o775)
    tighten_tree(tmp_path / "a")
    assert _mode(tmp_path / "a") == 0o700 and _mode(tmp_path / "a" / "b" / "f") == 0o600
    assert_private_tree(tmp_path / "a")
