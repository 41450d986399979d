"""The C allocators under a run: handing freed memory back, and keeping it where a loop reuses it.

    release_freed_memory()   # after reading a large file, or packing a million lengths
    trim_heap()              # after each tensor of a merge: glibc's heap only
    keep_freed_heap()        # before a training loop on the CPU

Two allocators keep what they free for reuse instead of returning it, so a brief peak stays in the
process's resident memory under every later step:
  - pyarrow's (mimalloc or jemalloc) keeps the buffers of a JSON read or a packing; it returns them
    when asked (release_unused);
  - glibc's malloc keeps large freed blocks in its heap once a bigger one has been freed (it raises
    its mmap threshold as it goes): the data file read in 16 MB blocks to check and hash it left
    50 MB of a 1,000,000-row file resident (benchmarks/bench_data.py's peak RSS); a merge's tensors
    of a few MB added about 200 MB to its peak (benchmarks/bench_merge.py). malloc_trim returns them.
Both only give back memory nothing uses, so calling them is always safe; each takes milliseconds.

A training loop on the CPU wants the opposite: every step allocates and frees the same tens of MB of
activations and gradients. glibc serves a block from fresh pages (mmap) when it is larger than its
mmap threshold, and returns the heap's free top to the kernel when it exceeds its trim threshold;
both start small (128 KB) and rise only as large blocks happen to be freed, so one process re-faults
its step's memory every step (about 1 M page faults, 3 s of system time on the tiny recipe's 200 steps)
and the next does not (0.13 M), and the same program's step time varied by 30% from run to run.
keep_freed_heap fixes both thresholds at the values glibc's own rule rises to at most, from the start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import lru_cache

# mallopt's parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# The most glibc's dynamic mmap threshold rises to on a 64-bit machine (DEFAULT_MMAP_THRESHOLD_MAX);
# it then sets the trim threshold to twice that.
MMAP_THRESHOLD_MAX = 32 * 2**20


def release_freed_memory() -> None:
    """pyarrow's and glibc's freed memory back to the operating system."""
    import pyarrow

    pyarrow.default_memory_pool().release_unused()
    trim_heap()


def trim_heap() -> None:
    """glibc's freed heap memory back to the operating system (elsewhere nothing)."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


def keep_freed_heap() -> bool:
    """Keep blocks under 32 MB in glibc's heap when freed, for the next step to reuse. Returns whether
    it did: not where the C library is not glibc, nor where the user set glibc's malloc settings
    (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, or glibc.malloc tunables), which stand."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    # mallopt returns 1 on success; setting either also stops glibc adjusting both on its own.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_MAX))


@lru_cache(maxsize=None)
def _libc_function(name: str):
    """One of glibc's malloc functions, or None where the C library has none (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
