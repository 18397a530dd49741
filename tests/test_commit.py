"""A checkpoint's commit (`store.commit_checkpoint`): done flags, then attributes, then consolidated metadata.

The consolidated metadata is refreshed for the changed groups only; these tests check it against zarr's
own full consolidation, and kill a real run (SIGKILL, no clean-up) between a checkpoint's flags and its
attributes, and between the sets' attributes and the root's, then check the store and its resumption.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
import zarr

import tokendyn
from conftest import SAMPLE_TEXT, write_suite
from tokendyn import store
from tokendyn.cli import main
from tokendyn.store import verify

# Kills the process (SIGKILL: no finally, no clean-up) at the n-th metadata file it writes itself.
RUNNER = """
import os, signal, sys
import tokendyn.store.write as write
real, calls = write.write_zarr_json, {"n": 0}
def write_json(file, document, **options):
    calls["n"] += 1
    if calls["n"] == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    real(file, document, **options)
write.write_zarr_json = write_json
from tokendyn.cli import main
sys.exit(main(["extract", *sys.argv[2:], "--no-progress"]))
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A suite of one model with three checkpoints, a named set, and a store of it."""
    root = tmp_path_factory.mktemp("commit")
    suite = write_suite(root, families=("opt",), steps=(0, 1, 2))
    (root / "other.txt").write_text(SAMPLE_TEXT.upper())
    args = [str(suite), "--set", f"other={root / 'other.txt'}"]
    assert main(["extract", *args, "--out", str(root / "reference.zarr"), "--no-progress"]) == 0
    return root, args


def consolidated(path) -> dict:
    return json.loads((path / "zarr.json").read_text())


def test_refresh_equals_a_full_consolidation(work, tmp_path):
    root_dir, _ = work
    path = tmp_path / "s.zarr"
    shutil.copytree(root_dir / "reference.zarr", path)
    root = zarr.open_group(path, mode="r+")
    store.clear_done(root, "other", 0, 1)
    store.clear_done(root, "main", 0, 1)
    store.commit_checkpoint(root, 0, 1, "opt", ["main"], {"other": "a reason"})
    refreshed = consolidated(path)
    store.consolidate(root)
    assert refreshed == consolidated(path)  # the same document zarr writes from every node on disk
    ds = tokendyn.open_store(path, set="other")
    assert ds.attrs["refused"] == {"0,1": "a reason"}
    assert ds.attrs["complete"] == {"opt": [0, 2]}  # follows the flags: (0, 1) was cleared, then refused
    assert tokendyn.open_store(path).attrs["complete"] == {"opt": [0, 1, 2]}

    store.commit_checkpoint(root, 0, 1, "opt", ["other"])
    refreshed = consolidated(path)
    store.consolidate(root)
    assert refreshed == consolidated(path)
    ds = tokendyn.open_store(path, set="other")
    assert ds.attrs["refused"] == {} and ds.attrs["complete"] == {"opt": [0, 1, 2]}
    assert ds.done.values.tolist() == [[True, True, True]]
    own = dict(zarr.open_group(path / "sets" / "other", mode="r").attrs)  # the group's own zarr.json
    assert own == {k: v for k, v in ds.attrs.items() if k != "tokendyn_set"}
    assert verify(path, full=True) == []


def test_clear_done_writes_only_set_flags(work, tmp_path):
    root_dir, _ = work
    path = tmp_path / "s.zarr"
    shutil.copytree(root_dir / "reference.zarr", path)
    root = zarr.open_group(path, mode="r+")
    rows = {}
    chunk = path / "done" / "c" / "0" / "1"
    stamp = store.metadata_stamp(path)
    with zarr.config.set({"array.write_empty_chunks": True}):  # as under the writer lock
        store.clear_done(root, "main", 0, 1, rows)
        assert store.metadata_stamp(path) != stamp  # readers' caches see the cleared flag
        assert not tokendyn.open_store(path).done.values[0, 1]
        written = chunk.stat().st_mtime_ns
        assert rows["main", 0].tolist() == [True, False, True]
        store.clear_done(root, "main", 0, 1, rows)  # already unset: nothing written
    assert chunk.stat().st_mtime_ns == written
    assert tokendyn.open_store(path).attrs["complete"] == {"opt": [0, 2]}  # left before the flag
    assert store.done_row(root, "main", 0).tolist() == [True, False, True]  # what the store holds


@pytest.mark.parametrize("kill_at", [3, 4], ids=["after-flags", "after-set-attributes"])
def test_killed_between_flags_and_attributes(work, tmp_path, kill_at):
    """Writes 1-2 commit checkpoint 0 (the set's zarr.json, then the root's); the kill at write 3 lands
    after checkpoint 1's done flags, before any of its attributes; at write 4, after the set's attributes,
    before the root's (the main set's attributes and the consolidated metadata)."""
    root_dir, args = work
    path = tmp_path / "killed.zarr"
    run = subprocess.run([sys.executable, "-c", RUNNER, str(kill_at), *args, "--out", str(path)], timeout=300)
    assert run.returncode < 0  # killed
    for name in ("main", "other"):
        ds = tokendyn.open_store(path, set=name)  # attributes from the consolidated metadata
        assert ds.done.values.tolist() == [[True, True, False]]
        assert ds.attrs["complete"] == {"opt": [0]}  # lags the flags, never leads them
    assert verify(path, full=True) == []  # every flag set is backed by its chunks

    assert main(["extract", *args, "--out", str(path), "--no-progress"]) == 0
    for name in ("main", "other"):
        got = tokendyn.open_store(path, set=name)
        want = tokendyn.open_store(root_dir / "reference.zarr", set=name)
        for var in ("loss", "done", "val_ppl", "token_id"):
            np.testing.assert_array_equal(got[var].values, want[var].values, err_msg=f"{name} {var}")
        assert got.attrs["complete"] == {"opt": [0, 1, 2]}
    assert (
        consolidated(path)["consolidated_metadata"]
        == consolidated(root_dir / "reference.zarr")["consolidated_metadata"]
    )
    assert xr.open_zarr(path).attrs["complete"] == {"opt": [0, 1, 2]}
