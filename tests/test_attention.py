"""Causal attention in blocks of queries: the same scores as transformers' sdpa, and used by extract."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import tokendyn
from conftest import save_checkpoint, write_suite
from tokendyn.models import attention, onednn
from tokendyn.models.extract import extract, token_scores


def _causal_attention(query, key, value, scale):
    """Textbook causal attention in float64: softmax(q k^T * scale, future keys masked) v, key heads repeated."""
    q, k, v = (t.double() for t in (query, key, value))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * scale
    future = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1)
    return (scores.masked_fill(future, float("-inf")).softmax(-1) @ v).transpose(1, 2)


def _count_delegations(monkeypatch) -> list[int]:
    """A list that grows by one at every call `query_blocks_attention` hands to transformers' sdpa."""
    calls = []
    sdpa = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    return calls


def _count_blocks(monkeypatch) -> list[int]:
    """A list that grows by one at every block of queries `query_blocks_attention` gives torch's kernel."""
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        attention, "F", SimpleNamespace(scaled_dot_product_attention=lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    )
    return calls


def _losses_with_sdpa_and_blocks(model, width: int, monkeypatch):
    """(losses with sdpa, losses with the query blocks, calls the blocks handed to sdpa) of `model` on
    two random windows of `width` tokens."""
    blocks = copy.deepcopy(model)
    assert attention.use_query_blocks(blocks)
    ids = torch.randint(0, model.config.vocab_size, (2, width))
    score = torch.ones_like(ids, dtype=torch.bool)
    score[:, 0] = False
    with torch.inference_mode():
        want = token_scores(model, ids, score)["loss"]
        delegated = _count_delegations(monkeypatch)
        got = token_scores(blocks, ids, score)["loss"]
    return want, got, delegated


