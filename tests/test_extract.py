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
import zarr
from transformers import AutoModelForCausalLM

import tokendyn
from conftest import save_checkpoint, write_suite
from test_protocols import lm_eval_windows
from tokendyn.config.suite import load_suite
from tokendyn.models.extract import extract, token_scores


@pytest.fixture(scope="module")
def store(tiny_suite, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s.zarr"
    extract(tiny_suite, out, metrics=["loss", "entropy", "rank"], progress=False)
    return out


def _reference(model_dir, tokens: list[int], prefix: int, seq_len: int):
    """Independent per-token scores over lm-eval's rolling windows: a plain log_softmax/gather, and
    transformers' `labels=` loss per window (the mean over the window's predicted tokens)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll, entropy, rank, window_losses = [], [], [], []
    with torch.no_grad():
        for inputs, predicted in lm_eval_windows(tokens, prefix, seq_len):
            ids = torch.tensor([inputs + [predicted[-1]]])
            labels = torch.full_like(ids, -100)
            labels[0, -len(predicted) :] = torch.tensor(predicted)
            out = model(input_ids=ids, labels=labels)
            logits = out.logits[0, -len(predicted) - 1 : -1]
            logp = torch.log_softmax(logits.double(), -1)
            target = torch.tensor(predicted)
            nll += (-logp[torch.arange(len(target)), target]).tolist()
            entropy += (-(logp.exp() * logp).sum(-1)).tolist()
            rank += (logits > logits.gather(1, target[:, None])).sum(-1).tolist()
            window_losses.append((out.loss.item(), len(predicted)))
    return np.asarray(nll), np.asarray(entropy), np.asarray(rank), window_losses


@pytest.mark.parametrize("family", ["opt", "gpt_neox", "llama"])
def test_losses_match_transformers(store, tiny_suite, tokenizer, family):
    ds = tokendyn.open_store(store)
    suite = load_suite(tiny_suite)
    m = [spec.name for spec in suite.models].index(family)
    tokens = tokenizer(suite.eval.files[0].read_text().strip(), add_special_tokens=False)["input_ids"]
    assert ds.token_id.values.tolist() == tokens  # one document (a .txt file is one by default), every token once
    for c, ckpt in enumerate(suite.models[m].checkpoints):
        nll, entropy, rank, window_losses = _reference(ckpt.path, tokens, tokenizer.eos_token_id, suite.eval.seq_len)
        got = ds.isel(model=m, ckpt=c)
        np.testing.assert_allclose(got.loss.values, nll, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.entropy.values, entropy, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got["rank"].values, rank)
        # transformers' mean `labels=` loss per window equals the mean of our per-token losses there
        counts = np.asarray([n for _, n in window_losses])
        per_window = [chunk.mean() for chunk in np.split(got.loss.values, np.cumsum(counts)[:-1])]
        np.testing.assert_allclose(per_window, [loss for loss, _ in window_losses], atol=1e-5)
        expected_ppl = np.exp(np.sum([loss * n for loss, n in window_losses]) / counts.sum())
        np.testing.assert_allclose(float(got.val_ppl), expected_ppl, rtol=1e-6)


def test_store_contract(store, tiny_suite):
    ds = tokendyn.open_store(store)
    assert ds.loss.dims == ("model", "ckpt", "token")
    assert ds.loss.chunks is not None  # lazy, dask-backed
    assert list(ds.model.values) == ["opt", "gpt_neox", "llama"]
    np.testing.assert_array_equal(ds.step.values, [[0, 10, 20]] * 3)
    for name in (
        "val_ppl",
        "bits_per_byte",
        "word_ppl",
        "n_params",
        "n_params_nonembed",
        "token_id",
        "doc",
        "offset",
        "n_context",
        "tokens_seen",
    ):
        assert name in ds.coords, name
    assert ds.step.dims == ds.val_ppl.dims == ds.bits_per_byte.dims == ("model", "ckpt")
    assert ds.token_id.dims == ds.doc.dims == ds.offset.dims == ds.n_context.dims == ("token",)
    assert np.isfinite(ds.loss.values).all()  # scored tokens only: no padding, no unpredicted position
    assert (ds.n_context.values >= 1).all() and ds.n_context.values.max() == load_suite(tiny_suite).eval.seq_len
    assert bool(ds.done.all())
    attrs = tokendyn.store.read_attrs(store)
    assert attrs["format_version"] == tokendyn.store.FORMAT_VERSION == 2
    assert json.loads(attrs["suite"])["models"][0]["name"] == "opt"
    assert attrs["complete"] == {"opt": [0, 1, 2], "gpt_neox": [0, 1, 2], "llama": [0, 1, 2]}
    for key in ("corpus_fingerprint", "tokenizer_fingerprint", "tokendyn_version", "protocol", "summary"):
        assert attrs[key]
    summary = json.loads(attrs["summary"])
    assert summary["scored_tokens"] == ds.sizes["token"] and summary["padding_share"] == 0
    assert ds.loss.encoding["chunks"] == (1, 1, ds.sizes["token"])


def test_open_zarr_without_tokendyn(store):
    code = (
        "import sys, xarray as xr\n"
        f"ds = xr.open_zarr({str(store)!r})\n"
        "assert 'tokendyn' not in sys.modules\n"
        "print(ds.loss.dims, float(ds.loss.isel(model=0, ckpt=0).mean()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "('model', 'ckpt', 'token')" in result.stdout


def test_token_text_decodes_the_store(store, tokenizer):
    ds = tokendyn.open_store(store)
    text = ds.tokendyn.token_text()
    assert "".join(text.values) == tokenizer.decode(ds.token_id.values)
    assert ds.tokendyn.context(5, width=3, mark=("<", ">")) == "".join(text.values[2:5]) + f"<{text.values[5]}>"


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
    np.testing.assert_allclose(
        ds.loss.sel(model="short").isel(ckpt=0), ds.loss.sel(model="opt").isel(ckpt=1), rtol=1e-3
    )


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
    score = ids >= 0
    score[:, :3] = False  # context only
    with torch.inference_mode():
        whole = token_scores(model, ids, score, ["loss", "entropy", "rank"])
        monkeypatch.setattr(ex, "CHUNK_LOGITS", len(tokenizer) * 5)  # five positions per chunk
        chunked = token_scores(model, ids, score, ["loss", "entropy", "rank"])
        logp = torch.log_softmax(model(input_ids=ids[:2]).logits.double(), -1)
    for metric in whole:
        assert whole[metric].shape == (int(score.sum()),)
        np.testing.assert_allclose(whole[metric], chunked[metric], atol=1e-6)
    expected = -logp[:, 2:-1].gather(2, ids[:2, 3:, None])[..., 0].reshape(-1)
    np.testing.assert_allclose(whole["loss"][: len(expected)], expected, atol=1e-5)


def test_head_with_bias_scores_through_the_model_head(tokenizer, tmp_path):
    """A head other than a bias-free linear layer skips the reused logits buffer and equals transformers' loss."""
    import tokendyn.models.extract as ex

    model = save_checkpoint(tmp_path, "gpt_neox", tokenizer, seed=4)
    plain = model.get_output_embeddings()
    biased = torch.nn.Linear(plain.in_features, plain.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(plain.weight)
        biased.bias.copy_(torch.linspace(-1, 1, plain.out_features))
    model.set_output_embeddings(biased)
    assert ex._head_buffers(biased, 4, torch.zeros(3, plain.in_features)) is None
    products, logits = ex._head_buffers(plain, 4, torch.zeros(3, plain.in_features))
    assert products is logits and logits.shape == (3, plain.out_features)  # float32: one buffer
    ids = torch.randint(0, len(tokenizer), (2, 10))
    score = torch.ones_like(ids, dtype=torch.bool)
    score[:, 0] = False
    loss = token_scores(model, ids, score)["loss"]
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.double(), -1)
    expected = -logp.gather(2, ids[:, 1:, None])[..., 0].reshape(-1)
    np.testing.assert_allclose(loss, expected, atol=1e-5)


@pytest.mark.parametrize("pack", [False, True])
def test_softcapped_logits_equal_the_models_own(tokenizer, pack):
    """Gemma 2 caps its logits after the head (final_logit_softcapping): scoring takes the model's own
    logits, with and without the oneDNN-packed layers."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from tokendyn.models import onednn

    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=8, final_logit_softcapping=2.0,
    )  # fmt: skip
    torch.manual_seed(6)
    model = Gemma2ForCausalLM(config).eval()
    ids = torch.randint(0, len(tokenizer), (2, 12))
    score = torch.ones_like(ids, dtype=torch.bool)
    score[:, 0] = False
    with torch.inference_mode():
        logits = model(input_ids=ids[:, :-1]).logits.double()
        assert logits.abs().max() < 2.0  # the cap is in force: scores from the bare head would differ
        if pack and onednn.available():
            assert onednn.pack_linear_layers(model) > 0
        got = token_scores(model, ids, score, ["loss", "rank"])
    logp = torch.log_softmax(logits, -1)
    target = logp.gather(2, ids[:, 1:, None])
    np.testing.assert_allclose(got["loss"], -target[..., 0].reshape(-1), atol=1e-5)
    np.testing.assert_array_equal(got["rank"], (logp > target).sum(-1).reshape(-1).float())


def test_bfloat16_head_reuses_its_buffers_and_equals_the_models_logits(tokenizer, tmp_path, monkeypatch):
    """In half precision the head's product goes to a reused bfloat16 buffer and is copied into
    float32 logits: the same numbers as the model's own (bfloat16) logits taken to float32."""
    import tokendyn.models.extract as ex

    model = save_checkpoint(tmp_path, "llama", tokenizer, seed=5).to(torch.bfloat16)
    head = model.get_output_embeddings()
    products, logits = ex._head_buffers(head, 4, torch.zeros(3, head.in_features, dtype=torch.bfloat16))
    assert (products.dtype, logits.dtype) == (torch.bfloat16, torch.float32)
    assert products.shape == logits.shape == (3, head.out_features)
    ids = torch.randint(0, len(tokenizer), (2, 12))
    score = torch.ones_like(ids, dtype=torch.bool)
    score[:, 0] = False
    monkeypatch.setattr(ex, "CHUNK_LOGITS", len(tokenizer) * 5)  # five positions per chunk, the last one short
    with torch.inference_mode():
        got = token_scores(model, ids, score, ["loss", "rank"])
        logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)
    target = logp.gather(2, ids[:, 1:, None])
    np.testing.assert_allclose(got["loss"], -target[..., 0].reshape(-1), rtol=1e-6)
    np.testing.assert_array_equal(got["rank"], (logp > target).sum(-1).reshape(-1).float())


