"""Named sets, corruption, pairs and sequence-level analyses, checked against independent computations
(transformers' loss, hand-built pairs, np.interp), and resuming a multi-set extraction after SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from transformers import AutoModelForCausalLM

import tokendyn
import tokendyn.models.extract
from conftest import SAMPLE_TEXT, write_suite
from test_protocols import lm_eval_windows
from tokendyn.analysis import sequences
from tokendyn.cli import main
from tokendyn.config.suite import load_suite
from tokendyn.data.corpus import corrupt_tokens
from tokendyn.errors import TokendynError
from tokendyn.models.generate import generate, write_jsonl
from tokendyn.pipelines.analyze import analyze

PAIRS = [
    {"true": "Alice was born in Paris.", "false": "Alice was born in Berlin.", "attribute": "city"},
    {"true": "Bob lives in Berlin.", "false": "Bob lives in the green lazy Paris.", "attribute": "city"},
    {"true": "His favourite colour is green.", "false": "His favourite colour is brown.", "attribute": "colour"},
]


def _write_pairs(path, pairs=PAIRS):
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    suite = write_suite(root, families=("opt", "llama"), steps=(0, 10), seq_len=32, split="paragraph")
    gen = write_jsonl(
        generate(
            suite, small="opt", large="llama", mixtures=[(1, -1), (-1, 1)], prompts=2, new_tokens=8, progress=False
        ),
        root / "gen.jsonl",
    )
    pairs = _write_pairs(root / "pairs.jsonl")
    out = root / "s.zarr"
    assert (
        main(
            [
                "extract",
                str(suite),
                "--set",
                f"hallucinated={gen}",
                "--set",
                f"corrupted:0.3,1={root / 'data' / 'valid.txt'}",
                "--pairs",
                f"facts={pairs}",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    return suite, out


def _hf_nll(model, context: list[int], tokens: list[int]) -> np.ndarray:
    """NLL of `tokens` after `context`, from one transformers forward pass and torch's cross-entropy."""
    ids = torch.tensor([list(context) + list(tokens)], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(context) - 1 : -1]
    return torch.nn.functional.cross_entropy(logits, torch.tensor(tokens), reduction="none").numpy().astype(float)


def _hf_rolling(model, tokens: list[int], prefix: int, seq_len: int) -> np.ndarray:
    """NLL of every token of a document over lm-eval's rolling windows."""
    parts = []
    for inputs, predicted in lm_eval_windows(list(tokens), prefix, seq_len):
        window = inputs + [predicted[-1]]
        parts.append(_hf_nll(model, window[: len(window) - len(predicted)], predicted))
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def hf_models(built):
    """(model index, checkpoint index, transformers model) of every checkpoint of the suite."""
    suite, _ = built
    return [
        (m, c, AutoModelForCausalLM.from_pretrained(ckpt.path).eval())
        for m, spec in enumerate(load_suite(suite).models)
        for c, ckpt in enumerate(spec.checkpoints)
    ]


def test_store_has_every_set_and_the_accessor_reaches_them(built):
    _, out = built
    assert tokendyn.list_sets(out) == ["corrupted-0.3", "corrupted-1", "facts", "hallucinated"]
    ds = tokendyn.open_store(out)
    ppl = ds.tokendyn.sequence_ppl()
    assert ppl.dims == ("set", "model", "ckpt")
    assert list(ppl["set"].values) == ["main", "corrupted-0.3", "corrupted-1", "facts", "hallucinated"]
    assert list(ppl["kind"].values) == ["text", "text", "text", "pairs", "text"]
    np.testing.assert_array_equal(ppl["corrupt"].values[1:3], [0.3, 1.0])
    # the main set's perplexity is the validation perplexity
    np.testing.assert_allclose(ppl.sel(set="main").values, ds["val_ppl"].values, rtol=1e-6)
    hallucinated = tokendyn.open_store(out, set="hallucinated")
    first = np.unique(hallucinated["doc"].values, return_index=True)[1]  # every document's first token
    assert list(hallucinated["mixture"].values[first]) == ["1,-1", "1,-1", "-1,1", "-1,1"]


