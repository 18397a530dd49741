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
- Scoring (`tokendyn extract`, `generate`, `tasks`, `passuntil`, and the CPU workers of a cluster
  tokendyn starts): every batch allocates the same activations again (one MLP activation of 8 x 512
  positions of SmolLM2-135M is 25 MB, a chunk of logits 64 MiB). Mapped afresh, or trimmed and grown
  back, their pages were faulted in and zeroed batch after batch. `SCORING` keeps blocks below
  256 MiB on the heap and trims it only past 1 GiB: scoring took 11-13% less time on SmolLM2-135M's
  shape and 7% less on Pythia-160M's, for 0.2 GB more peak (`docs/benchmarks.md`).

Three limits. A thread other than the main one allocates from its own arena, which serves blocks of
at most 64 MiB; larger ones are mapped whatever the threshold (the workers tokendyn starts therefore
get a single arena, `tokendyn.models.distributed`). glibc releases before the limit was lifted refuse
an mmap threshold over 32 MiB: `use` then changes nothing and returns False. A MALLOC_MMAP_THRESHOLD_
or MALLOC_TRIM_THRESHOLD_ the process started with (or the same in GLIBC_TUNABLES) is the user's
choice, already applied by glibc, and is left alone. A Python session keeps glibc's own thresholds
unless it calls `use`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")  # the same, in GLIBC_TUNABLES
MiB = 2**20


@dataclass(frozen=True)
class Thresholds:
    """glibc's mmap threshold (blocks this large or larger are mapped) and trim threshold, in bytes."""

    mmap: int
    trim: int

    def __post_init__(self) -> None:
        for name, value in (("mmap", self.mmap), ("trim", self.trim)):
            if not 0 < value < 2**31:  # mallopt takes a C int; ctypes would wrap a larger value silently
                raise ValueError(f"{name} threshold {value} is outside 1..2**31-1 bytes, what mallopt accepts")

    def environment(self) -> dict[str, str]:
        """The same thresholds as environment variables, read by glibc when a new process starts."""
        return {"MALLOC_MMAP_THRESHOLD_": str(self.mmap), "MALLOC_TRIM_THRESHOLD_": str(self.trim)}


ANALYSIS = Thresholds(mmap=32 * MiB, trim=32 * MiB)  # glibc's largest dynamic mmap threshold, fixed
SCORING = Thresholds(mmap=256 * MiB, trim=1024 * MiB)  # 128 MiB / 256 MiB measured the same


@functools.cache
def start_environment() -> dict[str, str]:
    """The environment this process started with, which glibc read (`os.environ` where /proc is missing).

    Not `os.environ`: dask's nanny writes its workers' MALLOC_ settings into its own process's.
    """
    try:
        entries = Path("/proc/self/environ").read_bytes().split(b"\0")
    except OSError:
        return dict(os.environ)
    environ: dict[str, str] = {}
    for name, value in (os.fsdecode(entry).split("=", 1) for entry in entries if b"=" in entry):
        environ.setdefault(name, value)  # glibc reads the first of duplicates
    return environ


def user_set() -> bool:
    """Whether this process started with one of glibc's thresholds set (then tokendyn sets neither)."""
    environ = start_environment()
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(name in environ for name in USER_SETTINGS) or any(name in tunables for name in USER_TUNABLES)


def use(thresholds: Thresholds) -> bool:
    """Fix glibc's thresholds for this process; True if they were set (False off glibc, if `user_set`,
    or if this glibc refuses them)."""
    if platform.libc_ver()[0] != "glibc" or user_set():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(M_MMAP_THRESHOLD, thresholds.mmap)) and bool(mallopt(M_TRIM_THRESHOLD, thresholds.trim))


@functools.cache
def accepted(thresholds: Thresholds) -> bool:
    """Whether this machine's glibc accepts `thresholds` (asked in a short-lived child process, so that
    this one keeps its own); before passing them to new processes as `Thresholds.environment`."""
    if platform.libc_ver()[0] != "glibc":
        return False
    code = (
        "import ctypes, sys; mallopt = ctypes.CDLL(None).mallopt; "
        f"sys.exit(0 if mallopt({M_MMAP_THRESHOLD}, {thresholds.mmap}) and mallopt({M_TRIM_THRESHOLD}, "
        f"{thresholds.trim}) else 1)"
    )
    clean = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", code], env=clean, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    except OSError:  # no interpreter to start (an embedded Python), or no process to spare
        return False
    return done.returncode == 0
