"""Bad input: a one-line error naming the problem and the fix, and an existing store left untouched."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hub_constants
from transformers import AutoModelForCausalLM

import tokendyn
from conftest import build_tokenizer, save_checkpoint, write_suite
from tokendyn.cli import main
from tokendyn.models import hardware


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A small suite and a complete store made from it."""
    root = tmp_path_factory.mktemp("made")
    suite = write_suite(root, families=("opt",), steps=(0, 10))
    assert main(["extract", str(suite), "--out", str(root / "s.zarr"), "--no-progress"]) == 0
    return root, suite


@pytest.fixture
def workspace(made, tmp_path):
    """A private copy of the suite folder and its store."""
    root, suite = made
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    return tmp_path, tmp_path / suite.name, tmp_path / "s.zarr"


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode())
        h.update(file.read_bytes())
    return h.hexdigest()


def run_error(capsys, *args) -> str:
    assert main(["extract", *map(str, args), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokendyn: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def edit(suite: Path, old: str, new: str) -> None:
    text = suite.read_text()
    assert old in text
    suite.write_text(text.replace(old, new))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_dir", "does not exist"),
        ("seq_len", "exceeds the context of model 'opt' (64 tokens); lower seq_len to at most 64 (the suite's"),
        ("empty", "has no documents"),
        ("not_utf8", "is not UTF-8"),
        ("other_corpus", "different evaluation corpus"),
        ("other_tokenizer", "different tokenizer"),
        ("metric", "unknown metric 'perplexity'"),
        ("dtype", "float8"),
        ("store_metrics", "holds metrics loss"),
        ("missing_set_file", "nowhere.txt does not exist; fix the path (relative paths start at "),
        ("tokenizer", "cannot load the tokenizer of [eval] tokenizer = org/nowhere: "),
    ],
)
def test_refused_and_store_untouched(capsys, workspace, case, message):
    folder, suite, store = workspace
    before = digest(store)
    extra = []
    if case == "missing_dir":
        edit(suite, "ckpts/opt/step10", "ckpts/opt/step99")
    elif case == "seq_len":
        edit(suite, "seq_len = 16", "seq_len = 100")  # the tiny models have 64 positions
    elif case == "empty":
        (folder / "data" / "valid.txt").write_text("\n\n")
    elif case == "not_utf8":
        (folder / "data" / "valid.txt").write_bytes(b"caf\xe9 au lait\n")
    elif case == "other_corpus":
        (folder / "data" / "valid.txt").write_text("A different text.\n\nAnother document.\n")
    elif case == "other_tokenizer":
        other = build_tokenizer(vocab_size=280)
        for step in (0, 10):
            save_checkpoint(folder / f"ckpts/opt/step{step}", "opt", other, seed=step)
    elif case == "metric":
        extra = ["--metrics", "loss,perplexity"]
    elif case == "dtype":
        extra = ["--dtype", "float8"]
    elif case == "store_metrics":
        extra = ["--metrics", "loss,entropy"]
    elif case == "missing_set_file":
        extra = ["--set", "extra=nowhere.txt"]
    elif case == "tokenizer":
        edit(suite, "[eval]\n", '[eval]\ntokenizer = "org/nowhere"\n')
    err = run_error(capsys, suite, "--out", store, *extra)
    assert message in err
    if case == "missing_set_file":
        assert f"relative paths start at {Path.cwd()})" in err
    if case == "tokenizer":
        assert "check that path or hub id" in err
    assert digest(store) == before


def test_missing_hub_revision(capsys, tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "valid.txt").write_text("some text\n")
    suite = tmp_path / "suite.toml"
    suite.write_text(
        '[eval]\nfiles = ["valid.txt"]\nseq_len = 16\n\n'
        '[[models]]\nname = "p"\nhub_id = "org/absent"\nrevisions = ["step1000"]\n'
    )
    err = run_error(capsys, suite, "--out", tmp_path / "s.zarr")
    assert "org/absent" in err and "step1000" in err
    assert not (tmp_path / "s.zarr").exists()


def test_unwritable_output(capsys, workspace):
    folder, suite, _ = workspace
    (folder / "a_file").write_text("")
    err = run_error(capsys, suite, "--out", folder / "a_file" / "s.zarr")
    assert "cannot write the store" in err


