"""The CUDA path, tested on CPU: batch sizing from free memory and the fused head's wiring."""

from __future__ import annotations

import types

import pytest
import torch

from conftest import save_checkpoint
from tokendyn.models import gpu
from tokendyn.models.extract import token_scores

# Pythia-160M in bfloat16, windows of 513, the chunked head's 2**22 logits.
DIMS = dict(hidden=768, intermediate=3072, vocab=50304, chunk_logits=2**22, dtype_bytes=2, window=513)


def _bytes_needed(batch_tokens: int) -> float:
    """Memory a batch needs by the model the sizing documents, written out independently."""
    per_position = DIMS["dtype_bytes"] * (6 * (DIMS["hidden"] + DIMS["intermediate"]) + DIMS["hidden"])
    return batch_tokens * per_position + 3 * 4 * DIMS["chunk_logits"]


@pytest.mark.parametrize("free_gib", [1, 4, 24, 80])
def test_batch_fits_free_memory_and_one_more_window_does_not(free_gib):
    free = free_gib * 2**30
    batch = gpu.batch_tokens_for_memory(free, **DIMS, cap=10**9)
    assert batch % DIMS["window"] == 0
    assert _bytes_needed(batch) <= 0.7 * free < _bytes_needed(batch + DIMS["window"])


def test_batch_grows_with_memory_and_respects_cap_and_one_window():
    sizes = [gpu.batch_tokens_for_memory(g * 2**30, **DIMS, cap=10**9) for g in (1, 2, 8, 40)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert gpu.batch_tokens_for_memory(80 * 2**30, **DIMS, cap=8192) == 8192  # the requested batch_tokens
    assert gpu.batch_tokens_for_memory(10 * 2**20, **DIMS, cap=8192) == 513  # nearly full: still one window
    with pytest.raises(ValueError, match="positive"):
        gpu.batch_tokens_for_memory(2**30, **{**DIMS, "hidden": 0}, cap=8192)


def test_cuda_batch_tokens_reads_free_memory(monkeypatch, tokenizer, tmp_path):
    model = save_checkpoint(tmp_path, "llama", tokenizer, seed=0)
    config = model.config
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 2**30, 16 * 2**30))
    batch = gpu.cuda_batch_tokens(model, window=33, cap=10**9, chunk_logits=2**22)
    expected = gpu.batch_tokens_for_memory(
        2 * 2**30, config.hidden_size, config.intermediate_size, config.vocab_size, 2**22, 4, 33, 10**9
    )
    assert batch == expected and batch % 33 == 0 and batch > 33


def test_fused_head_off_on_cpu(tokenizer, tmp_path):
    model = save_checkpoint(tmp_path, "llama", tokenizer, seed=0)
    assert not gpu.fused_head_available(model.get_output_embeddings(), torch.zeros(2, model.config.hidden_size))


def test_fused_head_only_for_a_plain_linear_head(monkeypatch, tokenizer, tmp_path):
    """On CUDA in half precision with cut-cross-entropy installed the fused head applies to a linear head,
    not where the model's logits are transformed after it (Gemma 2's softcap: `hidden` are the logits)."""
    monkeypatch.setattr(gpu.importlib.util, "find_spec", lambda name: object())
    head = save_checkpoint(tmp_path, "llama", tokenizer, seed=0).to(torch.bfloat16).get_output_embeddings()
    hidden = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)  # no CUDA here
    assert gpu.fused_head_available(head, hidden)
    assert not gpu.fused_head_available(lambda logits: logits, hidden)
    assert not gpu.fused_head_available(head, types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.bfloat16))


def test_fused_head_wiring_gives_the_chunked_losses(monkeypatch, tokenizer, tmp_path):
    """With the fused kernel standing in for cut-cross-entropy, token_scores returns the chunked head's losses."""
    import sys

    def linear_cross_entropy(e, c, targets, bias=None, reduction="mean"):
        logits = e @ c.T + (0 if bias is None else bias)
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction=reduction)

    monkeypatch.setitem(
        sys.modules, "cut_cross_entropy", types.SimpleNamespace(linear_cross_entropy=linear_cross_entropy)
    )
    model = save_checkpoint(tmp_path, "gpt_neox", tokenizer, seed=1)
    ids = torch.randint(0, len(tokenizer), (3, 12))
    ids[1, 7:] = -1
    score = ids >= 0
    with torch.inference_mode():
        chunked = token_scores(model, ids, score)["loss"]
        monkeypatch.setattr(gpu, "fused_head_available", lambda head, hidden: True)
        fused = token_scores(model, ids, score)["loss"]
    assert fused.shape == chunked.shape == (int(score[:, 1:].sum()),)
    torch.testing.assert_close(fused, chunked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batches", [(8192, None), (None, 64)])
def test_scoring_on_cuda_sizes_batches_from_free_memory(monkeypatch, tokenizer, tmp_path, batches):
    """_score_set's CUDA branch keeps the caller's batching mode and lowers it to what free memory holds."""
    import numpy as np

    from tokendyn.models import extract as ex

    model = save_checkpoint(tmp_path, "llama", tokenizer, seed=0)
    scored = types.SimpleNamespace(lengths=np.full(10, 33))  # windows of 33 positions
    monkeypatch.setattr(gpu, "cuda_batch_tokens", lambda model, window, cap, chunk: min(cap, 4 * window))
    batch_tokens, batch_size = ex._fit_device_memory(model, scored, batches)
    assert (batch_tokens, batch_size) == ((4 * 33, None) if batches[0] else (None, 4))
