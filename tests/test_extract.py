"""Extraction numbers against transformers' own loss, and the store contract."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from transformers import AutoModelForCausalLM

import tokendyn
from tokendyn.models.extract import extract, token_scores
from tokendyn.config.suite import load_suite

from conftest import save_checkpoint, write_suite


@pytest.fixture(scope="module")
def store(tiny_suite, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s.zarr"
    extract(tiny_suite, out, metrics=["loss", "entropy", "rank"], progress=False)
    return out


def _reference(model_dir, token_id: np.ndarray):
    """Independent per-token scores: transformers' `labels=` loss and a plain log_softmax/gather."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll = np.full(token_id.shape, np.nan)
    entropy = np.full(token_id.shape, np.nan)
    rank = np.full(token_id.shape, np.nan)
    mean_labels_loss = []
    with torch.no_grad():
        for s, row in enumerate(token_id):
            ids = torch.tensor(row[row >= 0], dtype=torch.long)[None]
            out = model(input_ids=ids, labels=ids)
            logp = torch.log_softmax(out.logits[0, :-1].double(), -1)
            target = ids[0, 1:]
            nll[s, 1: ids.shape[1]] = -logp[torch.arange(len(target)), target].numpy()
            entropy[s, 1: ids.shape[1]] = -(logp.exp() * logp).sum(-1).numpy()
            true = out.logits[0, :-1].gather(1, target[:, None])
            rank[s, 1: ids.shape[1]] = (out.logits[0, :-1] > true).sum(-1).numpy()
            mean_labels_loss.append((out.loss.item(), len(target)))
    return nll, entropy, rank, mean_labels_loss


@pytest.mark.parametrize("family", ["opt", "gpt_neox", "llama"])
def test_losses_match_transformers(store, tiny_suite, family):
    ds = tokendyn.open_store(store)
    suite = load_suite(tiny_suite)
    m = [spec.name for spec in suite.models].index(family)
    for c, ckpt in enumerate(suite.models[m].checkpoints):
        nll, entropy, rank, labels_losses = _reference(ckpt.path, ds.token_id.values)
        got = ds.isel(model=m, ckpt=c)
        np.testing.assert_allclose(got.loss.values, nll, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.entropy.values, entropy, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got["rank"].values, rank)
        # transformers' mean `labels=` loss per sequence equals the mean of our per-token losses
        per_seq = np.nanmean(got.loss.values, axis=1)
        np.testing.assert_allclose(per_seq, [loss for loss, _ in labels_losses], atol=1e-5)
        tokens = np.asarray([n for _, n in labels_losses])
        expected_ppl = np.exp(np.sum(per_seq * tokens) / tokens.sum())
        np.testing.assert_allclose(float(got.val_ppl), expected_ppl, rtol=1e-6)


def test_store_contract(store, tiny_suite):
    ds = tokendyn.open_store(store)
    assert ds.loss.dims == ("model", "ckpt", "seq", "pos")
    assert ds.loss.chunks is not None  # lazy, dask-backed
    assert list(ds.model.values) == ["opt", "gpt_neox", "llama"]
    np.testing.assert_array_equal(ds.step.values, [[0, 10, 20]] * 3)
    for name in ("val_ppl", "n_params", "n_params_nonembed", "token_id", "doc", "token_doc", "tokens_seen"):
        assert name in ds.coords, name
    assert ds.step.dims == ds.val_ppl.dims == ("model", "ckpt")
    assert ds.token_id.dims == ("seq", "pos") and ds.doc.dims == ("seq",)
    assert np.isnan(ds.loss.isel(pos=0)).all()
    padding = (ds.token_id == -1).values
    assert np.isnan(ds.loss.values[..., padding]).all()
    assert np.isfinite(ds.loss.values[..., ~padding][..., 1:]).any()
    assert bool(ds.done.all())
    attrs = tokendyn.store.read_attrs(store)
    assert json.loads(attrs["suite"])["models"][0]["name"] == "opt"
    assert attrs["complete"] == {"opt": [0, 1, 2], "gpt_neox": [0, 1, 2], "llama": [0, 1, 2]}
    for key in ("corpus_fingerprint", "tokenizer_fingerprint", "tokendyn_version"):
        assert attrs[key]
    assert ds.loss.encoding["chunks"][:2] == (1, 1)
    assert ds.loss.encoding["chunks"][3] == ds.sizes["pos"]


