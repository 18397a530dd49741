"""Stores that grow: new checkpoints and new models are added without rescoring; the result equals a fresh run."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import tokendyn.models.extract as extract_module
from conftest import SAMPLE_TEXT, build_tokenizer, save_checkpoint, write_suite
from tokendyn.errors import TokendynError
from tokendyn.models import fingerprint
from tokendyn.models.extract import extract

COMPARED = (
    "loss",
    "entropy",
    "done",
    "val_ppl",
    "weights_hash",
    "step",
    "tokens_seen",
    "source",
    "n_params",
    "n_params_nonembed",
    "model",
    "ckpt",
    "token_id",
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Checkpoints of two models (opt: 4 steps, llama: 2) and an evaluation text; suites are written per test."""
    root = tmp_path_factory.mktemp("grow")
    write_suite(root, families=("opt",), steps=(0, 10, 20, 30))
    tokenizer = build_tokenizer()
    for index, step in enumerate((5, 15)):
        save_checkpoint(root / "ckpts" / "llama" / f"step{step}", "llama", tokenizer, seed=50 + index)
    (root / "other.txt").write_text("Completely different words here.\n" * 8)
    return root


def suite_toml(
    root: Path,
    name: str,
    opt_steps=(0, 10, 20, 30),
    llama_steps=(),
    seq_len=16,
    text="data/valid.txt",
    order=("opt", "llama"),
) -> Path:
    tables = {"opt": opt_steps, "llama": llama_steps}
    lines = ["[eval]", f'files = ["{text}"]', f"seq_len = {seq_len}", "max_sequences = 6"]
    for model in order:
        if tables[model]:
            ckpts = ", ".join(f'{{ step = {s}, path = "ckpts/{model}/step{s}" }}' for s in tables[model])
            lines += ["", "[[models]]", f'name = "{model}"', "tokens_per_step = 100", f"checkpoints = [{ckpts}]"]
    path = root / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def scored(monkeypatch) -> list:
    """Record every (model, checkpoint) that is scored, while still scoring it."""
    calls = []
    real = extract_module.score_checkpoint

    def spy(suite, root, sets, m, c, **kwargs):
        calls.append((suite.models[m].name, suite.models[m].checkpoints[c].step))
        return real(suite, root, sets, m, c, **kwargs)

    monkeypatch.setattr(extract_module, "score_checkpoint", spy)
    return calls


def assert_same_store(got_path: Path, want_path: Path) -> None:
    got, want = xr.open_zarr(got_path), xr.open_zarr(want_path)
    for name in COMPARED:
        np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)
    assert got.attrs["complete"] == want.attrs["complete"]
    assert got.attrs["suite"] == want.attrs["suite"]


def test_grow_by_checkpoints_then_by_a_model(folder, tmp_path, monkeypatch):
    full = suite_toml(folder, "full", llama_steps=(5, 15))
    fresh = extract(full, tmp_path / "fresh.zarr", metrics=["entropy"], progress=False)

    calls = scored(monkeypatch)
    store = tmp_path / "grown.zarr"
    extract(suite_toml(folder, "first", opt_steps=(0, 10)), store, metrics=["entropy"], progress=False)
    extract(suite_toml(folder, "more", opt_steps=(0, 10, 20, 30)), store, progress=False)
    assert xr.open_zarr(store).sizes["ckpt"] == 4
    extract(full, store, progress=False)
    assert calls == [("opt", 0), ("opt", 10), ("opt", 20), ("opt", 30), ("llama", 5), ("llama", 15)]
    assert_same_store(store, fresh)


def test_grown_named_sets_equal_a_fresh_run(folder, tmp_path):
    from tokendyn.config.suite import parse_set_table

    extra = [parse_set_table({"name": "other", "files": "other.txt"}, "test", folder, 16)]
    fresh = extract(
        suite_toml(folder, "full2", llama_steps=(5,)), tmp_path / "fresh.zarr", extra_sets=extra, progress=False
    )
    store = tmp_path / "grown.zarr"
    extract(suite_toml(folder, "small2", opt_steps=(0,)), store, extra_sets=extra, progress=False)
    extract(suite_toml(folder, "full2", llama_steps=(5,)), store, extra_sets=extra, progress=False)
    got, want = xr.open_zarr(store, group="sets/other"), xr.open_zarr(fresh, group="sets/other")
    for name in ("loss", "done", "step", "source", "model"):
        np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(text="other.txt", opt_steps=(0, 20)), "was made from a different evaluation corpus"),
        (dict(seq_len=8, opt_steps=(0, 20)), r"different evaluation corpus: seq_len 16 \(store\) vs 8 \(now\)"),
        (dict(opt_steps=(0, 10, 20)), "model 'opt' has step 10 before the last stored step 20"),
        (dict(opt_steps=(20,)), "model 'opt' lacks stored step 0"),
        (
            dict(opt_steps=(0, 20), llama_steps=(5,), order=("llama", "opt")),
            "holds model 'opt', which is model #2 in the suite, #1 in the store",
        ),
    ],
)
def test_what_cannot_be_merged_is_refused(folder, tmp_path, kwargs, message):
    store = tmp_path / "s.zarr"
    extract(suite_toml(folder, "base", opt_steps=(0, 20)), store, progress=False)
    before = sorted((p.relative_to(store), p.stat().st_mtime_ns) for p in store.rglob("*"))
    with pytest.raises(TokendynError, match=message):
        extract(suite_toml(folder, "changed", **kwargs), store, progress=False)
    assert sorted((p.relative_to(store), p.stat().st_mtime_ns) for p in store.rglob("*")) == before


