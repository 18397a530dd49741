"""Checkpoint resolution, safe loading, tokenizer checks and fingerprints, incl. an offline hub cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hub_constants
from transformers import AutoModelForCausalLM, GPT2Config

from conftest import build_tokenizer, save_checkpoint
from tokendyn.config.suite import Checkpoint, load_suite
from tokendyn.errors import TokendynError
from tokendyn.models import extract, generate, hardware
from tokendyn.models.checkpoints import (
    check_local_weights,
    check_tokenizers,
    count_params,
    load_config,
    load_model,
    load_tokenizer,
    max_context,
    resolve,
    tokenizer_fingerprint,
    weights_fingerprint,
    weights_fingerprint_async,
)
from tokendyn.models.tasks import suite_context

EVAL = '[eval]\nfiles = ["valid.txt"]\nseq_len = 16\n'


def local(path: Path, step: int = 0) -> Checkpoint:
    return Checkpoint(model="m", step=step, path=path, hub_id=None, revision=None, tokens_seen=None)


def hub(hub_id: str, revision: str, step: int = 1000) -> Checkpoint:
    return Checkpoint(model="h", step=step, path=None, hub_id=hub_id, revision=revision, tokens_seen=None)


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.inference_mode():
        return model(ids).logits


def write_suite_toml(root: Path, models: str) -> Path:
    (root / "valid.txt").write_text("The quick brown fox.\n")
    path = root / "suite.toml"
    path.write_text(EVAL + models)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tokenizer):
    """Source models and their directories: GPT-NeoX seeds 0 and 1, seed 0 saved twice, and an OPT one."""
    root = tmp_path_factory.mktemp("ckpts")
    models = {
        name: save_checkpoint(root / name, family, tokenizer, seed=seed)
        for name, family, seed in [
            ("neox0", "gpt_neox", 0),
            ("neox0_again", "gpt_neox", 0),
            ("neox1", "gpt_neox", 1),
            ("opt", "opt", 2),
        ]
    }
    return root, models


def copy_of(ckpts, name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(ckpts[0] / name, target)
    return target


def test_load_model_matches_saved_weights(ckpts, tokenizer):
    root, models = ckpts
    model = load_model(local(root / "neox0"))
    assert not model.training and model.dtype == torch.float32
    torch.testing.assert_close(logits(model, tokenizer), logits(models["neox0"], tokenizer), rtol=0, atol=1e-6)
    half = load_model(local(root / "neox0"), dtype=hardware.choose("cpu", "bfloat16")[1])
    assert half.dtype == torch.bfloat16 and not half.training


def test_missing_directory(tmp_path):
    with pytest.raises(TokendynError, match=r"checkpoint directory .*gone \(model 'm', step 0\) does not exist"):
        load_model(local(tmp_path / "gone"))


def test_no_config(ckpts, tmp_path):
    folder = copy_of(ckpts, "neox0", tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(TokendynError, match="no config.json in .*save_pretrained"):
        load_model(local(folder))


@pytest.mark.parametrize("keep", [0, 5, 0.5])
def test_corrupted_weights(ckpts, tmp_path, keep):
    folder = copy_of(ckpts, "neox0", tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(TokendynError, match=f"corrupted weights file {weights} .*re-download or re-save") as info:
        load_model(local(folder))
    assert "\n" not in str(info.value)


def test_no_weights(ckpts, tmp_path):
    folder = copy_of(ckpts, "neox0", tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(TokendynError, match="no weights in"):
        load_model(local(folder))


def test_pickle_refused_unless_allowed(ckpts, tmp_path, tokenizer):
    root, models = ckpts
    folder = copy_of(ckpts, "neox1", tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save(models["neox1"].state_dict(), folder / "pytorch_model.bin")
    expected = (
        f"refusing pickle checkpoint {folder / 'pytorch_model.bin'} (arbitrary code on load); "
        "convert to safetensors or pass --allow-pickle if you trust it"
    )
    with pytest.raises(TokendynError) as info:
        load_model(local(folder))
    assert str(info.value) == expected
    model = load_model(local(folder), allow_pickle=True)
    torch.testing.assert_close(logits(model, tokenizer), logits(models["neox1"], tokenizer), rtol=0, atol=1e-6)


def trainer_files(folder: Path) -> None:
    """What a Hugging Face Trainer saves beside the model in every checkpoint-N folder (all pickles)."""
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        torch.save({"state": torch.zeros(3)}, folder / name)


def test_trainer_files_are_not_weights(ckpts, tmp_path):
    """optimizer.pt, scheduler.pt, rng_state.pth are no model weights (was: a checkpoint without
    model.safetensors was refused as "pickle checkpoint .../optimizer.pt", and with allow_pickle
    they were loaded, then failed late)."""
    folder = copy_of(ckpts, "neox0", tmp_path)
    trainer_files(folder)
    (folder / "model.safetensors").unlink()
    for allow_pickle in (False, True):
        with pytest.raises(TokendynError, match=r"^no weights in .*neox0 \(model 'm', step 0\): no model\.safetensors"):
            check_local_weights(local(folder), allow_pickle)
        with pytest.raises(TokendynError, match="^no weights in"):
            load_model(local(folder), allow_pickle=allow_pickle)


def test_pickle_weights_are_what_from_pretrained_reads(ckpts, tmp_path, tokenizer):
    """A pickle Trainer checkpoint: the refusal names pytorch_model.bin, and with allow_pickle the
    fingerprint and the modification time are those of pytorch_model.bin alone (was: optimizer.pt,
    rng_state.pth and scheduler.pt hashed too)."""
    root, models = ckpts
    folder = copy_of(ckpts, "neox1", tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save(models["neox1"].state_dict(), folder / "pytorch_model.bin")
    trainer_files(folder)
    with pytest.raises(TokendynError, match=f"^refusing pickle checkpoint {folder / 'pytorch_model.bin'} "):
        check_local_weights(local(folder), allow_pickle=False)
    file_hash = hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()
    fingerprint = hashlib.sha256(f"pytorch_model.bin:{file_hash}\n".encode()).hexdigest()
    assert weights_fingerprint(local(folder), allow_pickle=True) == fingerprint
    model = load_model(local(folder), allow_pickle=True)
    torch.testing.assert_close(logits(model, tokenizer), logits(models["neox1"], tokenizer), rtol=0, atol=1e-6)


def test_sharded_pickle_weights(ckpts, tmp_path, tokenizer):
    """pytorch_model.bin.index.json and its shards: loaded and hashed with allow_pickle; a missing shard
    is refused before loading."""
    root, models = ckpts
    folder = copy_of(ckpts, "neox1", tmp_path)
    (folder / "model.safetensors").unlink()
    state = models["neox1"].state_dict()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in shards.items():
        torch.save({key: state[key] for key in keys}, folder / shard)
    weight_map = {key: shard for shard, keys in shards.items() for key in keys}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    trainer_files(folder)
    digest = hashlib.sha256()
    for shard in sorted(shards):
        digest.update(f"{shard}:{hashlib.sha256((folder / shard).read_bytes()).hexdigest()}\n".encode())
    assert weights_fingerprint(local(folder), allow_pickle=True) == digest.hexdigest()
    model = load_model(local(folder), allow_pickle=True)
    torch.testing.assert_close(logits(model, tokenizer), logits(models["neox1"], tokenizer), rtol=0, atol=1e-6)
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(TokendynError, match="^weight shard pytorch_model-00002-of-00002.bin of .* is missing"):
        check_local_weights(local(folder), allow_pickle=True)


def test_only_the_safetensors_from_pretrained_reads_are_hashed(ckpts, tmp_path):
    """Another .safetensors file beside model.safetensors (an adapter, a copy) is not part of the weights."""
    root, _ = ckpts
    folder = copy_of(ckpts, "neox0", tmp_path)
    shutil.copy(folder / "model.safetensors", folder / "adapter_model.safetensors")
    assert weights_fingerprint(local(folder)) == weights_fingerprint(local(root / "neox0"))


def test_weights_missing_from_file(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_of(ckpts, "neox0", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["gpt_neox.final_layer_norm.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TokendynError, match="lacks weights for 1 parameters .*final_layer_norm.weight.*left random"):
        load_model(local(folder))


def test_weights_fingerprint(ckpts, tmp_path):
    root, _ = ckpts
    first, again, other = (weights_fingerprint(local(root / n)) for n in ("neox0", "neox0_again", "neox1"))
    assert first == again  # same weights saved twice: the defect the fingerprint must reveal
    assert first != other
    file_hash = hashlib.sha256((root / "neox0" / "model.safetensors").read_bytes()).hexdigest()
    assert first == hashlib.sha256(f"model.safetensors:{file_hash}\n".encode()).hexdigest()


def test_weights_fingerprint_in_background(ckpts, monkeypatch):
    """The background hash equals the foreground one, runs off the calling thread, and still tells copies apart."""
    import threading

    from tokendyn.models import fingerprint

    root, _ = ckpts
    threads = []
    real = fingerprint._sha256
    monkeypatch.setattr(fingerprint, "_sha256", lambda f: threads.append(threading.get_ident()) or real(f))
    futures = {n: weights_fingerprint_async(local(root / n)) for n in ("neox0", "neox0_again", "neox1")}
    digests = {n: f.result(timeout=60) for n, f in futures.items()}
    assert digests["neox0"] == digests["neox0_again"] == weights_fingerprint(local(root / "neox0"))
    assert digests["neox0"] != digests["neox1"]
    assert threads[0] != threading.get_ident()  # the first three hashes ran in background threads


def test_count_params_by_hand(ckpts):
    root, models = ckpts
    c = models["neox0"].config
    v, h, i, n = c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers
    per_layer = (
        2 * 2 * h  # two layer norms (weight, bias)
        + 3 * h * h
        + 3 * h  # query/key/value projection
        + h * h
        + h  # attention output
        + h * i
        + i
        + i * h
        + h
    )  # MLP
    nonembed = n * per_layer + 2 * h  # + final layer norm
    assert count_params(models["neox0"]) == (nonembed + 2 * v * h, nonembed)  # untied input and output
    opt = models["opt"]  # tied input and output embeddings: the shared matrix counts once
    c = opt.config
    v, h, f, n, p = c.vocab_size, c.hidden_size, c.ffn_dim, c.num_hidden_layers, c.max_position_embeddings
    assert opt.get_output_embeddings().weight is opt.get_input_embeddings().weight
    per_layer = (
        4 * (h * h + h)  # q, k, v, out projections
        + 2 * 2 * h  # two layer norms
        + h * f
        + f
        + f * h
        + h
    )  # MLP
    nonembed = n * per_layer + 2 * h  # + final norm; learned positions are embeddings too (Kaplan et al.'s N)
    positions = (p + 2) * h  # OPT offsets them by 2
    assert count_params(opt) == (nonembed + positions + v * h, nonembed)


def test_max_context_and_dtypes(ckpts):
    _, models = ckpts
    assert max_context(models["neox0"].config) == 64
    assert max_context(GPT2Config(n_positions=77)) == 77
    assert max_context(object()) is None
    assert hardware.choose("cpu", "float32")[1] is torch.float32 and hardware.choose("cpu", "fp32")[1] is torch.float32
    with pytest.raises(TokendynError, match=r"unknown dtype 'fp8'; use auto, float32 \(fp32\)"):
        hardware.choose("cpu", "fp8")


def test_tokenizer_fingerprint(tokenizer):
    assert tokenizer_fingerprint(build_tokenizer()) == tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(build_tokenizer(vocab_size=280)) != tokenizer_fingerprint(tokenizer)
    extended = build_tokenizer()
    extended.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    assert tokenizer_fingerprint(extended) != tokenizer_fingerprint(tokenizer)


def test_check_tokenizers_on_tiny_suite(tiny_suite, tokenizer):
    suite = load_suite(tiny_suite)
    assert tokenizer_fingerprint(load_tokenizer(suite)) == tokenizer_fingerprint(tokenizer)
    assert check_tokenizers(suite) == tokenizer_fingerprint(tokenizer)


def test_tokenizer_mismatch_names_both_checkpoints(ckpts, tmp_path):
    root, _ = ckpts
    save_checkpoint(tmp_path / "other", "gpt_neox", build_tokenizer(vocab_size=280), seed=5)
    suite = load_suite(
        write_suite_toml(
            tmp_path,
            f'[[models]]\nname = "a"\ncheckpoints = [{{ step = 1, path = '
            f'"{root / "neox0"}" }}, {{ step = 2, path = "other" }}]\n',
        )
    )
    with pytest.raises(TokendynError) as info:
        check_tokenizers(suite)
    assert str(info.value) == (
        f"the tokenizer of {tmp_path / 'other'} (model 'a', step 2) differs from that of "
        f"{root / 'neox0'} (model 'a', step 1); all checkpoints of a suite must share one "
        "tokenizer: split the suite"
    )


def test_checkpoint_without_tokenizer_files(ckpts, tmp_path, tokenizer):
    root, _ = ckpts
    save_checkpoint(tmp_path / "bare", "gpt_neox", tokenizer, seed=6)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bare" / name).unlink()
    expected = tokenizer_fingerprint(tokenizer)
    first = f'{{ step = 1, path = "{root / "neox0"}" }}'
    both = f'[[models]]\nname = "a"\ncheckpoints = [{first}, {{ step = 2, path = "bare" }}]\n'
    assert check_tokenizers(load_suite(write_suite_toml(tmp_path, both))) == expected
    bare_only = '[[models]]\nname = "a"\ncheckpoints = [{ step = 2, path = "bare" }]\n'
    with pytest.raises(TokendynError, match=r"no tokenizer files in .*bare .*set \[eval\] tokenizer"):
        check_tokenizers(load_suite(write_suite_toml(tmp_path, bare_only)))
    suite = write_suite_toml(tmp_path, bare_only)
    suite.write_text(suite.read_text().replace("seq_len", f'tokenizer = "{root / "neox0"}"\nseq_len'))
    assert check_tokenizers(load_suite(suite)) == expected


def test_a_tokenizer_shipping_its_own_code_runs_only_with_trust_remote_code(ckpts, tmp_path, monkeypatch):
    """A tokenizer class in the checkpoint folder (`auto_map`) is user code: not run by default (the
    model type's standard class loads the same vocabulary; a bare tokenizer folder naming the class is
    refused with the flag to pass), run with trust_remote_code, which must reach the tokenizer."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = copy_of(ckpts, "neox0", tmp_path)
    ran = tmp_path / "ran"
    (folder / "custom_tokenizer.py").write_text(
        f"from pathlib import Path\nfrom transformers import PreTrainedTokenizerFast\n\nPath({str(ran)!r}).touch()\n\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "custom_tokenizer.CustomTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    named = tmp_path / "named"  # a bare tokenizer folder naming its class: no model type to fall back on
    build_tokenizer().save_pretrained(named)
    (named / "custom_tokenizer.py").write_text((folder / "custom_tokenizer.py").read_text())
    named_config = json.loads((named / "tokenizer_config.json").read_text())
    named_config |= {"tokenizer_class": "CustomTokenizer", "auto_map": config["auto_map"]}
    (named / "tokenizer_config.json").write_text(json.dumps(named_config))
    models = f'tokenizer = "{named}"\n[[models]]\nname = "a"\ncheckpoints = [{{ step = 1, path = "{folder}" }}]\n'
    with pytest.raises(TokendynError, match="ships its own code; rerun with --trust-remote-code if you trust it$"):
        load_tokenizer(load_suite(write_suite_toml(named, models)))
    assert not ran.exists()
    suite = load_suite(
        write_suite_toml(tmp_path, f'[[models]]\nname = "a"\ncheckpoints = [{{ step = 1, path = "{folder}" }}]\n')
    )
    expected = tokenizer_fingerprint(load_tokenizer(suite))
    assert check_tokenizers(suite) == expected
    assert not ran.exists()
    assert type(load_tokenizer(suite, trust_remote_code=True)).__name__ == "CustomTokenizer"
    assert ran.exists()
    assert check_tokenizers(suite, trust_remote_code=True) == expected


# Every reader of a suite's configs, before any weights load (all go through `load_config`).
CONFIG_READERS = {
    "extract context": lambda suite: extract._check_context(suite, 16, False),
    "extract coords": lambda suite: extract._model_coords(suite, False),
    "auto batch size": lambda suite: extract.auto_batch_size(
        suite, {"valid": SimpleNamespace(lengths=np.array([16]), windows=[0])}, "cpu", torch.float32, np.zeros(2)
    ),
    "task context": suite_context,
    "generate sizes": generate.smallest_and_largest,
    "generate context": lambda suite: generate._check_context([m.checkpoints[0] for m in suite.models], 16, False),
}


@pytest.mark.parametrize("reader", CONFIG_READERS.values(), ids=CONFIG_READERS.keys())
def test_a_config_shipping_its_own_code_runs_only_with_trust_remote_code(ckpts, tmp_path, monkeypatch, reader):
    """A config class in the checkpoint folder (`auto_map`) is user code: refused with the flag to pass
    (was: transformers' ValueError as a traceback), run with trust_remote_code."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = copy_of(ckpts, "neox0", tmp_path)
    ran = tmp_path / "ran"
    (folder / "configuration_custom.py").write_text(
        f"from pathlib import Path\nfrom transformers import GPTNeoXConfig\n\nPath({str(ran)!r}).touch()\n\n"
        "class CustomConfig(GPTNeoXConfig):\n    model_type = 'custom'\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config |= {"model_type": "custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}
    (folder / "config.json").write_text(json.dumps(config))
    models = "".join(
        f'[[models]]\nname = "{name}"\ncheckpoints = [{{ step = 1, path = "{path}" }}]\n'
        for name, path in [("plain", ckpts[0] / "neox0"), ("custom", folder)]
    )
    suite = load_suite(write_suite_toml(tmp_path, models))
    with pytest.raises(TokendynError) as info:
        reader(suite)
    assert str(info.value) == (
        f"the model of {folder} (model 'custom', step 1) ships its own code; "
        "rerun with --trust-remote-code if you trust it"
    )
    assert not ran.exists()
    assert type(load_config(suite.models[1].checkpoints[0], trust_remote_code=True)).__name__ == "CustomConfig"
    assert ran.exists()


def test_vocab_too_small_for_tokenizer(ckpts, tmp_path):
    root, _ = ckpts
    save_checkpoint(tmp_path / "small", "gpt_neox", build_tokenizer(vocab_size=280), seed=5)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "small" / name).unlink()
    first = f'{{ step = 1, path = "{root / "neox0"}" }}'
    models = f'[[models]]\nname = "a"\ncheckpoints = [{first}, {{ step = 2, path = "small" }}]\n'
    with pytest.raises(TokendynError, match="has vocab_size 280 but the tokenizer of .* has 300 tokens"):
        check_tokenizers(load_suite(write_suite_toml(tmp_path, models)))


# ---- the Hugging Face cache, offline -------------------------------------------------------------


def make_hub_cache(cache: Path, repo_id: str, snapshots: dict[str, Path]) -> None:
    """Lay out `cache` as huggingface_hub does: refs/<revision> -> commit, snapshots/<commit>/ -> blobs/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for revision, source in snapshots.items():
        commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        (repo / "refs" / revision).write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file in source.iterdir():
            data = file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, ckpts) -> Path:
    """An offline HF_HOME whose cache holds org/name at step1000 and step2000 and pythia-70m at step1000."""
    home = tmp_path / "hf"
    cache = home / "hub"
    root, _ = ckpts
    make_hub_cache(cache, "org/name", {"step1000": root / "neox0", "step2000": root / "neox1"})
    make_hub_cache(cache, "EleutherAI/pythia-70m", {"step1000": root / "neox1"})
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import; snapshot_download looks them up at call time.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_offline_hub_revision_resolves_and_loads(hub_cache, ckpts, tmp_path, tokenizer):
    root, models = ckpts
    suite = load_suite(
        write_suite_toml(
            tmp_path, '[[models]]\nname = "n"\nhub_id = "org/name"\nrevisions = ["step1000"]\ntokens_per_step = 10\n'
        )
    )
    (ckpt,) = suite.models[0].checkpoints
    assert (ckpt.step, ckpt.source, ckpt.tokens_seen) == (1000, "org/name@step1000", 10000.0)
    commit = (hub_cache / "models--org--name" / "refs" / "step1000").read_text()
    assert resolve(ckpt) == hub_cache / "models--org--name" / "snapshots" / commit
    assert check_tokenizers(suite) == tokenizer_fingerprint(tokenizer)
    model = load_model(ckpt)
    torch.testing.assert_close(logits(model, tokenizer), logits(models["neox0"], tokenizer), rtol=0, atol=1e-6)
    # The cache names blobs by their sha256: the fingerprint equals that of the same bytes on disk.
    assert weights_fingerprint(ckpt) == weights_fingerprint(local(root / "neox0"))
    assert weights_fingerprint(hub("org/name", "step2000", 2000)) == weights_fingerprint(local(root / "neox1"))


