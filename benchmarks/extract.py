"""Extraction throughput, memory and store size, measured side by side in one run.

    python benchmarks/extract.py [--shape opt-125m] [--tokens 8192] [--seq-len 512] [--dtypes float32,bfloat16]

For each dtype it prints tokens/s of
  - tokendyn's scoring loop (batched forward, linear layers packed for oneDNN on x86, chunked float32 head),
  - the naive loop most scripts use (one sequence at a time, `model(..., labels=)`),
  - the machine's bound: GEMM FLOP/s measured now / (2 x parameters) per token,
and their ratios. Then the peak memory of `tokendyn extract` (a subprocess) at two corpus sizes,
and store bytes per token-checkpoint for float32 and float16 stores. Models are random-init.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import OPTConfig, OPTForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tokendyn.models import onednn  # noqa: E402
from tokendyn.models.extract import token_scores  # noqa: E402

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
        vocab_size=512,
        max_position_embeddings=2048,
        word_embed_proj_dim=64,
    ),
}


def gemm_flops(dtype: torch.dtype, m: int, k: int, n: int, seconds: float = 3.0) -> float:
    """Sustained matmul FLOP/s at the model's typical shape (tokens x hidden @ hidden x ffn): the faster of
    torch's matmul and oneDNN's linear with a packed weight (what tokendyn runs on x86 CPUs)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    kernels = [lambda: torch.matmul(a, b)]
    if onednn.supported(dtype):
        linear = torch.nn.Linear(k, n, bias=False, dtype=dtype).requires_grad_(False)
        packed = onednn.PackedLinear(linear)
        kernels.append(lambda: packed(a))
    best = 0.0
    for kernel in kernels:
        kernel()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            kernel()
            count += 1
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - start))
    return best


def time_it(fn, repeats: int = 2) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def throughput(shape: str, dtype: torch.dtype, n_tokens: int, seq_len: int, batch_tokens: int) -> dict:
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(**SHAPES[shape])).to(dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(4, SHAPES[shape]["vocab_size"], (n_tokens // seq_len, seq_len))
    batch = max(1, batch_tokens // seq_len)

    score = torch.ones_like(ids, dtype=torch.bool)
    score[:, 0] = False

    packed = copy.deepcopy(model)
    onednn.pack_linear_layers(packed)  # as `tokendyn extract` loads a checkpoint

    def tokendyn_loop():
        with torch.inference_mode():
            for b in range(0, len(ids), batch):
                token_scores(packed, ids[b : b + batch], score[b : b + batch])

    def naive_loop():
        with torch.no_grad():
            for row in ids:
                model(input_ids=row[None], labels=row[None]).loss.item()

    ours = n_tokens / time_it(tokendyn_loop)
    naive = n_tokens / time_it(naive_loop, repeats=1)
    hidden, ffn = SHAPES[shape]["hidden_size"], SHAPES[shape]["ffn_dim"]
    bound = gemm_flops(dtype, batch_tokens, hidden, ffn) / (2 * n_params)
    return dict(params=n_params, ours=ours, naive=naive, bound=bound)


def peak_rss_mib(n_docs: int, seq_len: int) -> float:
    """Peak resident memory of a `tokendyn extract` subprocess on a tiny suite with `n_docs` documents."""
    from conftest import SAMPLE_TEXT, write_suite

    with tempfile.TemporaryDirectory() as tmp:
        text = "\n\n".join([SAMPLE_TEXT.replace("\n", " ")] * n_docs)
        suite = write_suite(Path(tmp), families=("opt",), steps=(0,), seq_len=seq_len, text=text)
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would report this process's peak.
        code = (
            "import sys; from tokendyn.cli import main; main(sys.argv[1:]); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, "extract", str(suite), "--out", f"{tmp}/s.zarr", "--no-progress"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(out.strip().splitlines()[-1]) / 1024


def store_bytes_per_value(store_dtype: str) -> float:
    """On-disk bytes of `loss` per scored token and checkpoint, on text of random words (no repeats to compress)."""
    import random

    from conftest import SAMPLE_TEXT, write_suite
    from tokendyn.models.extract import extract

    with tempfile.TemporaryDirectory() as tmp:
        words = SAMPLE_TEXT.split()
        rng = random.Random(0)
        text = "\n\n".join(" ".join(rng.choices(words, k=60)) for _ in range(200))
        suite = write_suite(Path(tmp), families=("opt",), steps=(0, 1, 2), seq_len=64, text=text)
        out = extract(suite, Path(tmp) / "s.zarr", store_dtype=store_dtype, progress=False)
        import tokendyn

        ds = tokendyn.open_store(out)
        values = ds.sizes["token"] * ds.sizes["ckpt"]
        size = sum(f.stat().st_size for f in (out / "loss").rglob("*") if f.is_file())
        return size / values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="opt-125m", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()

    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability {capability}")
    for shape in dict.fromkeys([args.shape, "tiny"]):
        for name in args.dtypes.split(","):
            r = throughput(shape, getattr(torch, name), args.tokens, args.seq_len, args.batch_tokens)
            print(
                f"{shape:9s} {name:8s} params {r['params'] / 1e6:6.1f}M  tokendyn {r['ours']:9.0f} tok/s  "
                f"naive {r['naive']:9.0f} tok/s  bound {r['bound']:9.0f} tok/s  "
                f"tokendyn/naive {r['ours'] / r['naive']:5.2f}  tokendyn/bound {r['ours'] / r['bound']:5.2f}"
            )
    small, large = peak_rss_mib(20, 64), peak_rss_mib(400, 64)
    print(
        f"peak memory of tokendyn extract (tiny model): 20 docs {small:.0f} MiB, 400 docs {large:.0f} MiB "
        f"(ratio {large / small:.2f})"
    )
    for store_dtype in ("float32", "float16"):
        print(f"store bytes per token-checkpoint ({store_dtype}, loss only): {store_bytes_per_value(store_dtype):.2f}")


if __name__ == "__main__":
    main()