@pytest.mark.parametrize("length", [65, 200, 512])
@pytest.mark.parametrize("kv_heads", [3, 9])
def test_query_blocks_equal_textbook_causal_attention(length, kv_heads):
    """Grouped (9 query heads on 3 key heads) and plain heads, a partial last block and full windows."""
    torch.manual_seed(0)
    query = torch.randn(2, 9, length, 16)
    key, value = torch.randn(2, kv_heads, length, 16), torch.randn(2, kv_heads, length, 16)
    module = torch.nn.Module()
    got, weights = attention.query_blocks_attention(module, query, key, value, None, scaling=0.3)
    assert weights is None and got.shape == (2, length, 9, 16)
    np.testing.assert_allclose(got.double(), _causal_attention(query, key, value, 0.3), atol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["mask", "too long", "one block", "not causal", "cached keys", "position bias", "grouped, torch < 2.5"],
)
def test_everything_but_plain_causal_self_attention_goes_to_sdpa(case, monkeypatch):
    sdpa = attention.sdpa_attention_forward
    calls = _count_delegations(monkeypatch)
    monkeypatch.setattr(attention, "GROUPED_HEADS", case != "grouped, torch < 2.5")
    length = {"too long": attention.KEY_BLOCK + 1, "one block": attention.BLOCK}.get(case, 100)
    query = torch.randn(1, 2 * (1 + case.startswith("grouped")), length, 8)
    key = torch.randn(1, 2, length + (case == "cached keys"), 8)
    module = torch.nn.Module()
    module.is_causal = case != "not causal"
    module.num_key_value_groups = query.shape[1] // key.shape[1]  # read by sdpa where it repeats key heads
    mask = torch.ones(length, key.shape[2], dtype=torch.bool).tril(key.shape[2] - length) if case == "mask" else None
    bias = torch.zeros(1, 2, length, key.shape[2]) if case == "position bias" else None
    got, _ = attention.query_blocks_attention(module, query, key, key, mask, position_bias=bias)
    assert calls == [1]
    want, _ = sdpa(module, query, key, key, mask, position_bias=bias)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("family", ["opt", "gpt_neox", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_models_score_as_with_sdpa(tokenizer, tmp_path, family, dtype, monkeypatch):
    """Whole models with right-padded windows, blocks of 4 queries over windows of 19 positions."""
    monkeypatch.setattr(attention, "BLOCK", 4)
    plain = save_checkpoint(tmp_path, family, tokenizer, seed=3).to(dtype)
    blocks = copy.deepcopy(plain)
    assert plain.config._attn_implementation == "sdpa"
    assert attention.use_query_blocks(blocks) and blocks.config._attn_implementation == attention.NAME
    ids = torch.randint(0, len(tokenizer), (3, 20))
    ids[2, 12:] = -1
    score = ids >= 0
    score[:, 0] = False
    delegated = _count_delegations(monkeypatch)
    with torch.inference_mode():
        want = token_scores(plain, ids, score, ["loss", "entropy"])
        got = token_scores(blocks, ids, score, ["loss", "entropy"])
    assert delegated == []  # every layer of `blocks` ran the query blocks
    tolerance = 1e-5 if dtype == torch.float32 else 0.03
    for metric in want:
        np.testing.assert_allclose(got[metric], want[metric], atol=tolerance)


def test_grouped_query_model_scores_as_with_sdpa(monkeypatch):
    """A Llama with 4 query heads on 1 key/value head, windows of 150 positions in blocks of 64."""
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=48, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(5)
    want, got, delegated = _losses_with_sdpa_and_blocks(LlamaForCausalLM(config).eval(), 151, monkeypatch)
    assert delegated == []
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_ungrouped_heads_on_old_torch_still_run_the_blocks(monkeypatch):
    """Without `enable_gqa` (torch < 2.5) only grouped heads go to sdpa; plain heads never pass it."""
    monkeypatch.setattr(attention, "GROUPED_HEADS", False)
    delegated, blocks = _count_delegations(monkeypatch), _count_blocks(monkeypatch)
    query, key = torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8)
    got, _ = attention.query_blocks_attention(torch.nn.Module(), query, key, key, None, scaling=0.5)
    assert delegated == [] and len(blocks) == 2
    np.testing.assert_allclose(got.double(), _causal_attention(query, key, key, 0.5), atol=1e-5)


@pytest.mark.parametrize("window", [8, 4096])
def test_sliding_window_masks_go_to_sdpa(window, monkeypatch):
    """A Mistral whose sliding window is shorter than the 20-position windows gets a mask and keeps sdpa's
    path; one whose window covers them gets no mask and runs the blocks. Both score as with sdpa."""
    monkeypatch.setattr(attention, "BLOCK", 4)
    config = MistralConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=64, sliding_window=window,
    )  # fmt: skip
    torch.manual_seed(6)
    want, got, delegated = _losses_with_sdpa_and_blocks(MistralForCausalLM(config).eval(), 20, monkeypatch)
    assert len(delegated) == (2 if window < 20 else 0)  # one call per layer
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_models_it_does_not_serve_are_left_alone(tokenizer, tmp_path, monkeypatch):
    eager = save_checkpoint(tmp_path / "a", "llama", tokenizer, seed=1)
    eager.set_attn_implementation("eager")
    assert not attention.use_query_blocks(eager) and eager.config._attn_implementation == "eager"
    remote = save_checkpoint(tmp_path / "b", "llama", tokenizer, seed=1)
    remote.__class__ = type("RemoteLlama", (type(remote),), {"__module__": "transformers_modules.someone.modeling"})
    assert not attention.use_query_blocks(remote) and remote.config._attn_implementation == "sdpa"
    unaudited = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    assert unaudited.config.model_type not in onednn.MODEL_TYPES
    assert not attention.use_query_blocks(unaudited) and unaudited.config._attn_implementation == "sdpa"
    refuses = save_checkpoint(tmp_path / "c", "llama", tokenizer, seed=1)
    monkeypatch.setattr(refuses, "set_attn_implementation", lambda name: None)  # a switch that did nothing
    assert not attention.use_query_blocks(refuses) and refuses.config._attn_implementation == "sdpa"


def test_extract_scores_through_query_blocks(tmp_path, monkeypatch):
    """The CLI's scoring path switches the model: the blocks run, and the losses equal an extraction
    with transformers' sdpa."""
    suite = write_suite(tmp_path, families=("llama",), steps=(0, 10))
    monkeypatch.setattr(attention, "BLOCK", 4)
    switched = []
    use = attention.use_query_blocks
    monkeypatch.setattr(attention, "use_query_blocks", lambda model: switched.append(use(model)) or switched[-1])
    delegated, blocks = _count_delegations(monkeypatch), _count_blocks(monkeypatch)
    extract(suite, tmp_path / "blocks.zarr", progress=False)
    assert switched == [True, True] and delegated == [] and blocks
    monkeypatch.setattr(attention, "use_query_blocks", lambda model: False)
    blocks.clear()
    extract(suite, tmp_path / "sdpa.zarr", progress=False)
    assert blocks == []
    blocks, sdpa = (tokendyn.open_store(tmp_path / name).loss.values for name in ("blocks.zarr", "sdpa.zarr"))
    np.testing.assert_allclose(blocks, sdpa, atol=1e-5)