def test_open_zarr_without_tokendyn(store):
    code = (
        "import sys, xarray as xr\n"
        f"ds = xr.open_zarr({str(store)!r})\n"
        "assert 'tokendyn' not in sys.modules\n"
        "print(ds.loss.dims, float(ds.loss.isel(model=0, ckpt=0).mean()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "('model', 'ckpt', 'seq', 'pos')" in result.stdout


def test_token_text_decodes_the_store(store, tokenizer):
    ds = tokendyn.open_store(store)
    text = ds.tokendyn.token_text()
    row = ds.token_id.values[0]
    assert "".join(text.values[0]) == tokenizer.decode(row[row >= 0])
    assert text.values[ds.token_id.values == -1].tolist() == [""] * int((ds.token_id.values == -1).sum())


def test_float16_store_and_uneven_checkpoints(tmp_path):
    suite = write_suite(tmp_path, families=("opt",), steps=(0, 5))
    text = suite.read_text()
    # a second model with a single checkpoint: its second slot stays NaN
    text += '\n[[models]]\nname = "short"\ncheckpoints = [{ step = 7, path = "ckpts/opt/step5" }]\n'
    suite.write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract(suite, tmp_path / "s.zarr", store_dtype="float16", progress=False)
    ds = tokendyn.open_store(tmp_path / "s.zarr")
    assert ds.loss.dtype == np.float16
    assert np.isnan(ds.step.sel(model="short").values[1])
    assert np.isnan(ds.loss.sel(model="short").isel(ckpt=1)).all()
    assert not bool(ds.done.sel(model="short").isel(ckpt=1))
    # same weights under two names: the same losses, up to float16 rounding
    np.testing.assert_allclose(ds.loss.sel(model="short").isel(ckpt=0), ds.loss.sel(model="opt").isel(ckpt=1),
                               rtol=1e-3)


def test_identical_weights_warn(tmp_path):
    suite = write_suite(tmp_path, families=("opt",), steps=(0, 5))
    text = suite.read_text().replace('path = "ckpts/opt/step5"', 'path = "ckpts/opt/step0"')
    suite.write_text(text)
    with pytest.warns(UserWarning, match="identical weights"):
        extract(suite, tmp_path / "s.zarr", progress=False)


def test_chunked_head_equals_one_chunk(monkeypatch, tokenizer, tmp_path):
    """Splitting the head into small chunks changes nothing (memory bound, same numbers)."""
    import tokendyn.models.extract as ex

    model = save_checkpoint(tmp_path, "gpt_neox", tokenizer, seed=3)
    ids = torch.randint(0, len(tokenizer), (3, 12))
    ids[2, 8:] = -1
    with torch.inference_mode():
        whole = token_scores(model, ids, ["loss", "entropy", "rank"])
        monkeypatch.setattr(ex, "CHUNK_LOGITS", len(tokenizer) * 5)  # five positions per chunk
        chunked = token_scores(model, ids, ["loss", "entropy", "rank"])
    for metric in whole:
        np.testing.assert_allclose(whole[metric], chunked[metric], atol=1e-6, equal_nan=True)
    assert torch.isnan(whole["loss"][2, 8:]).all() and torch.isnan(whole["loss"][:, 0]).all()


def test_xarray_sees_lazy_chunks(store):
    ds = xr.open_zarr(store)
    assert ds.loss.data.chunksize[:2] == (1, 1)
