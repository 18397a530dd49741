"""Batches sized from free memory, and the optional fused head of the CUDA side of scoring.

On a GPU the scoring kernel (`tokendyn.models.extract.token_scores`) keeps everything on the
device and copies back only the per-token results. Two things only matter there:

- how many positions one forward pass may hold, from the free device memory
  (`batch_tokens_for_memory`, a pure function of the numbers so it is tested without a GPU; it is
  also the rule of `--batch-size auto`, on CPUs from the available RAM, `free_memory`);
- the head and its cross-entropy fused by Apple's `cut-cross-entropy` package
  (`cut_cross_entropy.linear_cross_entropy`), which never materialises the positions x vocab
  logits. It is used only when the package is installed, the model runs on CUDA in half precision,
  its head is a plain linear layer, and the loss is the only metric; otherwise the chunked head
  of `token_scores` runs (identical results up to rounding).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import PretrainedConfig

# Share of the free device memory a batch may use: the rest absorbs allocator fragmentation and
# the memory other processes take meanwhile.
MEMORY_SHARE = 0.7
# Activations alive at once per position in one decoder layer, in units of (hidden + intermediate)
# values: the residual stream, its normalised copy, q/k/v and the attention output (~5 x hidden),
# and the feed-forward's up/gate/activation (~3 x intermediate), rounded up.
ACTIVATION_FACTOR = 6
# float32 values per logit the chunked head holds at once (head output, float copy, log-softmax).
HEAD_COPIES = 3


def batch_tokens_for_memory(
    free_bytes: int,
    hidden: int,
    intermediate: int,
    vocab: int,
    chunk_logits: int,
    dtype_bytes: int,
    window: int,
    cap: int,
) -> int:
    """Model positions per forward pass that fit in `free_bytes` of device memory (weights already loaded).

    Per position: the activations of one layer at a time (`ACTIVATION_FACTOR` x (hidden +
    intermediate) values of `dtype_bytes`) plus the final hidden state kept for the head; fixed: the
    head's chunk of `chunk_logits` float32 logits, `HEAD_COPIES` times. At most `cap` (the
    requested batch_tokens), at least one `window` (a batch holds at least one window), and, when
    memory is the limit, a whole number of windows.
    """
    if min(hidden, intermediate, vocab, chunk_logits, dtype_bytes, window, cap) < 1:
        raise ValueError("model dimensions, window and cap must be positive")
    usable = MEMORY_SHARE * max(free_bytes, 0) - HEAD_COPIES * 4 * chunk_logits
    per_position = dtype_bytes * (ACTIVATION_FACTOR * (hidden + intermediate) + hidden)
    fit = int(usable // per_position) if usable > 0 else 0
    return max(window, min(cap, fit // window * window))


def config_batch_tokens(
    config: PretrainedConfig, free_bytes: int, dtype_bytes: int, window: int, cap: int, chunk_logits: int
) -> int:
    """`batch_tokens_for_memory` for a model of this transformers `config` (its text part)."""
    config = config.get_text_config()
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * hidden
    return batch_tokens_for_memory(
        free_bytes, hidden, intermediate, config.vocab_size, chunk_logits, dtype_bytes, window, cap
    )


def cuda_batch_tokens(model: torch.nn.Module, window: int, cap: int, chunk_logits: int) -> int:
    """`batch_tokens_for_memory` for `model` on its CUDA device, from `torch.cuda.mem_get_info`."""
    free, _total = torch.cuda.mem_get_info(model.device)
    dtype_bytes = next(model.parameters()).element_size()
    return config_batch_tokens(model.config, free, dtype_bytes, window, cap, chunk_logits)


def free_memory(device: str) -> tuple[int, str]:
    """Bytes a batch may take on `device` now, and what they are: free CUDA memory, else available RAM.

    On CPUs (and Apple's unified memory) the batch lives in RAM: psutil's `available` (free memory
    plus what the kernel can reclaim at once, such as the page cache).
    """
    kind = torch.device(device).type
    if kind == "cuda":
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return free, f"free memory of {device}"
    import psutil  # a dependency of dask.distributed

    return psutil.virtual_memory().available, "available RAM"


def fused_head_available(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor) -> bool:
    """True when `fused_head_loss` applies: cut-cross-entropy installed, CUDA, half precision, and `head`
    (what maps `hidden` to logits) a plain linear layer; not when `hidden` are already the logits."""
    return (
        hidden.device.type == "cuda"
        and hidden.dtype in (torch.float16, torch.bfloat16)
        and isinstance(head, torch.nn.Linear)
        and head.weight.dtype == hidden.dtype
        and importlib.util.find_spec("cut_cross_entropy") is not None
    )


def fused_head_loss(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL (nats) of `targets` given final hidden states (n, hidden), head and loss fused.

    `cut_cross_entropy.linear_cross_entropy` computes log-sum-exp of hidden @ head.T block by block
    in on-chip memory, so the (n, vocab) logits never exist; reduction="none" keeps one loss per
    position.
    """
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, head.weight, targets, bias=head.bias, reduction="none")
