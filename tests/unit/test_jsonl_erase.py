"""One writer per JSONL folder, and GDPR erasure of a user's lines from the day files (pure: files only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sinks.jsonl import WRITER_LOCK, JsonlWriter, WriterBusy


def test_a_second_writer_on_the_same_folder_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    first = JsonlWriter(tmp_path)
    with pytest.raises(WriterBusy, match=f"another JSONL writer holds {tmp_path / WRITER_LOCK}"):
        JsonlWriter(tmp_path)
    assert isinstance(WriterBusy("x"), RuntimeError)
    other = JsonlWriter(tmp_path / "elsewhere")  # another folder has its own lock
    other.close()
    first.close()
    first.close()  # idempotent
    second = JsonlWriter(tmp_path)
    assert (tmp_path / WRITER_LOCK).read_text().strip() == str(os.getpid())
    del second  # a writer that is dropped releases the lock too (as a dead process does)
    with JsonlWriter(tmp_path):
        pass
    JsonlWriter(tmp_path).close()


def test_the_lock_is_refused_to_another_process(tmp_path: Path) -> None:
    code = "import sys; from pathlib import Path; from sinks.jsonl import JsonlWriter, WriterBusy\n"
    code += "try:\n    JsonlWriter(Path(sys.argv[1]))\nexcept WriterBusy:\n    sys.exit(3)\n"
    with JsonlWriter(tmp_path):
        busy = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=Path(__file__).parents[2], check=False)
    free = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=Path(__file__).parents[2], check=False)
    assert (busy.returncode, free.returncode) == (3, 0)
