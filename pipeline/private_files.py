"""Files and folders readable by their owner only: 0600 and 0700, whatever the umask.

Event data (JSONL day files, exports, reports, ClickHouse and Kafka data, erasure requests)
holds personal data even after redaction (pseudonyms, free text), so nothing the project
writes is readable by another local user. Two layers:

* :func:`restrict_umask` at process start (the ``feedback`` command, and the children it
  launches with ``umask=PRIVATE_UMASK``), so files created by libraries we do not control
  (RocksDB, Kafka, chDB, matplotlib) are private too;
* explicit modes where the project creates a file (:func:`open_private`,
  :func:`write_private`, :func:`private_dir`), so a library caller or a test with a
  permissive umask gets the same, and :func:`tighten` for what already exists with wider
  bits (a file from an older version, a folder made by hand).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "PRIVATE_UMASK",
    "make_private_dirs",
    "open_private",
    "private_dir",
    "private_fd",
    "restrict_umask",
    "tighten",
    "tighten_tree",
    "write_private",
]

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700
PRIVATE_UMASK = 0o077
_OPEN_FLAGS = {
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    "r+": os.O_RDWR | os.O_CREAT,
}


def restrict_umask() -> int:
    """Set the process umask to 0o077 (new files 0600, folders 0700); returns the old one."""
    return os.umask(PRIVATE_UMASK)


def tighten(path: str | os.PathLike[str]) -> None:
    """Take the group and other bits off ``path`` (a 0644 file becomes 0600, a 0755 folder
    0700). A symlink, or a path that does not exist, is left alone. Raises ``OSError`` if the
    mode cannot be changed (a file of another user)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
        return
    os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)


def tighten_tree(root: str | os.PathLike[str]) -> None:
    """:func:`tighten` ``root`` and everything under it (symlinks are not followed). An entry
    of another user, whose mode we may not change, is logged (by path) and left as it is."""
    tighten(root)
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = os.path.join(folder, name)
            try:
                tighten(path)
            except PermissionError:
                log.warning("cannot_tighten path=%s reason=not_owner", path)


def make_private_dirs(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and any missing parents as 0700 folders; existing ones are not touched
    (a parent such as the working directory is the user's). Returns ``path``."""
    path = Path(path)
    missing: list[Path] = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.append(p)
    for p in reversed(missing):
        try:
            p.mkdir(mode=DIR_MODE)
        except FileExistsError:  # another process made it meanwhile
            continue
        os.chmod(p, DIR_MODE)  # mkdir's mode is masked by the umask; a stricter one may drop u+x
    return path


def private_dir(path: str | os.PathLike[str]) -> Path:
    """:func:`make_private_dirs`, and ``path`` itself tightened to 0700 if it existed. Returns it."""
    make_private_dirs(path)
    tighten(path)
    return Path(path)


def private_fd(path: str | os.PathLike[str], mode: str = "w") -> int:
    """A descriptor on ``path`` opened as ``mode`` (``w``, ``a``, ``x`` or ``r+``; a ``b`` is
    ignored), created 0600, and tightened to 0600 if it existed with wider bits."""
    flags = _OPEN_FLAGS[mode.replace("b", "").replace("t", "")] | os.O_CLOEXEC
    fd = os.open(path, flags, FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = None) -> IO[Any]:
    """``open(path, mode)`` for writing, with the file created 0600 (or tightened to it).

    ``mode`` is one of ``w``, ``a``, ``x``, ``r+``, each optionally with ``b``; text modes
    default to UTF-8.
    """
    fd = private_fd(path, mode)
    try:
        if "b" in mode:
            return os.fdopen(fd, mode)
        return os.fdopen(fd, mode, encoding=encoding or "utf-8")
    except BaseException:
        os.close(fd)
        raise


def write_private(path: str | os.PathLike[str], data: str | bytes, encoding: str = "utf-8") -> None:
    """Write ``data`` to ``path`` (replacing what was there) as a 0600 file."""
    raw = data.encode(encoding) if isinstance(data, str) else data
    fd = private_fd(path, "w")
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
