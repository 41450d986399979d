"""Handing freed memory back to the operating system after a step that used a lot of it briefly.

    release_freed_memory()   # after reading a large file, or packing a million lengths

Two allocators keep what they free for reuse instead of returning it, so a brief peak stays in the
process's resident memory under every later step:
  - pyarrow's (mimalloc or jemalloc) keeps the buffers of a JSON read or a packing; it returns them
    when asked (release_unused);
  - glibc's malloc keeps large freed blocks in its heap once a bigger one has been freed (it raises
    its mmap threshold as it goes): the data file read in 16 MB blocks to check and hash it left
    50 MB of a 1,000,000-row file resident (benchmarks/bench_data.py's peak RSS). malloc_trim returns them.
Both only give back memory nothing uses, so calling them is always safe; each takes milliseconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache


def release_freed_memory() -> None:
    import pyarrow

    pyarrow.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
