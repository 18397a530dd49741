"""Scoring speed on real model shapes, measured side by side in one run.

    python benchmarks/scoring.py [--tokens 4096] [--window 512] [--models llama,neox] [--dtypes float32,bfloat16]

Random-init models with the configs of SmolLM2-135M (Llama) and Pythia-160M (GPT-NeoX) score
`--tokens` random token ids in windows of `--window` (no padding). For each model and dtype it
prints tokens/s of:
  - tokendyn's kernel (`token_scores`, loss only),
  - a naive transformers loop (one window per forward pass, full logits, log_softmax, gather),
  - lm-eval's HF backend `loglikelihood_rolling` and minicons' `IncrementalLMScorer`, when they are
    installed in this environment (they are not tokendyn dependencies; the benchmark says when skipped),
and the float32 GEMM bound at the model's shapes: the time of the model's matrix products
(every linear layer and the head, at (tokens x in) @ (in x out)) timed alone, so a kernel at 1.0
spends its time only in those products. auto's dtype choice on this machine is marked.
Half precision on a CPU without native bfloat16 is emulated (tens of times slower): it runs on
--half-tokens tokens only. Start-up (imports, model creation) is not timed.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings

import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

from tokendyn.models import hardware
from tokendyn.models.extract import token_scores

CONFIGS = {
    "llama": (
        "SmolLM2-135M (Llama)",
        LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            rope_theta=10000.0,
        ),
    ),
    "neox": (
        "Pythia-160M (GPT-NeoX)",
        GPTNeoXConfig(
            vocab_size=50304,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=2048,
            rotary_pct=0.25,
            tie_word_embeddings=False,
            use_parallel_residual=True,
        ),
    ),
}


def make_model(config, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()


def windows(n_tokens: int, window: int, vocab: int) -> torch.Tensor:
    n = max(1, n_tokens // window)
    return torch.randint(0, vocab, (n, window), generator=torch.Generator().manual_seed(0))


def gemm_bound_seconds(model: torch.nn.Module, n_tokens: int, repeats: int = 2) -> float:
    """Seconds of the model's float32 matrix products for n_tokens tokens, each timed alone at its shape."""
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    total = 0.0
    timed: dict[tuple[int, int], float] = {}
    for shape in shapes:
        if shape not in timed:
            x, w = torch.randn(n_tokens, shape[0]), torch.randn(shape[0], shape[1])
            x @ w
            best = math.inf
            for _ in range(repeats):
                started = time.perf_counter()
                x @ w
                best = min(best, time.perf_counter() - started)
            timed[shape] = best
        total += timed[shape]
    return total


def seconds(fn, repeats: int = 1) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def kernel(model, ids: torch.Tensor, batch: int) -> None:
    with torch.inference_mode():
        for b in range(0, len(ids), batch):
            token_scores(model, ids[b : b + batch])


def naive_loop(model, ids: torch.Tensor) -> None:
    with torch.inference_mode():
        for row in ids:
            logits = model(input_ids=row[None]).logits.float()
            torch.log_softmax(logits[0, :-1], -1).gather(1, row[1:, None])


def lm_eval_rolling(model, ids: torch.Tensor, window: int):
    """lm-eval's HF backend on the same tokens (its rolling windows of `window`), or None if not installed."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return None
    lm = HFLM(
        pretrained=model, tokenizer=_identity_tokenizer(model.config.vocab_size), batch_size=len(ids), max_length=window
    )
    tokens = ids.flatten().tolist()

    def run():
        # loglikelihood_rolling's own windows, on token ids (skipping its tokenization of text)
        from lm_eval import utils

        rolling = list(
            map(
                utils.make_disjoint_window,
                utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=tokens[0], max_seq_len=window, context_len=1
                ),
            )
        )
        lm._loglikelihood_tokens([(("", ""), ctx, cont) for ctx, cont in rolling], disable_tqdm=True)

    return run


def _identity_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({str(i): i for i in range(vocab)}, unk_token="0")), eos_token="0"
    )


def minicons_scorer(model, ids: torch.Tensor):
    try:
        from minicons import scorer
    except ImportError:
        return None
    lm = scorer.IncrementalLMScorer(model, device="cpu", tokenizer=_identity_tokenizer(model.config.vocab_size))
    texts = [" ".join(map(str, row.tolist())) for row in ids]
    return lambda: lm.sequence_score(texts, reduction=lambda x: x, bow_correction=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4, help="windows per forward pass of the kernel")
    parser.add_argument("--models", default="llama,neox")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument(
        "--half-tokens", type=int, default=256, help="tokens for half precision on CPUs that emulate it"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    device, auto = hardware.choose("cpu", "auto")
    print(
        f"{os.cpu_count()} cores, CPU capability {torch.backends.cpu.get_cpu_capability()}, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; auto dtype: {auto}"
    )
    for key in args.models.split(","):
        label, config = CONFIGS[key]
        print(f"\n{label}: {args.tokens} tokens in windows of {args.window}")
        bound = None
        for name in args.dtypes.split(","):
            dtype = hardware.DTYPES[hardware.canonical_dtype(name)]
            model = make_model(config, dtype)
            emulated = dtype != torch.float32 and not hardware.probe("cpu", "auto").native_bf16()
            n_tokens = args.half_tokens if emulated else args.tokens
            ids = windows(n_tokens, min(args.window, n_tokens), config.vocab_size)
            n = ids.numel()
            if bound is None:
                bound = n / gemm_bound_seconds(model, n)
                print(f"  {'float32 GEMM bound':<34} {bound:9.0f} tok/s")
            mark = " <- auto" if dtype == auto else ""
            rows = [
                ("tokendyn kernel", lambda: kernel(model, ids, args.batch)),
                ("naive transformers loop", lambda: naive_loop(model, ids)),
            ]
            if not emulated:
                rows += [
                    ("lm-eval loglikelihood_rolling", lm_eval_rolling(model, ids, args.window)),
                    ("minicons IncrementalLMScorer", minicons_scorer(model, ids)),
                ]
            for what, fn in rows:
                if fn is None:
                    print(f"  {what + ' ' + str(dtype)[6:]:<34} skipped: not installed in this environment")
                    continue
                rate = n / seconds(fn)
                print(
                    f"  {what + ' ' + str(dtype)[6:]:<34} {rate:9.0f} tok/s  {rate / bound:5.2f} x bound{mark}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
