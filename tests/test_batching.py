"""--batch-size (windows per forward pass, as in lm-eval) and --batch-tokens (a token budget)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr

import tokendyn.models.extract as extract_module
from conftest import SAMPLE_TEXT, write_suite
from tokendyn.cli import main
from tokendyn.data.corpus import plan_batches
from tokendyn.errors import TokendynError
from tokendyn.models import gpu, onednn
from tokendyn.models.extract import extract


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_plan_holds_at_most_batch_size_windows_and_every_window_once(batch_size):
    lengths = np.random.default_rng(0).integers(5, 40, size=50)
    batches = plan_batches(lengths, None, batch_size=batch_size)
    assert max(len(rows) for rows in batches) <= batch_size
    assert sorted(np.concatenate(batches).tolist()) == list(range(50))
    if batch_size > 1:  # equal lengths: full batches, as lm-eval's --batch-size
        assert [len(rows) for rows in plan_batches(np.full(20, 16), None, batch_size=batch_size)][:-1] == [
            batch_size
        ] * (20 // batch_size - (20 % batch_size == 0))


def test_scores_do_not_depend_on_the_batching(tmp_path, monkeypatch):
    suite = write_suite(tmp_path, families=("gpt_neox",), steps=(0, 1), text=SAMPLE_TEXT * 3, split="paragraph")
    rows_seen = []
    real = extract_module.token_scores

    def spy(model, input_ids, score, metrics=("loss",)):
        rows_seen.append(input_ids.shape[0])
        return real(model, input_ids, score, metrics)

    monkeypatch.setattr(extract_module, "token_scores", spy)
    stores = {}
    for label, kwargs in {"size1": dict(batch_size=1), "size3": dict(batch_size=3), "tokens": {}}.items():
        rows_seen.clear()
        out = extract(suite, tmp_path / f"{label}.zarr", metrics=["rank"], progress=False, **kwargs)
        stores[label] = xr.open_zarr(out)
        if label == "size1":
            assert set(rows_seen) == {1}
        if label == "size3":
            assert max(rows_seen) == 3  # batches of up to 3 windows, never more
    assert stores["size1"].sizes["token"] > 100
    for label in ("size3", "tokens"):
        np.testing.assert_allclose(stores[label].loss.values, stores["size1"].loss.values, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(stores[label].done.values, stores["size1"].done.values)
    assert json.loads(stores["size3"].attrs["summary"])["batch_size"] == 3


def test_batch_size_and_batch_tokens_are_exclusive(tmp_path, capsys):
    with pytest.raises(TokendynError, match="not both"):
        extract(tmp_path / "suite.toml", tmp_path / "s.zarr", batch_size=2, batch_tokens=64)
    with pytest.raises(TokendynError, match="at least 1"):
        extract(tmp_path / "suite.toml", tmp_path / "s.zarr", batch_size=0)
    with pytest.raises(SystemExit):
        main(["extract", "suite.toml", "--out", "s.zarr", "--batch-size", "2", "--batch-tokens", "64"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_batch_size_auto_follows_the_free_memory_and_scores_as_batch_size_1(tmp_path, monkeypatch, capsys):
    suite = write_suite(tmp_path, families=("gpt_neox",), steps=(0, 1), text=SAMPLE_TEXT * 3, split="paragraph")
    rows_seen = []
    real = extract_module.token_scores

    def spy(model, input_ids, score, metrics=("loss",)):
        rows_seen.append(input_ids.shape[0])
        return real(model, input_ids, score, metrics)

    monkeypatch.setattr(extract_module, "token_scores", spy)
    reference = xr.open_zarr(extract(suite, tmp_path / "one.zarr", batch_size=1, progress=False))
    n_windows = len(rows_seen) // 2  # one window per batch, two checkpoints
    assert n_windows > 4

    def run(label: str, free_bytes: int) -> tuple[int, list[int]]:
        monkeypatch.setattr(gpu, "free_memory", lambda device: (free_bytes, "test memory"))
        rows_seen.clear()
        out = main(["extract", str(suite), "--out", str(tmp_path / f"{label}.zarr"), "--batch-size", "auto"])
        assert out == 0
        ds = xr.open_zarr(tmp_path / f"{label}.zarr")
        np.testing.assert_allclose(ds.loss.values, reference.loss.values, rtol=1e-5, atol=1e-6)
        return json.loads(ds.attrs["summary"])["batch_size"], list(rows_seen)

    # The sizing written out independently: 70% of the memory, less the weights (float32; twice on x86 CPUs,
    # where the linear layers are also packed for oneDNN) and the head's 3 float32 copies of CHUNK_LOGITS
    # logits, over 4 bytes x (6 x (hidden + intermediate) + hidden) per position.
    hidden, intermediate, window = 32, 64, 16
    weights = 4 * int(reference.n_params.values[0]) * onednn.weight_copies("cpu", torch.float32, "gpt_neox")
    per_window = window * 4 * (6 * (hidden + intermediate) + hidden)
    fixed = 3 * 4 * extract_module.CHUNK_LOGITS
    small = int(weights + (fixed + 3.5 * per_window) / 0.7)  # room for 3 windows
    size, rows = run("small", small)
    assert size == 3 and max(rows) == 3  # no batch holds more than the chosen size
    assert "--batch-size auto: 3 windows" in capsys.readouterr().out
    size, rows = run("large", 2**40)
    assert size == n_windows and max(rows) > 3  # ample memory: every window in one batch, as lm-eval's largest fit
