"""Page faults of repeated large allocations: a block mapped afresh is faulted in again, one served
from glibc's heap is not. Run in fresh processes and dask workers by tests/test_memory.py."""

from __future__ import annotations

import resource

import numpy as np

SIZES = (25 * 2**20, 64 * 2**20)  # an MLP activation of SmolLM2-135M at 8 x 512 positions; a chunk of logits
MAPPED = 16  # more faults per allocation than this: mapped afresh (64 MiB is 32 faults even in 2 MiB pages)
ON_HEAP = 8  # fewer than this: served from the heap (0 measured)


def faults_per_allocation() -> dict[str, float]:
    """Minor page faults of this thread (not the others of a dask worker) allocating and freeing an array of
    each of `SIZES`, after a first one."""
    out = {}
    for size in SIZES:
        np.ones(size // 8)
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(4):
            np.ones(size // 8)
        out[str(size >> 20)] = (resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 4
    return out