def test_no_attention_mask_warning_for_a_gpt2_style_tokenizer():
    """pad = bos = eos (GPT-2): every window starts with the pad id, and transformers warns (once per
    process) to pass an attention mask, which tokendyn leaves out on purpose; it is dropped where tokendyn
    calls the model, and only there (was: printed by every extract, even with -q)."""
    import logging

    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(1, 40, (2, 9))
    ids[:, 0] = 0  # the BOS that starts every window
    score = torch.ones_like(ids, dtype=torch.bool)
    score[:, 0] = False
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    try:
        logging.Logger.warning_once.cache_clear()  # a warning logged earlier in this process would hide it
        token_scores(model, ids, score)
        assert not any("attention_mask" in r.getMessage() for r in records)
        logging.Logger.warning_once.cache_clear()
        with torch.inference_mode():
            model(input_ids=ids)  # outside tokendyn's call, transformers' warning is as it was
        assert any("attention_mask" in r.getMessage() for r in records)
    finally:
        logger.removeHandler(handler)


def test_xarray_sees_lazy_chunks(store):
    ds = xr.open_zarr(store)
    assert ds.loss.data.chunksize[:2] == (1, 1)


def test_a_store_keeps_its_precision(tmp_path, capsys):
    """auto resumes in the precision the store was scored in; another dtype is refused unless --force."""
    out = tmp_path / "s.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an emulated bfloat16 warns on some CPUs
        extract(write_suite(tmp_path, steps=(0,)), out, dtype="bfloat16", progress=False)
        grown = write_suite(tmp_path, steps=(0, 5))  # TOKENDYN_DTYPE=float32 (conftest): auto alone means float32
        extract(grown, out)
        assert "in bfloat16 (the precision of" in capsys.readouterr().err
        reference = tmp_path / "bf16.zarr"
        extract(grown, reference, dtype="bf16", progress=False)
    ds = tokendyn.open_store(out)
    assert ds.attrs["compute_dtype"] == "bfloat16"
    np.testing.assert_array_equal(ds.loss.values, tokendyn.open_store(reference).loss.values)
    with pytest.raises(tokendyn.TokendynError, match="scored in bfloat16, not float32.*--dtype bfloat16"):
        extract(grown, out, dtype="float32", progress=False)
    extract(grown, out, dtype="float32", force=True, progress=False)
    ds = tokendyn.open_store(out)
    assert ds.attrs["compute_dtype"] == "float32"
    assert not np.array_equal(ds.loss.values, tokendyn.open_store(reference).loss.values)


