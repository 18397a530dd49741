"""Shared fixtures: an offline tokenizer, tiny random checkpoints of three model families, and the
planted three-size store (`planted_store`, built once per session, see planted_stores.py).

Nothing here downloads anything: the tokenizer is trained on a few sentences, the models are
random-init configs saved as Hugging Face directories with safetensors.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# verified weight files are remembered per test session, not in the home folder (checkpoints.weights_match)
os.environ["TOKENDYN_HASH_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="tokendyn-hash-cache-"), "weights.json")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# --dtype auto runs bfloat16 on CPUs with native bfloat16 (some machines of the pool): the tests
# compare scores with transformers' float32 numbers, so auto stands for float32 here, in every
# process the tests start too (tests/test_hardware.py checks auto's own choice without it).
os.environ["TOKENDYN_DTYPE"] = "float32"

import torch  # noqa: E402

torch.set_num_threads(1)  # the test models are tiny: a second thread only adds synchronisation
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]

SAMPLE_TEXT = (
    """The quick brown fox jumps over the lazy dog. A cat sat on the mat.
Alice was born in Paris in 1970 and works as a baker.
Bob lives in Berlin; his favourite colour is green.
Numbers like 12, 345 and 6789 appear now and then!
"""
    * 4
)

FAMILIES = {
    "opt": (
        OPTConfig,
        OPTForCausalLM,
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32),
    ),
    "gpt_neox": (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    ),
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64),
    ),
}


def build_tokenizer(vocab_size: int = 300, text: str = SAMPLE_TEXT) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer (any UTF-8 text encodes; no unknown tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_checkpoint(path: Path, family: str, tokenizer, seed: int, max_positions: int = 64):
    """Save a random-init model of `family` with `tokenizer` as an HF directory; returns the model."""
    config_cls, model_cls, kwargs = FAMILIES[family]
    config = config_cls(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def write_suite(
    root: Path,
    families=("opt",),
    steps=(0, 10, 20),
    seq_len: int = 16,
    max_sequences: int | None = None,
    text: str | None = None,
    split: str | None = None,
) -> Path:
    """Write checkpoints, an evaluation file and a suite.toml under `root`; return the TOML path.

    The evaluation file is one document unless `split` ("paragraph", "line") says otherwise."""
    tokenizer = build_tokenizer()
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "valid.txt").write_text(text if text is not None else SAMPLE_TEXT.replace("\n", "\n\n"))
    lines = ["[eval]", 'files = ["data/valid.txt"]', f"seq_len = {seq_len}"]
    if max_sequences is not None:
        lines.append(f"max_sequences = {max_sequences}")
    if split is not None:
        lines.append(f'split = "{split}"')
    for f_index, family in enumerate(families):
        ckpts = []
        for s_index, step in enumerate(steps):
            rel = f"ckpts/{family}/step{step}"
            save_checkpoint(root / rel, family, tokenizer, seed=100 * f_index + s_index)
            ckpts.append(f'{{ step = {step}, path = "{rel}" }}')
        lines += ["", "[[models]]", f'name = "{family}"', f"checkpoints = [{', '.join(ckpts)}]"]
    suite = root / "suite.toml"
    suite.write_text("\n".join(lines) + "\n")
    return suite


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory) -> Path:
    """A suite of three families (OPT, GPT-NeoX, Llama), three random checkpoints each."""
    return write_suite(tmp_path_factory.mktemp("suite"), families=("opt", "gpt_neox", "llama"))


@pytest.fixture(scope="session")
def planted_store(tmp_path_factory):
    """(lazy dataset, truth) of the shared planted store (`planted_stores.planted_folder`); read only."""
    import numpy as np

    import tokendyn
    from planted_stores import planted_folder

    folder = planted_folder(tmp_path_factory)
    return tokendyn.open_store(folder / "p.zarr"), dict(np.load(folder / "truth.npz"))
