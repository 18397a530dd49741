"""SIGKILL during extraction, rerun: the store equals one from an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import xarray as xr

import tokendyn
from conftest import SAMPLE_TEXT, write_suite
from tokendyn.cli.info import describe

# Small chunks so that every checkpoint writes many blocks and the kill lands inside a checkpoint.
RUNNER = """
import sys
import tokendyn.store
tokendyn.store.CHUNK_VALUES = 64
from tokendyn.cli import main
sys.exit(main(["extract", sys.argv[1], "--out", sys.argv[2], "--no-progress", "--batch-tokens", "64"]))
"""


def extract_in_subprocess(suite: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(suite), str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    suite = write_suite(tmp_path, families=("opt",), steps=(0, 1, 2, 3), text=SAMPLE_TEXT * 3)
    reference = tmp_path / "reference.zarr"
    assert extract_in_subprocess(suite, reference).wait(timeout=300) == 0

    store = tmp_path / "killed.zarr"
    proc = extract_in_subprocess(suite, store)
    inside_third = store / "loss" / "c" / "0" / "2" / "0"  # first block of checkpoint 2 written
    deadline = time.time() + 300
    while not inside_third.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    interrupted = tokendyn.open_store(store)
    assert interrupted.done.values.tolist() == [[True, True, False, False]]
    summary = describe(store)
    assert "2/4 checkpoints done" in summary and "missing steps 2, 3" in summary

    assert extract_in_subprocess(suite, store).wait(timeout=300) == 0
    got, want = xr.open_zarr(store), xr.open_zarr(reference)
    for name in ("loss", "done", "val_ppl", "weights_hash", "step", "token_id"):
        np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)
    assert got.attrs["complete"] == want.attrs["complete"] == {"opt": [0, 1, 2, 3]}