def test_a_selection_reads_the_other_sets_within_it(built):
    """An analysis of ds.isel(...) reads the store's other sets at the selected models and checkpoints only."""
    _, out = built
    ds = tokendyn.open_store(out)
    selected = ds.isel(model=[1], ckpt=[1]).tokendyn.sequence_ppl()
    assert dict(selected.sizes) == {"set": 5, "model": 1, "ckpt": 1}
    xr.testing.assert_equal(selected, ds.tokendyn.sequence_ppl().isel(model=[1], ckpt=[1]))
    preference = ds.isel(model=[0]).tokendyn.pair_preference()
    xr.testing.assert_equal(preference, ds.tokendyn.pair_preference().isel(model=[0]))


def test_set_perplexity_equals_transformers(built, hf_models, tokenizer):
    _, out = built
    ppl = sequences.sequence_ppl(out, sets=["hallucinated", "corrupted-0.3"], by="mixture")
    assert list(ppl["set"].values) == ["hallucinated:-1,1", "hallucinated:1,-1", "corrupted-0.3"]
    assert list(ppl["group"].values) == ["-1,1", "1,-1", ""]
    records = [json.loads(line) for line in (out.parent / "gen.jsonl").read_text().splitlines()]
    eos = tokenizer.eos_token_id  # the prefix: this tokenizer adds no special token itself
    corrupted = tokendyn.open_store(out, set="corrupted-0.3")["token_id"].values  # one document, every token
    for m, c, model in hf_models:
        for mix in ("1,-1", "-1,1"):  # generated ids scored as generated, the prompt as context only
            losses = np.concatenate(
                [_hf_nll(model, [eos, *r["context_ids"]], r["token_ids"]) for r in records if r["mixture"] == mix]
            )
            np.testing.assert_allclose(
                ppl.sel(set=f"hallucinated:{mix}").values[m, c], np.exp(losses.mean()), rtol=1e-5
            )
        losses = _hf_rolling(model, corrupted.tolist(), eos, 32)
        np.testing.assert_allclose(ppl.sel(set="corrupted-0.3").values[m, c], np.exp(losses.mean()), rtol=1e-5)


def test_corrupted_sets_replace_the_stated_share(built, tokenizer):
    suite, out = built
    plain = np.asarray(
        tokenizer(load_suite(suite).eval.files[0].read_text().strip(), add_special_tokens=False)["input_ids"]
    )  # the file as one document
    specials = set(tokenizer.all_special_ids)
    for rate in (0.3, 1.0):
        ids = tokendyn.open_store(out, set=f"corrupted-{rate:g}")["token_id"].values
        changed = ids != plain
        assert changed.sum() == round(rate * len(plain))
        assert not specials & set(ids[changed].tolist())


def test_corrupt_tokens_is_seeded_and_nested(tokenizer):
    docs = [list(range(10, 40)), list(range(50, 70))]
    low = corrupt_tokens(docs, 0.2, seed=7, tokenizer=tokenizer)
    high = corrupt_tokens(docs, 0.6, seed=7, tokenizer=tokenizer)
    again = corrupt_tokens(docs, 0.2, seed=7, tokenizer=tokenizer)
    other = corrupt_tokens(docs, 0.2, seed=8, tokenizer=tokenizer)
    flat = np.concatenate(docs)
    low, high, again, other = (np.concatenate(x) for x in (low, high, again, other))
    assert (low != flat).sum() == 10 and (high != flat).sum() == 30
    np.testing.assert_array_equal(low, again)
    assert not np.array_equal(low, other)
    changed = low != flat
    np.testing.assert_array_equal(high[changed], low[changed])  # the lower rate's replacements are kept


def _independent_pair_numbers(model, tokenizer) -> tuple[float, float]:
    """Preference (total loss) and margin on differing tokens, by plain loops over the pair texts."""
    wins, margins = [], []
    for pair in PAIRS:
        rows = [tokenizer(pair[side], add_special_tokens=False)["input_ids"] for side in ("true", "false")]
        losses = [_hf_nll(model, [tokenizer.eos_token_id], row) for row in rows]  # after the prefix token
        wins.append(float(np.nansum(losses[0]) < np.nansum(losses[1])))
        prefix = 0
        while rows[0][prefix] == rows[1][prefix]:
            prefix += 1
        suffix = 0
        while suffix < min(map(len, rows)) - prefix and rows[0][-1 - suffix] == rows[1][-1 - suffix]:
            suffix += 1
        span = [loss[prefix : len(loss) - suffix].sum() for loss in losses]
        margins.append(span[1] - span[0])
    return np.mean(wins), np.mean(margins)