def test_other_metrics_and_tokenizer_refused(folder, tmp_path):
    store = tmp_path / "s.zarr"
    extract(suite_toml(folder, "base", opt_steps=(0,)), store, progress=False)
    with pytest.raises(TokendynError, match="holds metrics loss, not loss,rank"):
        extract(suite_toml(folder, "more", opt_steps=(0, 10)), store, metrics=["rank"], progress=False)
    save_checkpoint(
        folder / "ckpts" / "opt" / "step99", "opt", build_tokenizer(vocab_size=280, text=SAMPLE_TEXT * 2), seed=9
    )
    other = folder / "othertok.toml"
    other.write_text(suite_toml(folder, "x", opt_steps=(0,)).read_text().replace("step0", "step99"))
    with pytest.raises(TokendynError, match="different tokenizer"):
        extract(other, store, progress=False)


def test_a_scored_checkpoint_with_other_weights_is_refused(tmp_path, monkeypatch):
    """A run retrained into the same folders, or a stored step pointed at another run's checkpoint, would keep
    the old values under that step (was: silently, also when growing). A folder moved or copied with its
    weights is accepted. File times cannot tell (`mv` and `cp -p` keep them): a scored checkpoint's files
    are read again unless these very files (path, inode, times) were verified before."""
    write_suite(tmp_path, families=("opt",), steps=(0, 10, 20, 30))
    store = tmp_path / "s.zarr"
    extract(suite_toml(tmp_path, "first", opt_steps=(0, 10)), store, progress=False)
    before = xr.open_zarr(store)["loss"].values

    shutil.copytree(tmp_path / "ckpts" / "opt" / "step10", tmp_path / "moved" / "step10")  # new mtimes, same bytes

    def moved(steps: tuple[int, ...]) -> Path:
        text = suite_toml(tmp_path, "x", opt_steps=steps).read_text()
        (tmp_path / "moved.toml").write_text(text.replace("ckpts/opt/step10", "moved/step10"))
        return tmp_path / "moved.toml"

    read = []
    real = fingerprint._sha256
    monkeypatch.setattr(
        fingerprint,
        "_sha256",
        lambda file: (file.suffix == ".safetensors" and read.append(file.parent.name)) or real(file),
    )
    extract(moved((0, 10, 20)), store, progress=False)
    assert read == ["step10", "step20"]  # step 0's files were verified when scored; step 10 moved; 20 is new
    read.clear()
    extract(moved((0, 10, 20)), store, progress=False)
    assert read == []  # verified already: nothing read again
    grown = xr.open_zarr(store)
    np.testing.assert_array_equal(grown["loss"].values[:, :2], before)
    assert str(grown["source"].values[0, 1]).endswith("moved/step10")

    save_checkpoint(tmp_path / "elsewhere" / "step10", "opt", build_tokenizer(), seed=99)  # another run's step 10,
    os.utime(tmp_path / "elsewhere" / "step10" / "model.safetensors", (0, 0))  # its file times kept (cp -p)
    shutil.rmtree(tmp_path / "moved" / "step10")
    (tmp_path / "elsewhere" / "step10").rename(tmp_path / "moved" / "step10")  # swapped in by mv
    for steps in ((0, 10, 20), (0, 10, 20, 30)):  # up to date, and growing
        with pytest.raises(
            TokendynError, match=r"scored step 10 of model 'opt' from other weights than .*moved/step10"
        ):
            extract(moved(steps), store, progress=False)
    np.testing.assert_array_equal(xr.open_zarr(store)["loss"].values[:, :2], before)


def test_hashes_of_earlier_versions_still_match(tmp_path):
    """tokendyn before 2026-12-02 hashed every *.safetensors of a folder (also ones from_pretrained does not read):
    such a store's checkpoints are still its own, not 'other weights'."""
    write_suite(tmp_path, families=("opt",), steps=(0, 10))
    store = tmp_path / "s.zarr"
    extract(suite_toml(tmp_path, "first", opt_steps=(0, 10)), store, progress=False)
    folder = tmp_path / "ckpts" / "opt" / "step10"
    (folder / "consolidated.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    earlier = hashlib.sha256()
    for name in ("consolidated.safetensors", "model.safetensors"):
        earlier.update(f"{name}:{hashlib.sha256((folder / name).read_bytes()).hexdigest()}\n".encode())
    zarr.open_group(store, mode="r+")["weights_hash"][0, 1] = earlier.hexdigest()
    extract(suite_toml(tmp_path, "more", opt_steps=(0, 10)), store, progress=False)
    zarr.open_group(store, mode="r+")["weights_hash"][0, 1] = "0" * 64
    with pytest.raises(TokendynError, match="scored step 10 of model 'opt' from other weights"):
        extract(suite_toml(tmp_path, "more", opt_steps=(0, 10)), store, progress=False)


def test_a_scored_checkpoint_missing_a_shard_is_named_as_such(tmp_path):
    """(was: 'scored from other weights; rescore with --force', which then failed on the missing file)"""
    from transformers import AutoModelForCausalLM

    write_suite(tmp_path, families=("opt",), steps=(0, 10))
    folder = tmp_path / "ckpts" / "opt" / "step10"
    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, max_shard_size="20KB")
    (folder / "model.safetensors").unlink(missing_ok=True)
    store = tmp_path / "s.zarr"
    extract(suite_toml(tmp_path, "first", opt_steps=(0, 10)), store, progress=False)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(TokendynError, match=f"^weight shard {shard.name} of .* is missing"):
        extract(suite_toml(tmp_path, "first", opt_steps=(0, 10)), store, progress=False)
