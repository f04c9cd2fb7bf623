"""fincryptfs.allocator: freed segment-sized buffers are reused instead of faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = """
import os, resource, sys
if sys.argv[1] == "tuned":
    from fincryptfs import allocator
    assert allocator.keep_freed_memory()
parts = [os.urandom(350_000) for _ in range(3)]  # three blocks of a 1 MiB segment

def segment():  # join and trim, as decoding did: two fresh 1 MiB objects, freed at once
    joined = b"".join(parts)
    return joined[:len(joined) - 7]

segment()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    segment()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_buffers_are_reused_without_page_faults() -> None:
    # with glibc's defaults (Debian 12) the same loop faults ~50,000 times: every buffer is mapped afresh
    tuned = faults("tuned")
    assert tuned < 100, f"{tuned} page faults for 100 segments: freed memory is not being reused"