def test_corrupted_weights_are_refused_before_the_store_grows(capsys, tmp_path):
    """A truncated checkpoint (a Trainer still writing it) stops the run before the store grows to hold
    it (was: grown, then refused, and stuck once the folder was gone); the store stays as it was."""
    suite = write_suite(tmp_path, families=("opt",), steps=(0, 10, 20))
    first = tmp_path / "first.toml"
    first.write_text(
        suite.read_text().replace(
            ', { step = 10, path = "ckpts/opt/step10" }, { step = 20, path = "ckpts/opt/step20" }', ""
        )
    )
    store = tmp_path / "s.zarr"
    assert main(["extract", str(first), "--out", str(store), "--no-progress"]) == 0
    before = tokendyn.open_store(store).loss.values
    weights = tmp_path / "ckpts/opt/step10/model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 3])
    err = run_error(capsys, suite, "--out", store)
    assert "corrupted weights file" in err and "step10" in err
    ds = tokendyn.open_store(store)
    assert ds.sizes["ckpt"] == 1 and ds.done.values.tolist() == [[True]]
    np.testing.assert_array_equal(ds.loss.values, before)
    weights.write_bytes(good)
    assert main(["extract", str(suite), "--out", str(store), "--no-progress"]) == 0
    ds = tokendyn.open_store(store)
    assert bool(ds.done.all()) and ds.sizes["ckpt"] == 3
    np.testing.assert_array_equal(ds.loss.isel(ckpt=[0]).values, before)


def test_a_missing_weight_shard_is_refused_before_the_store_grows(capsys, tmp_path):
    """A sharded checkpoint whose index lists a shard not on disk (was: the store grew, then the load failed)."""
    suite = write_suite(tmp_path, families=("opt",), steps=(0, 10))
    folder = tmp_path / "ckpts/opt/step10"
    model = AutoModelForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    capsys.readouterr()  # transformers' progress bars of the re-save
    err = run_error(capsys, suite, "--out", tmp_path / "s.zarr")
    assert f"weight shard {shards[-1].name} of" in err and "is missing" in err
    assert not (tmp_path / "s.zarr" / "zarr.json").exists()


def test_scored_checkpoints_need_no_weights_when_the_store_grows(tmp_path):
    """Only checkpoints the store has not scored are checked: a done one's weights may be gone."""
    suite = write_suite(tmp_path, families=("opt",), steps=(0, 10, 20))
    first = tmp_path / "first.toml"
    first.write_text(suite.read_text().replace(', { step = 20, path = "ckpts/opt/step20" }', ""))
    store = tmp_path / "s.zarr"
    assert main(["extract", str(first), "--out", str(store), "--no-progress"]) == 0
    (tmp_path / "ckpts/opt/step0/model.safetensors").unlink()
    assert main(["extract", str(suite), "--out", str(store), "--no-progress"]) == 0
    assert tokendyn.open_store(store).done.values.tolist() == [[True, True, True]]


def test_pickle_checkpoint_needs_opt_in(capsys, tmp_path):
    suite = write_suite(tmp_path, families=("opt",), steps=(0,))
    folder = tmp_path / "ckpts/opt/step0"
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    err = run_error(capsys, suite, "--out", tmp_path / "s.zarr")
    assert "pickle" in err and "--allow-pickle" in err
    assert main(["extract", str(suite), "--out", str(tmp_path / "s.zarr"), "--allow-pickle", "--no-progress"]) == 0


@pytest.mark.parametrize("allow_pickle", [[], ["--allow-pickle"]])
def test_a_trainer_checkpoint_without_its_weights_is_refused_before_scoring(capsys, tmp_path, allow_pickle):
    """Trainer's optimizer.pt, scheduler.pt and rng_state.pth are not weights (was: "refusing pickle checkpoint
    .../optimizer.pt, pass --allow-pickle"; with it, the first checkpoint was scored, then the load failed)."""
    suite = write_suite(tmp_path, families=("opt",), steps=(0, 10))
    for step in (0, 10):
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
            torch.save({"state": torch.zeros(3)}, tmp_path / f"ckpts/opt/step{step}" / name)
    (tmp_path / "ckpts/opt/step10/model.safetensors").unlink()
    hardware.choose("auto", "auto")  # its "running on" line comes once per process: here, not in the error
    capsys.readouterr()  # that line, and transformers' progress bars of the saves
    err = run_error(capsys, suite, "--out", tmp_path / "s.zarr", *allow_pickle)
    assert "no weights in" in err and "step10" in err and "optimizer.pt" not in err
    assert not (tmp_path / "s.zarr" / "zarr.json").exists()


def test_debug_shows_traceback(capsys, workspace):
    _, suite, store = workspace
    assert main(["--debug", "extract", str(suite), "--out", str(store), "--metrics", "bogus"]) == 2
    assert "Traceback" in capsys.readouterr().err
