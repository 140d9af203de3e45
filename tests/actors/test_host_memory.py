"""Freed host memory stays in the process: a worker's next large buffer reuses its pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource
from baton.actors.host_memory import keep_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        buffer = b"\\x01" * (48 << 20)  # every page written; past glibc's largest mmap
        # threshold of its own (32 MiB), so by default always fresh pages
        del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = faults()
kept = keep_freed_memory()
faults()  # the heap grows once
print(plain, kept, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_buffers_reuse_their_pages_once_freed_memory_is_kept():
    # A fresh process: the thresholds are process-wide, and the test process may have set them.
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True).stdout.split()
    plain, kept, after = int(out[0]), out[1], int(out[2])
    assert kept == "True"
    assert plain >= 5 * 12288 * 0.9  # without: every buffer's 12288 pages faulted in anew
    assert after < plain / 10
