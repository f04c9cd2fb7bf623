"""Keep freed memory for reuse instead of handing it back to the kernel at once (glibc's malloc).

The data paths allocate and free buffers of 0.3-1 MiB per segment (blocks, plaintext, joined shares). glibc
returns such a block to the kernel when it is freed (it is above the mmap threshold, or it is the top of the
heap past the trim threshold), and the next one is fresh memory again: a page fault for every 4 KiB, which on
this virtual machine cost more than the work done on the buffer. Measured: rebuilding a 1 MiB segment from its
three parity blocks took 1.5 ms per segment, 0.135 ms with freed memory kept (decoding itself is 0.08 ms);
a cold read of 256 MiB through the mount 1.04-1.16 s, 0.99-1.08 s (four alternating runs each).

The cost: up to TRIM_THRESHOLD of freed memory stays mapped (counted in RSS) per process after a burst. Peak
memory, what the benchmarks report and bound, does not change.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # blocks above this still get their own mapping (glibc's largest allowed value)
TRIM_THRESHOLD = 64 * 2**20  # free memory at the top of the heap kept for reuse


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as described above; False (and nothing changed) on another C library."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter itself uses
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.debug("mallopt refused the allocator settings; glibc's defaults stay")
    return ok
