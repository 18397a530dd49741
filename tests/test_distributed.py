"""Extraction on a dask.distributed LocalCluster: a worker killed mid-task loses only that task."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import xarray as xr

from conftest import SAMPLE_TEXT, write_suite
from tokendyn.models.extract import extract

COMPARED = ("loss", "rank", "done", "val_ppl", "weights_hash", "step", "tokens_seen", "source", "token_id")


@pytest.mark.slow
def test_killed_worker_store_equals_single_process(tmp_path):
    from distributed import Client, LocalCluster

    suite = write_suite(tmp_path, families=("opt", "gpt_neox"), steps=(0, 1, 2, 3), text=SAMPLE_TEXT * 12)
    reference = extract(suite, tmp_path / "single.zarr", metrics=["rank"], batch_tokens=64, progress=False)

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        out = tmp_path / "cluster.zarr"
        errors = []

        def run():
            try:
                extract(
                    suite, out, metrics=["rank"], batch_tokens=64, progress=False, scheduler=cluster.scheduler_address
                )
            except BaseException as err:  # re-raised in the test thread below
                errors.append(err)

        thread = threading.Thread(target=run)
        thread.start()
        pids = client.run(os.getpid)
        victim, deadline = None, time.time() + 120
        while victim is None and time.time() < deadline and thread.is_alive():
            busy = {
                worker: keys
                for worker, keys in client.processing().items()
                if any(str(k).startswith("tokendyn-") for k in keys)
            }
            if busy and (out / "zarr.json").exists():
                time.sleep(0.5)  # let the task load its checkpoint and write some chunks
                busy = {w: keys for w, keys in client.processing().items() if keys}
                victim = next(iter(busy), None)
            time.sleep(0.05)
        assert victim is not None, "no task was seen running"
        os.kill(pids[victim], signal.SIGKILL)
        thread.join(timeout=300)
        assert not errors, errors
        assert pids[victim] not in client.run(os.getpid).values()  # the nanny started a new process

    got, want = xr.open_zarr(out), xr.open_zarr(reference)
    for name in COMPARED:
        np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)
    assert got.attrs["complete"] == want.attrs["complete"] == {"opt": [0, 1, 2, 3], "gpt_neox": [0, 1, 2, 3]}


@pytest.mark.slow
def test_local_cluster_of_two_workers_equals_single_process(tmp_path):
    suite = write_suite(tmp_path, families=("opt",), steps=(0, 1, 2))
    reference = extract(suite, tmp_path / "single.zarr", progress=False)
    out = extract(suite, tmp_path / "cluster.zarr", workers=2, progress=False)
    got, want = xr.open_zarr(out), xr.open_zarr(reference)
    for name in ("loss", "done", "val_ppl", "weights_hash"):
        np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)
    assert got.attrs["complete"] == {"opt": [0, 1, 2]}


@pytest.mark.slow
def test_relative_out_names_the_clients_store_on_workers_elsewhere(tmp_path, monkeypatch):
    """Workers started in another folder (as a Slurm job is) write to the client's store, never to a
    store of the same relative name in their own folder (was: written over, and "store written")."""
    from distributed import Client, LocalCluster

    suite = write_suite(tmp_path, families=("opt",), steps=(0, 1))
    elsewhere = tmp_path / "elsewhere"
    foreign = extract(suite, elsewhere / "s.zarr", progress=False)
    before = xr.open_zarr(foreign)["loss"].values.copy()
    monkeypatch.chdir(tmp_path)
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        client.run(os.chdir, str(elsewhere))
        extract(suite, "s.zarr", progress=False, scheduler=cluster.scheduler_address)
    assert xr.open_zarr(tmp_path / "s.zarr")["done"].values.all()
    np.testing.assert_array_equal(xr.open_zarr(foreign)["loss"].values, before)