def test_offline_pythia_preset(hub_cache, ckpts, tmp_path, tokenizer):
    root, models = ckpts
    suite = load_suite(write_suite_toml(tmp_path, '[[models]]\npreset = "pythia"\nsize = "70m"\nsteps = [1000]\n'))
    (ckpt,) = suite.models[0].checkpoints
    assert (ckpt.source, ckpt.tokens_seen) == ("EleutherAI/pythia-70m@step1000", 1000 * 2097152)
    torch.testing.assert_close(
        logits(load_model(ckpt), tokenizer), logits(models["neox1"], tokenizer), rtol=0, atol=1e-6
    )


def test_offline_missing_revision(hub_cache):
    with pytest.raises(TokendynError) as info:
        load_model(hub("org/name", "step3000", 3000))
    assert str(info.value) == (
        f"org/name@step3000 (model 'h', step 3000) is not (completely) in the Hugging Face cache {hub_cache} "
        "and HF_HUB_OFFLINE=1 is set; download it with network access, or point HF_HOME / HF_HUB_CACHE at a "
        "cache that has this revision"
    )
    with pytest.raises(TokendynError, match="org/other@step1000 .* is not .* in the Hugging Face cache"):
        resolve(hub("org/other", "step1000"))


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_offline_revision_without_its_weights_in_the_cache(hub_cache, ckpts, tmp_path, allow_pickle):
    """Config and tokenizer cached, weights not (a run stopped after the pre-fetch): snapshot_download offline
    returns the snapshot anyway; the error is that the revision is not in the cache (was: "no weights in")."""
    meta_only = copy_of(ckpts, "neox0", tmp_path)
    (meta_only / "model.safetensors").unlink()
    make_hub_cache(hub_cache, "org/name", {"step3000": meta_only})
    ckpt = hub("org/name", "step3000", 3000)
    assert (resolve(ckpt, weights=False) / "config.json").is_file()
    with pytest.raises(TokendynError, match=r"^org/name@step3000 .* is not \(completely\) in the Hugging Face cache"):
        load_model(ckpt, allow_pickle=allow_pickle)


