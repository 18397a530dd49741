"""Causal self-attention in blocks of queries, for scoring windows of up to 512 positions on CPU.

torch's CPU flash-attention kernel (`scaled_dot_product_attention`, torch 2.13) walks the keys in
blocks of `KEY_BLOCK` and, under `is_causal`, skips only whole key blocks past the diagonal. A window
of at most 512 positions is a single key block, so every query is multiplied with every key: twice
the products causal attention needs. `query_blocks_attention` gives the kernel `BLOCK` queries at a
time with only the keys up to the block's end, and a boolean mask for the diagonal; what is computed
past the diagonal shrinks to one block. Measured on the SmolLM2-135M and Pythia-160M shapes (8
windows of 512, 2 threads, AVX512): attention 21-38% faster in float32 and bfloat16, the forward plus
head 6-8% faster on the Llama shape and 2% on the NeoX shape; per-token losses agree with sdpa's to
3e-6 (docs/benchmarks.md, "Causal attention in blocks of queries"). Longer windows (measured at 768-2048)
gain nothing, as the kernel then skips key blocks itself, so they keep the kernel's own path.

`use_query_blocks` installs it as a transformers attention implementation (`NAME`) for the
architectures in `onednn.MODEL_TYPES`; others (sparse-attention models, gemma4, ...) branch on the
name "sdpa" and keep it. Every call that is not plain causal self-attention on CPU goes to
transformers' own `sdpa` unchanged: a mask (padding, sliding windows), more keys than queries (a
key/value cache from earlier calls), a position bias, softcapping, dropout, other devices, windows
of one block or longer than `KEY_BLOCK`, and grouped heads on torch < 2.5 (no `enable_gqa`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import is_torch_greater_or_equal

from tokendyn.models import onednn

NAME = "tokendyn_query_blocks"
BLOCK = 64  # queries per call: 64 was fastest of 32-256 on both shapes, in float32 and bfloat16
KEY_BLOCK = 512  # torch 2.13's CPU flash kernel's key block (kvSplitSize) for sequences of this length or more
GROUPED_HEADS = is_torch_greater_or_equal("2.5")  # scaled_dot_product_attention(enable_gqa=) exists


def query_blocks_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (batch, heads, seq, dim), key and value
    (batch, kv_heads, seq, dim); returns (batch, seq, heads, dim) as transformers' `sdpa` does."""
    length = query.shape[2]
    grouped = key.shape[1] != query.shape[1]
    plain = (
        query.device.type == "cpu"
        and attention_mask is None
        and dropout == 0.0
        and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        and key.shape[2] == length
        and BLOCK < length <= KEY_BLOCK
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and (GROUPED_HEADS or not grouped)
    )
    if not plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    batch, heads, _, dim = query.shape
    out = torch.empty(batch, length, heads, value.shape[-1], dtype=query.dtype, device=query.device)
    gqa = {"enable_gqa": True} if grouped else {}
    for start in range(0, length, BLOCK):
        end = min(start + BLOCK, length)
        # query start + r sees keys 0 .. start + r
        mask = torch.ones(end - start, end, dtype=torch.bool).tril(start)
        keys, values = key[:, :, :end], value[:, :, :end]
        block = F.scaled_dot_product_attention(
            query[:, :, start:end], keys, values, attn_mask=mask, scale=scaling, **gqa
        )
        out[:, start:end] = block.transpose(1, 2)
    return out, None


def use_query_blocks(model: torch.nn.Module) -> bool:
    """Switch a CPU model that runs transformers' `sdpa` attention to `query_blocks_attention`, in place;
    returns whether it did. Models on other devices, with another attention implementation, or not
    `onednn.audited` (an architecture outside `onednn.MODEL_TYPES`, remote code) are left as they are."""
    config = getattr(model, "config", None)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if not onednn.audited(model) or not on_cpu or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, query_blocks_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks, so no mask where sdpa has none
    model.set_attn_implementation(NAME)
    return config._attn_implementation == NAME
