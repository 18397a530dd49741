"""Scoring protocols side by side: tokens/s and the padding share of the compute, in one run.

    python benchmarks/protocols.py [--shape opt-125m] [--tokens 8192] [--seq-len 512] [--batch-tokens 8192]

On one text of about `--tokens` tokens in paragraphs of varied length (a stand-in for a novel in a
.txt file) and a random-init model of the given shape, it scores the text with
  - the format-1 default (`packing = "document"`: one paragraph per padded row, BOS, rows cut at
    seq_len, batches of batch_tokens // seq_len rows in file order, trailing padding trimmed),
  - the format-1 `packing = "concat"` (one stream cut into seq_len rows),
  - `rolling` with stride = seq_len (the new default; the file is one document),
  - `rolling` with stride = seq_len / 2,
  - `packed` (one window per paragraph, batches of similar length),
and prints scored tokens, tokens/s, the padding share of the computed positions and the share
spent re-reading context, plus the CPU capability torch dispatches to. The format-1 rows are
rebuilt here from its rules; the others run tokendyn's own windows, batches and kernel.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import OPTConfig, OPTForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import build_tokenizer  # noqa: E402
from tokendyn.config.suite import EvalSet  # noqa: E402
from tokendyn.data.corpus import PAD, plan_batches, tokenize_set  # noqa: E402
from tokendyn.models.extract import _batch, token_scores  # noqa: E402

SHAPES = {
    "opt-125m": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        ffn_dim=3072,
        vocab_size=50272,
        max_position_embeddings=2048,
        word_embed_proj_dim=768,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=256,
        vocab_size=50272,
        max_position_embeddings=2048,
        word_embed_proj_dim=64,
    ),
}
WORDS = [
    "the",
    "of",
    "and",
    "a",
    "to",
    "in",
    "he",
    "was",
    "it",
    "his",
    "that",
    "with",
    "had",
    "as",
    "for",
    "on",
    "at",
    "her",
    "by",
    "she",
    "not",
    "but",
    "be",
    "they",
    "you",
    "from",
    "which",
    "this",
    "have",
    "all",
    "were",
    "said",
    "one",
    "so",
    "an",
    "their",
    "or",
    "would",
    "there",
    "what",
    "out",
    "been",
    "we",
    "up",
    "when",
    "who",
    "will",
    "into",
    "more",
    "if",
    "no",
    "could",
    "them",
    "time",
    "some",
    "him",
    "very",
    "my",
    "over",
    "only",
    "than",
    "other",
    "like",
    "little",
    "about",
    "before",
    "then",
    "now",
    "upon",
    "after",
    "way",
    "where",
    "must",
    "great",
    "our",
    "down",
    "old",
    "first",
    "well",
    "those",
    "through",
    "again",
    "never",
    "long",
    "made",
    "should",
    "house",
    "night",
    "eyes",
    "door",
    "came",
    "face",
    "hand",
    "letter",
    "garden",
    "morning",
    "river",
    "mother",
    "father",
    "river",
    "window",
]


def novel(n_tokens: int, tokenizer_tokens_per_word: float = 1.3, seed: int = 0) -> str:
    """Paragraphs of 5 to 160 words (a few long, many short), about n_tokens tokens in all."""
    rng = random.Random(seed)
    paragraphs, words = [], 0
    while words * tokenizer_tokens_per_word < n_tokens:
        length = int(min(160, 5 + rng.expovariate(1 / 45)))
        sentence = " ".join(rng.choice(WORDS) for _ in range(length))
        paragraphs.append(sentence[0].upper() + sentence[1:] + ".")
        words += length
    return "\n\n".join(paragraphs)


def format1_rows(spec: EvalSet, tokenizer, concat: bool) -> list[np.ndarray]:
    """The rows format 1 scored: per paragraph [BOS] + ids cut at seq_len, or one BOS/EOS stream cut at seq_len."""
    scored = tokenize_set(spec, tokenizer)
    docs = [scored.token_id[scored.doc == d] for d in range(scored.n_documents)]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pieces = [np.concatenate([[bos], ids, [eos] if concat else []]) for ids in docs]
    if concat:
        stream = np.concatenate(pieces)
        return [stream[i : i + spec.seq_len] for i in range(0, len(stream), spec.seq_len)]
    return [ids[i : i + spec.seq_len] for ids in pieces for i in range(0, len(ids), spec.seq_len)]


def run_format1(model, rows: list[np.ndarray], seq_len: int, batch_tokens: int) -> dict:
    batch_size = max(1, batch_tokens // seq_len)
    computed = scored = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(rows), batch_size):
            batch = rows[b : b + batch_size]
            ids = np.full((len(batch), max(len(r) for r in batch)), PAD, dtype=np.int64)
            for i, row in enumerate(batch):
                ids[i, : len(row)] = row
            score = ids >= 0
            score[:, 0] = False
            token_scores(model, torch.from_numpy(ids), torch.from_numpy(score))
            computed += ids.size - len(batch)  # the model reads all but the last column
            scored += int(score.sum())
    seconds = time.perf_counter() - start
    real = sum(len(r) - 1 for r in rows)
    return dict(scored=scored, seconds=seconds, padding=1 - real / computed, reread=1 - scored / real)


def run_protocol(model, spec: EvalSet, tokenizer, batch_tokens: int) -> dict:
    scored = tokenize_set(spec, tokenizer)
    lengths = scored.lengths
    computed = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for rows in plan_batches(lengths, batch_tokens):
            ids, score, _ = _batch(scored, rows)
            token_scores(model, torch.from_numpy(ids), torch.from_numpy(score))
            computed += ids.shape[0] * (ids.shape[1] - 1)
    seconds = time.perf_counter() - start
    return dict(
        scored=scored.n_tokens,
        seconds=seconds,
        padding=1 - lengths.sum() / computed,
        reread=1 - scored.n_tokens / lengths.sum(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="opt-125m", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    args = parser.parse_args()

    text = novel(args.tokens)
    tokenizer = build_tokenizer(vocab_size=2000, text=text)
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(**SHAPES[args.shape])).eval()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, model {args.shape} "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, random init)"
    )
    L = args.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "novel.txt"
        path.write_text(text)
        paragraphs = EvalSet("main", (path,), seq_len=L, split="paragraph")
        whole = EvalSet("main", (path,), seq_len=L)
        n_tokens = tokenize_set(whole, tokenizer).n_tokens
        print(
            f"text: {n_tokens} tokens in {tokenize_set(paragraphs, tokenizer).n_documents} paragraphs; "
            f"seq_len {L}, batch_tokens {args.batch_tokens}"
        )
        runs = {
            "format 1 default (document)": run_format1(
                model, format1_rows(paragraphs, tokenizer, False), L, args.batch_tokens
            ),
            "format 1 concat": run_format1(model, format1_rows(paragraphs, tokenizer, True), L, args.batch_tokens),
            f"rolling, stride {L}": run_protocol(model, whole, tokenizer, args.batch_tokens),
            f"rolling, stride {L // 2}": run_protocol(
                model, EvalSet("main", (path,), seq_len=L, stride=L // 2), tokenizer, args.batch_tokens
            ),
            "packed (paragraphs)": run_protocol(
                model,
                EvalSet("main", (path,), seq_len=L, split="paragraph", context="packed"),
                tokenizer,
                args.batch_tokens,
            ),
        }
    concat = runs["format 1 concat"]["scored"] / runs["format 1 concat"]["seconds"]
    print(f"{'protocol':30s} {'scored':>7s} {'tok/s':>8s} {'vs concat':>9s} {'padding':>8s} {'re-read':>8s}")
    for name, r in runs.items():
        speed = r["scored"] / r["seconds"]
        print(
            f"{name:30s} {r['scored']:7d} {speed:8.0f} {speed / concat:9.2f} {100 * r['padding']:7.1f}% "
            f"{100 * r['reread']:7.1f}%"
        )


if __name__ == "__main__":
    main()