def test_offline_revision_missing_a_shard_is_not_in_the_cache(hub_cache, ckpts, tmp_path):
    """A sharded revision whose download stopped before its last shard (was: a load error naming remote code)."""
    sharded = copy_of(ckpts, "neox0", tmp_path)
    AutoModelForCausalLM.from_pretrained(sharded).save_pretrained(sharded, max_shard_size="20KB")
    (sharded / "model.safetensors").unlink(missing_ok=True)  # save_pretrained may have removed it
    sorted(sharded.glob("model-*.safetensors"))[-1].unlink()
    make_hub_cache(hub_cache, "org/name", {"step3000": sharded})
    with pytest.raises(TokendynError, match=r"^org/name@step3000 .* is not \(completely\) in the Hugging Face cache"):
        load_model(hub("org/name", "step3000", 3000))


def test_offline_cache_from_hf_home_in_a_fresh_process(ckpts, tmp_path):
    """The user's path: only HF_HOME and HF_HUB_OFFLINE set before Python starts."""
    root, _ = ckpts
    make_hub_cache(tmp_path / "hf" / "hub", "org/name", {"step1000": root / "neox0"})
    suite = write_suite_toml(tmp_path, '[[models]]\nname = "n"\nhub_id = "org/name"\nrevisions = ["step1000"]\n')
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    script = textwrap.dedent(f"""
        from tokendyn.config.suite import load_suite
        from tokendyn.models.checkpoints import check_tokenizers, load_model, resolve
        suite = load_suite({str(suite)!r})
        ckpt = suite.models[0].checkpoints[0]
        check_tokenizers(suite)
        load_model(ckpt)
        print(resolve(ckpt))
    """)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).parent == tmp_path / "hf" / "hub" / "models--org--name" / "snapshots"
