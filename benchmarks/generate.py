"""Contrastive decoding speed: KV-cached against full re-forwarding, measured side by side in one run.

    python benchmarks/generate.py [--batch 8] [--prompt 5] [--new-tokens 25,100] [--hidden 128]
                                  [--layers 2] [--threads 1]

Two random-init OPT models (the "small" and the "large" of a mixture) decode the mixture (1, -1)
greedily with `tokendyn.models.generate.decode`, once with a KV cache per model (one new token per step)
and once re-running both models on the whole sequence at every step. Prints tokens/s of each, their
ratio, whether the outputs are identical, and the load average (the machine may be shared: say
so when you quote the numbers). One torch thread by default: on a loaded machine, more threads
than free cores make tiny models many times slower and the numbers meaningless.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import OPTConfig, OPTForCausalLM

from tokendyn.models.generate import decode

VOCAB = 8192


def random_opt(hidden: int, layers: int, seed: int, positions: int) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        ffn_dim=4 * hidden,
        word_embed_proj_dim=hidden,
        max_position_embeddings=positions,
    )
    return OPTForCausalLM(config).eval()


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=5)
    parser.add_argument("--new-tokens", default="25,100")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.new_tokens.split(",")]
    positions = args.prompt + max(lengths) + 2
    small = random_opt(args.hidden, args.layers, 0, positions)
    large = random_opt(args.hidden, 2 * args.layers, 1, positions)
    prompt = torch.randint(4, VOCAB, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}")
    print(
        f"small: {args.layers} layers, large: {2 * args.layers} layers, hidden {args.hidden}, "
        f"batch {args.batch}, prompt {args.prompt} tokens"
    )
    for n in lengths:
        run = dict(vocab_size=VOCAB)
        decode([small, large], [1, -1], prompt, 2, **run)  # warm-up
        cached_s, cached = timed(lambda: decode([small, large], [1, -1], prompt, n, **run))
        full_s, full = timed(lambda: decode([small, large], [1, -1], prompt, n, use_cache=False, **run))
        tokens = args.batch * n
        print(
            f"{n:4d} new tokens: cached {tokens / cached_s:8.0f} tok/s, full re-forward {tokens / full_s:8.0f} "
            f"tok/s, ratio {full_s / cached_s:5.1f}x, identical outputs: {torch.equal(cached, full)}"
        )


if __name__ == "__main__":
    main()
