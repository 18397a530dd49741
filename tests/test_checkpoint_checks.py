"""Mislabelled checkpoints (methods.md §6): identical weights under several steps, found from the
hashes a real extraction stores, and checkpoints whose validation loss places them later in training."""

from __future__ import annotations

import shutil

import numpy as np
import xarray as xr

import tokendyn
from conftest import write_suite
from planted_stores import write_store
from tokendyn.analysis.checkpoints import identical_weights, out_of_order
from tokendyn.cli import main
from tokendyn.studies.perplexity import run as perplexity

STEPS = np.array([[100, 200, 300, 400, 500, 600, 700, 800.0]])


def store_with_losses(path, mean_losses) -> xr.Dataset:
    """A one-model store whose checkpoints have these mean losses (val_ppl = exp of each)."""
    loss = np.broadcast_to(np.asarray(mean_losses, dtype=np.float32)[None, :, None, None], (1, 8, 4, 8))
    return write_store(path, loss, STEPS)


def test_a_checkpoint_below_all_of_the_next_ones_is_flagged(tmp_path):
    # step 300 holds the final weights: its loss is below the next three checkpoints' and reached again at the end
    ds = store_with_losses(tmp_path / "s.zarr", [3.0, 2.8, 2.1, 2.6, 2.5, 2.4, 2.3, 2.1])
    flagged = out_of_order(ds)
    assert flagged[["model", "step"]].values.tolist() == [["m0", 300]]
    np.testing.assert_allclose(flagged[["loss", "later"]].values, [[2.1, 2.4]], rtol=1e-6)
    finding = [line for line in perplexity(ds).findings if "step 300" in line]
    assert finding == [
        "The checkpoint of m0 at step 300 has a validation loss 2.100 nats, below each of the next 3 "
        "checkpoints (lowest 2.400): its weights may come from later in training."
    ]


def test_noise_and_a_short_spike_are_not_flagged(tmp_path):
    # a falling curve with noise below the margin, and a spike at step 400 that recovers by step 600
    ds = store_with_losses(tmp_path / "s.zarr", [3.0, 2.8, 2.7, 3.2, 3.1, 2.6, 2.61, 2.5])
    assert out_of_order(ds).empty
    assert out_of_order(ds, window=2).step.tolist() == [300]  # a narrower window sees only the spike


def test_a_model_that_overfits_after_its_best_checkpoint_is_not_flagged(tmp_path):
    ds = store_with_losses(tmp_path / "s.zarr", [3.0, 2.8, 2.5, 2.3, 2.35, 2.4, 2.45, 2.5])
    assert out_of_order(ds).empty


def test_identical_weights_found_from_the_hashes_of_a_real_extraction(tmp_path, capsys):
    suite = write_suite(tmp_path, families=("opt",), steps=(0, 10, 20))
    shutil.rmtree(tmp_path / "ckpts/opt/step20")
    shutil.copytree(tmp_path / "ckpts/opt/step10", tmp_path / "ckpts/opt/step20")  # served twice
    assert main(["extract", str(suite), "--out", str(tmp_path / "s.zarr"), "--quiet"]) == 0
    ds = tokendyn.open_store(tmp_path / "s.zarr")
    assert identical_weights(ds).values.tolist() == [["opt", [10, 20]]]
    line = "Checkpoints of opt at steps 10, 20 have identical weights (a known defect of some public suites): "
    assert line + "check those revisions." in perplexity(ds).findings
    capsys.readouterr()
    assert main(["info", str(tmp_path / "s.zarr")]) == 0
    assert f"suspect   {line}" in capsys.readouterr().out
