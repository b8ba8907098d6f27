"""The worker's allocator bound (``bound_malloc``): large freed buffers go back to the OS.

A probe process allocates 200 MB of large blocks three times over, with small malloc'd
objects kept alive between them (as a batch does: envelope values and librdkafka copies
beside table values that live on), and reports how much of it its RSS kept. Without the
bound glibc keeps most of it; with it the RSS returns to where it started.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from stream_processors.app import bound_malloc
if sys.argv[1] == "bound":
    assert bound_malloc()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20
base, keep = rss(), []
for _ in range(3):
    blocks = [bytes(200_000 + i) for i in range(1000)]
    keep.extend(bytes(600) for _ in range(1000))
    del blocks
print(rss() - base)
"""


def _kept_mb(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt; /proc/self/statm")
def test_bound_malloc_returns_large_freed_blocks() -> None:
    assert _kept_mb("plain") > 100  # the probe reproduces the pile-up
    assert _kept_mb("bound") < 20