def test_a_grown_store_names_the_sets_left_behind(tmp_path, capsys):
    from tokendyn.cli import main
    from tokendyn.config.suite import EvalSet

    out = tmp_path / "s.zarr"
    (tmp_path / "extra.txt").write_text("A cat sat on the mat. The lazy dog slept.")
    extra = [EvalSet("extra", (tmp_path / "extra.txt",), seq_len=16)]
    extract(write_suite(tmp_path, steps=(0,)), out, extra_sets=extra, progress=False)
    extract(write_suite(tmp_path, steps=(0, 5)), out, progress=True)  # grown, without the set
    assert "sets extra are not in this run" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    assert "opt: 1/2 checkpoints done; missing steps 5 (rerun extract with this set" in capsys.readouterr().out
    extract(write_suite(tmp_path, steps=(0, 5)), out, progress=True)  # nothing scored now: nothing to say
    assert "not in this run" not in capsys.readouterr().out


@pytest.mark.parametrize("complete", [True, False])
def test_fields_added_to_the_same_text_are_refused_not_dropped(tmp_path, complete):
    suite = write_suite(tmp_path, steps=(0, 5))
    lines = ["Alice was born in Paris.", "The lazy dog slept.", "A cat sat on the mat."]
    data = tmp_path / "data" / "valid.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    suite.write_text(suite.read_text().replace("data/valid.txt", "data/valid.jsonl"))
    out = tmp_path / "s.zarr"
    extract(suite, out, progress=False)
    if not complete:  # a checkpoint left to do: the store used to say it "lacks topic"
        tokendyn.store.clear_done(zarr.open_group(out, mode="r+"), "main", 0, 1)
    data.write_text("".join(json.dumps({"text": t, "topic": "x"}) + "\n" for t in lines))
    with pytest.raises(
        tokendyn.TokendynError, match=r"same evaluation corpus with other fields \(the files gained field"
    ):
        extract(suite, out, progress=False)
    assert "topic" not in tokendyn.open_store(out)


def test_per_checkpoint_perplexities_of_an_unfinished_checkpoint_read_as_nan(tmp_path):
    out = tmp_path / "s.zarr"
    extract(write_suite(tmp_path, steps=(0, 5)), out, progress=False)
    root = zarr.open_group(out, mode="r+")
    tokendyn.store.clear_done(root, "main", 0, 1)  # as a run killed between val_ppl and its done flag leaves it
    tokendyn.store.consolidate(root)
    assert np.isfinite(zarr.open_array(out / "val_ppl", mode="r")[0, 1])  # on disk
    ds = tokendyn.open_store(out)
    for name in ("val_ppl", "bits_per_byte", "word_ppl"):
        assert np.isnan(ds[name].values[0, 1]) and np.isfinite(ds[name].values[0, 0]), name
