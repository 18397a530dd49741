"""Keep a long analysis from holding on to memory it freed (glibc's malloc only).

glibc serves a freed block again from its heap instead of returning it to the system, and raises
its mmap threshold (up to 32 MiB) each time a large mapped block is freed, so the per-token arrays
of one study end up on the heap, where the next study's arrays of other sizes fit them poorly. The
process's peak then grows with the number of tokens (by 30 to 70 bytes per token and model from 1M
to 2M tokens, `benchmarks/analysis.py`) although no study holds more than a window of tokens.
Fixing both thresholds at 32 MiB maps and unmaps every array of that size or more, and trims the
top of the heap once that much of it is free. dask.distributed sets MALLOC_TRIM_THRESHOLD_ in its
workers for the same reason. A MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ in the environment
is the user's choice, already applied by glibc, and is left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

THRESHOLD = 32 * 2**20  # bytes: glibc's largest dynamic mmap threshold, fixed
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def return_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds at `THRESHOLD` for this process; True if they were set."""
    if platform.libc_ver()[0] != "glibc" or any(name in os.environ for name in USER_SETTINGS):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
