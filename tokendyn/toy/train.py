"""Train one small OPT model on a fixed token stream, saving Hugging Face checkpoints on the way.

A plain loop in the spirit of nanoGPT: batches are taken in order from a precomputed
(n_sequences, seq_len) tensor, so every model size sees the same data in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast


@dataclass(frozen=True)
class ModelSize:
    """Shape and learning rate of one model: `hidden` width, `layers`, attention `heads`, peak `lr`.

    more_threads_from: from this fraction of the training steps on, train with twice the build's
        torch threads (None: never). The largest size uses it to take over the core the smaller sizes
        leave idle once they have finished beside it. The switch is at a fixed step, not when they
        finish, because the weights depend on the thread count: a fixed step keeps a build reproducible.
    """

    hidden: int
    layers: int
    heads: int
    lr: float
    more_threads_from: float | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and checkpointing, shared by all sizes of a suite.

    batch_size: sequences per step (each of the stream's seq_len tokens).
    warmup_steps: linear warmup from 0 to the peak learning rate.
    final_lr_ratio: the learning rate decays linearly from the peak after warmup to
        peak * final_lr_ratio at the last step (1.0 = constant).
    weight_decay, grad_clip: AdamW weight decay and the gradient-norm clip.
    init_logit_std: standard deviation of the initial logits. The output embedding (untied from
        the input embedding) is drawn with std init_logit_std / sqrt(hidden), so the loss at
        step 0 exceeds log(vocab) by about init_logit_std**2 / 2 at every width, as in large
        language models; 0 gives exactly uniform predictions at step 0.
    log_checkpoints: log-spaced checkpoints from step 1 up to switch_fraction * total steps;
    linear_checkpoints: evenly spaced checkpoints from there to the last step (step 0 is always saved).
    """

    batch_size: int = 32
    warmup_steps: int = 50
    final_lr_ratio: float = 0.2
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    init_logit_std: float = 1.0
    log_checkpoints: int = 10
    linear_checkpoints: int = 14
    switch_fraction: float = 0.1


@contextlib.contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """torch's CPU thread count set to `threads` inside the block, restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def checkpoint_steps(total: int, n_log: int, n_linear: int, switch_fraction: float) -> list[int]:
    """Step 0, `n_log` log-spaced steps up to the switch point, then `n_linear` evenly spaced to `total`."""
    switch = max(1, round(switch_fraction * total))
    log_part = np.geomspace(1, switch, n_log) if n_log else []
    linear_part = np.linspace(switch, total, n_linear + 1)[1:]
    return sorted({0, *(int(round(s)) for s in log_part), *(int(round(s)) for s in linear_part)})


def learning_rate(step: int, total: int, peak: float, cfg: TrainConfig) -> float:
    """Linear warmup to `peak`, then a linear decay to peak * final_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return peak * (1 - (1 - cfg.final_lr_ratio) * progress)


def opt_config(size: ModelSize, tokenizer: PreTrainedTokenizerFast, seq_len: int) -> OPTConfig:
    """An OPT configuration of `size` for `tokenizer`: no dropout, output embedding untied from the input."""
    return OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        ffn_dim=4 * size.hidden,
        word_embed_proj_dim=size.hidden,
        max_position_embeddings=seq_len,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def train(
    size: ModelSize,
    tokens: torch.Tensor,
    tokenizer: PreTrainedTokenizerFast,
    cfg: TrainConfig,
    out: Path,
    seed: int,
    on_step: Callable[[float], None] | None = None,
    threads: int = 1,
) -> list[int]:
    """Train on `tokens` (n_sequences, seq_len) for one pass; save checkpoints as `out/step<N>`.

    Step N is the model after N optimiser updates (step 0 is the initialisation). Returns the
    saved steps. `on_step(loss)` is called after every update (for progress bars). `threads` is
    torch's thread count (doubled from `size.more_threads_from` on); the weights depend on it.
    """
    total = len(tokens) // cfg.batch_size
    if total < 1:
        raise ValueError(f"{len(tokens)} sequences make no batch of {cfg.batch_size}")
    saves = set(checkpoint_steps(total, cfg.log_checkpoints, cfg.linear_checkpoints, cfg.switch_fraction))
    more_threads_at = total if size.more_threads_from is None else round(size.more_threads_from * total)
    torch.manual_seed(seed)
    model = OPTForCausalLM(opt_config(size, tokenizer, tokens.shape[1]))
    torch.nn.init.normal_(model.lm_head.weight, 0.0, cfg.init_logit_std / size.hidden**0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    with pinned_threads(threads):
        for step in range(total + 1):
            if step in saves:
                model.save_pretrained(out / f"step{step}")
                tokenizer.save_pretrained(out / f"step{step}")
            if step == total:
                break
            if step == more_threads_at:
                torch.set_num_threads(2 * threads)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total, size.lr, cfg)
            batch = tokens[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step(loss.item())
    return sorted(saves)