def test_pair_preference_and_margin_equal_transformers(built, hf_models, tokenizer):
    _, out = built
    ds = tokendyn.open_store(out)
    preference = ds.tokendyn.pair_preference().sel(set="facts")
    margin = ds.tokendyn.pair_margin().sel(set="facts")
    assert int(ds.tokendyn.pair_preference()["n_pairs"].sel(set="facts")) == 3
    own = tokendyn.open_store(out, set="facts").tokendyn.pair_preference()
    assert list(own["set"].values) == ["facts"]
    np.testing.assert_array_equal(own.sel(set="facts").values, preference.values)
    for m, c, model in hf_models:
        want_preference, want_margin = _independent_pair_numbers(model, tokenizer)
        assert preference.values[m, c] == want_preference
        np.testing.assert_allclose(margin.values[m, c], want_margin, rtol=1e-5)


def _planted_pairs() -> xr.Dataset:
    """Two pairs with hand-set losses (one model, two checkpoints)."""
    docs = [
        [5, 6, 7, 9],  # pair 0 true:  differs at 6 7 (offsets 1, 2)
        [5, 8, 9],  # pair 0 false: differs at 8 (offset 1)
        [5, 6],  # pair 1 true: a prefix of the false text
        [5, 6, 7, 7],
    ]  # pair 1 false: differs at 7 7 (offsets 2, 3)
    loss = [[1, 2, 2, 1] + [1, 1, 3] + [1, 1] + [1, 1, 2, 2], [1, 1, 1, 1] + [2, 1, 1] + [3, 3] + [1, 1, 1, 1]]
    doc = np.concatenate([[d] * len(ids) for d, ids in enumerate(docs)])
    return xr.Dataset(
        {
            "loss": (("model", "ckpt", "token"), np.asarray(loss, float)[None]),
            "done": (("model", "ckpt"), [[True, True]]),
        },
        coords={
            "model": ["m"],
            "ckpt": [0, 1],
            "step": (("model", "ckpt"), [[1.0, 2.0]]),
            "val_ppl": (("model", "ckpt"), [[20.0, 10.0]]),
            "token_id": ("token", np.concatenate(docs)),
            "doc": ("token", doc),
            "pair": ("token", doc // 2),
            "is_true": ("token", doc % 2 == 0),
        },
        attrs={"protocol": json.dumps({"name": "facts", "kind": "pairs"})},
    )


def test_pairs_on_hand_built_losses():
    ds = _planted_pairs()
    scores = sequences.pair_scores(ds).compute()
    np.testing.assert_array_equal(scores["n_span"].values, [[2, 1], [0, 2]])
    np.testing.assert_array_equal(scores["total"].sel(ckpt=0).values[0], [[6, 5], [2, 6]])
    # ckpt 0: pair 0 loses on total loss (6 > 5) but wins per token (1.5 < 5/3); pair 1 wins both ways
    # ckpt 1: pair 0 ties on total loss (4 = 4, counts one half) and wins per token (1 < 4/3);
    # pair 1 loses both ways (6 > 4, 3 > 1)
    np.testing.assert_allclose(sequences.pair_preference(ds).values[0, 0], [0.5, 0.25])
    np.testing.assert_allclose(sequences.pair_preference(ds, reduce="mean").values[0, 0], [1.0, 0.5])
    # margin = mean over pairs of (false - true) on differing tokens: ckpt 0 (1 - 4, 4 - 0); ckpt 1 (1 - 2, 2 - 0)
    np.testing.assert_allclose(sequences.pair_margin(ds).values[0, 0], [0.5, 0.5])
    with pytest.raises(TokendynError, match="unknown reduce"):
        sequences.pair_preference(ds, reduce="max")


def _curve(values, steps, val_ppl) -> xr.DataArray:
    return xr.DataArray(
        np.asarray(values, float),
        dims=("set", "model", "ckpt"),
        coords={
            "set": ["a", "b"],
            "model": ["s", "l"],
            "step": (("model", "ckpt"), steps),
            "val_ppl": (("model", "ckpt"), val_ppl),
        },
    )


def test_turning_points():
    steps = [[0, 1, 2, 3, 4], [0, 1, 2, 3, np.nan]]
    val_ppl = [[50, 40, 30, 25, 20], [50, 30, 20, 15, np.nan]]
    curve = _curve(
        [[[10, 8, 7, 7.5, 9], [10, 10.2, 11, 12, np.nan]], [[10, 9, 8, 7, 6], [10, 9, 9.2, 8, np.nan]]], steps, val_ppl
    )
    turns = curve.tokendyn.turning_points(tol=0.05)
    np.testing.assert_array_equal(turns["turns"].values, [[True, True], [False, False]])
    np.testing.assert_array_equal(turns["turn_ckpt"].values, [[2, 0], [-1, -1]])
    np.testing.assert_allclose(turns["turn_step"].values[0], [2, 0])
    np.testing.assert_allclose(turns["turn_val_ppl"].values[0], [30, 50])
    np.testing.assert_allclose(turns["fall"].values[0], [np.log(10 / 7), 0])
    np.testing.assert_allclose(turns["rise"].values[0], [np.log(9 / 7), np.log(12 / 10)])
    # a rise below the tolerance is no turn (model l of set b rises 2.2%)
    assert not turns["turns"].values[1, 1]
    assert curve.tokendyn.turning_points(tol=0.02)["turns"].values[1, 1]


def test_curve_at_matched_perplexity_interpolates_in_log():
    steps = [[0, 1, 2, 3], [0, 1, 2, 3]]
    val_ppl = [[40, 30, 20, 10], [50, 25, 12, 8]]
    values = np.exp(np.random.default_rng(0).normal(3, 0.3, (2, 2, 4)))
    curve = _curve(values, steps, val_ppl)
    levels = [35, 22, 9]
    got = sequences.curve_at_perplexity(curve, levels)
    assert got.dims == ("set", "model", "val_ppl")
    for s in range(2):
        for m in range(2):
            x = -np.log(np.asarray(val_ppl[m], float))
            want = np.exp(np.interp(-np.log(levels), x, np.log(values[s, m])))
            want[(np.asarray(levels) < min(val_ppl[m]))] = np.nan  # model s never reaches 9
            np.testing.assert_allclose(got.values[s, m], want, rtol=1e-10)
    assert got.sel(model="l", val_ppl=22)["step"] == pytest.approx(1 + np.log(25 / 22) / np.log(25 / 12))


def test_adding_a_set_later_scores_only_that_set(built, tmp_path, monkeypatch):
    suite, out = built
    copy = tmp_path / "s.zarr"
    shutil.copytree(out, copy)
    scored = []
    original = tokendyn.models.extract._score_set

    def recording(model, packed, root, name, *args):
        scored.append(name)
        return original(model, packed, root, name, *args)

    monkeypatch.setattr(tokendyn.models.extract, "_score_set", recording)
    more = _write_pairs(tmp_path / "more.jsonl", PAIRS[:2])
    assert main(["extract", str(suite), "--pairs", str(more), "--out", str(copy), "--no-progress"]) == 0
    assert scored == ["more"] * 4  # 2 models x 2 checkpoints, nothing else
    assert tokendyn.list_sets(copy) == ["corrupted-0.3", "corrupted-1", "facts", "hallucinated", "more"]
    assert bool(tokendyn.open_store(copy, set="more")["done"].all())
    np.testing.assert_array_equal(xr.open_zarr(copy)["loss"].values, xr.open_zarr(out)["loss"].values)


# Small chunks (256 tokens) so that every set writes several blocks per checkpoint
# and the kill lands inside a checkpoint; the reference run uses the same blocks and batches.
CHUNK_VALUES = 256
RUNNER = f"""
import sys
import tokendyn.store
tokendyn.store.CHUNK_VALUES = {CHUNK_VALUES}
from tokendyn.cli import main
sys.exit(main(["extract", *sys.argv[1:], "--no-progress", "--batch-tokens", "{CHUNK_VALUES}"]))
"""


def test_sigkill_during_multiset_extraction_then_rerun(tmp_path, monkeypatch):
    suite = write_suite(tmp_path, families=("opt",), steps=(0, 1, 2), seq_len=24)  # every pair text fits a window
    other = tmp_path / "other.txt"
    other.write_text(SAMPLE_TEXT.upper().replace("\n", "\n\n"))
    pairs = _write_pairs(tmp_path / "facts.jsonl", PAIRS * 30)
    args = [str(suite), "--set", f"other={other}", "--pairs", str(pairs)]
    batch = ["--batch-tokens", str(CHUNK_VALUES)]
    monkeypatch.setattr(tokendyn.store, "CHUNK_VALUES", CHUNK_VALUES)  # as in RUNNER
    reference = tmp_path / "reference.zarr"
    assert main(["extract", *args, "--out", str(reference), "--no-progress", *batch]) == 0

    store = tmp_path / "killed.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, *args, "--out", str(store)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # within a checkpoint the named sets come first (in order), the main set last
    inside = store / "sets" / "facts" / "loss" / "c" / "0" / "1" / "0"
    deadline = time.time() + 300
    while not inside.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {
        name: tokendyn.open_store(store, set=name)["done"].values[0].tolist() for name in ("main", "other", "facts")
    }
    assert done["main"][0] is True and done["main"][2] is False
    assert done["facts"][1] is False

    assert main(["extract", *args, "--out", str(store), "--no-progress", *batch]) == 0
    for name in ("main", "other", "facts"):
        got, want = tokendyn.open_store(store, set=name), tokendyn.open_store(reference, set=name)
        for var in ("loss", "done", "val_ppl", "token_id"):
            np.testing.assert_array_equal(got[var].values, want[var].values, err_msg=f"{name} {var}")
        assert got.attrs["complete"] == {"opt": [0, 1, 2]}


def test_analyze_writes_the_sequence_tables(built, tmp_path):
    _, out = built
    lines = analyze(tokendyn.open_store(out), tmp_path / "a", only=["sequence_ppl", "pairs"], progress=False)
    assert not any("skipped" in line for line in lines), lines
    table = pd.read_csv(tmp_path / "a" / "sequence_ppl.csv")
    # the main set is left out: its perplexity is the val_ppl column
    assert set(table["set"]) == {"corrupted-0.3", "corrupted-1", "facts", "hallucinated:1,-1", "hallucinated:-1,1"}
    assert len(table) == 5 * 2 * 2  # sets x models x checkpoints
    pairs = pd.read_csv(tmp_path / "a" / "pair_preference.csv")
    assert list(pairs.columns) == [
        "set",
        "n_pairs",
        "model",
        "ckpt",
        "step",
        "val_ppl",
        "pair_preference",
        "pair_margin",
    ]
    with pytest.raises(tokendyn.TokendynError, match="no result to write, pair_preference: skipped"):
        analyze(tokendyn.open_store(out, set="facts"), tmp_path / "b", only=["pairs"], progress=False)
    assert not (tmp_path / "b").exists()


def test_set_options(tmp_path, monkeypatch):
    from tokendyn.cli.extract import parse_pairs_option, parse_set_option

    monkeypatch.chdir(tmp_path)
    (tmp_path / "valid.txt").write_text("some text")
    _write_pairs(tmp_path / "facts.jsonl")
    (plain,) = parse_set_option("gen=valid.txt", seq_len=16)
    assert (plain.name, plain.corrupt, plain.seq_len, plain.files) == ("gen", None, 16, (tmp_path / "valid.txt",))
    low, high = parse_set_option("noisy:0.2,1=valid.txt", seq_len=16, seed=5)
    assert (low.name, low.corrupt, low.seed, high.name, high.corrupt) == ("noisy-0.2", 0.2, 5, "noisy-1", 1.0)
    assert parse_pairs_option("facts.jsonl", 16).name == "facts"
    assert parse_pairs_option("tf=facts.jsonl", 16).kind == "pairs"
    for bad, match in (
        ("valid.txt", "NAME=FILE"),
        ("n:x=valid.txt", "rates must be numbers"),
        ("n:1.5=valid.txt", "fraction"),
        ("n=missing.txt", "does not exist"),
    ):
        with pytest.raises(TokendynError, match=match):
            parse_set_option(bad, 16)
    with pytest.raises(TokendynError, match="give .jsonl"):
        parse_pairs_option("valid.txt", 16)
