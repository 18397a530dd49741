"""glibc's malloc thresholds, set for the kind of work a process does (glibc only).

glibc maps every block of at least its mmap threshold afresh (the kernel faults in and zeroes its
pages on first touch, and unmaps them on free), serves smaller blocks from its heap, and gives the
top of the heap back to the system once more than its trim threshold is free there. By default the
mmap threshold starts at 128 KiB and rises, up to 32 MiB, each time a mapped block is freed; the
trim threshold follows at twice that. That suits tokendyn's two long kinds of work badly, in
opposite directions:

- Analysis (`tokendyn analyze`, `report`): the studies' per-token arrays, kept on the heap once
  freed, fit the next study's arrays of other sizes poorly, and the peak grew with the number of
  tokens (by 30-70 bytes per token and model, `benchmarks/analysis.py`). `ANALYSIS` maps and unmaps
  every array of 32 MiB or more and trims the heap once 32 MiB at its top are free.
- Scoring (`tokendyn extract`, `generate`, `tasks`, and the workers of a cluster tokendyn starts):
  every batch allocates the same activations again (one MLP activation of 8 x 512 positions of
  SmolLM2-135M is 25 MB, a chunk of logits 64 MiB). Mapped afresh, or trimmed and grown back, their
  pages were faulted in and zeroed batch after batch. `SCORING` keeps blocks below 256 MiB on the
  heap and trims it only past 1 GiB: scoring took 11-13% less time on SmolLM2-135M's shape and 7%
  less on Pythia-160M's, for 0.2 GB more peak (`docs/benchmarks.md`).

dask.distributed's nanny starts its workers with MALLOC_TRIM_THRESHOLD_=65536 (which also fixes the
mmap threshold at 128 KiB); the workers of a cluster tokendyn starts get `SCORING` instead. A
MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ in the environment is the user's choice, already
applied by glibc, and is left alone. A Python session keeps glibc's own thresholds unless it calls
`use` (or starts with those variables set).
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
MiB = 2**20


@dataclass(frozen=True)
class Thresholds:
    """glibc's mmap threshold (blocks this large or larger are mapped) and trim threshold, in bytes."""

    mmap: int
    trim: int

    def environment(self) -> dict[str, str]:
        """The same thresholds as environment variables, read by glibc when a new process starts."""
        return {"MALLOC_MMAP_THRESHOLD_": str(self.mmap), "MALLOC_TRIM_THRESHOLD_": str(self.trim)}


ANALYSIS = Thresholds(mmap=32 * MiB, trim=32 * MiB)  # glibc's largest dynamic mmap threshold, fixed
SCORING = Thresholds(mmap=256 * MiB, trim=1024 * MiB)  # 128/256 MiB and 1/4 GiB measured the same


def user_set() -> bool:
    """Whether the environment sets one of glibc's thresholds (then tokendyn sets neither)."""
    return any(name in os.environ for name in USER_SETTINGS)


def use(thresholds: Thresholds) -> bool:
    """Fix glibc's thresholds for this process; True if they were set (False off glibc or if `user_set`)."""
    if platform.libc_ver()[0] != "glibc" or user_set():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(M_MMAP_THRESHOLD, thresholds.mmap)) and bool(mallopt(M_TRIM_THRESHOLD, thresholds.trim))
