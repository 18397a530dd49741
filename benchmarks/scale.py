"""Scale: prefetch hides downloads, workers add throughput, and what a Pythia suite costs.

    .venv/bin/python benchmarks/scale.py [--checkpoints 20] [--tokens 3000]

(a) A suite of 20 hub checkpoints whose "downloads" are a throttled copy from local folders into a
    Hugging Face cache (bandwidth set so one download takes ~70% of one checkpoint's compute):
    wall time over pure compute (every revision already cached), without and with --prefetch 1.
    Goal: <= 1.05 with prefetch.
(b) Throughput (tokens/s) of a LocalCluster of 1 and of 2 worker processes on the same local suite,
    cluster start-up included and excluded.
(c) Projection for Pythia (10 sizes x 154 revisions, 10M tokens): FLOPs, GPU-hours on A100s at the
    utilisation measured in (a) (model FLOP/s over this CPU's measured float32 GEMM FLOP/s), store
    bytes and chunk files, weights downloaded.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import huggingface_hub  # noqa: E402
import torch  # noqa: E402
from huggingface_hub import constants as hub_constants  # noqa: E402
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import SAMPLE_TEXT, build_tokenizer  # noqa: E402
from tokendyn import store  # noqa: E402
from tokendyn.config.suite import PYTHIA_STEPS  # noqa: E402
from tokendyn.models.extract import extract  # noqa: E402

# Total parameters of the Pythia sizes (from the released configs).
PYTHIA_PARAMS = {
    "14m": 14_067_712,
    "31m": 30_494_720,
    "70m": 70_426_624,
    "160m": 162_322_944,
    "410m": 405_334_016,
    "1b": 1_011_781_632,
    "1.4b": 1_414_647_808,
    "2.8b": 2_775_208_960,
    "6.9b": 6_857_302_016,
    "12b": 11_846_072_320,
}
A100_BF16_FLOPS = 312e12
PYTHIA_TOKENS = 10_000_000
REPO = "bench/run"


class ThrottledHub:
    """snapshot_download stand-in: copies a local folder's allowed files into the cache at `rate` bytes/s."""

    def __init__(self, cache: Path, remote: dict[str, Path], rate: float) -> None:
        self.cache, self.remote, self.rate = cache, remote, rate

    def __call__(self, repo_id, revision=None, allow_patterns=None, **_):
        repo = self.cache / ("models--" + repo_id.replace("/", "--"))
        commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        snapshot = repo / "snapshots" / commit
        for sub in (snapshot, repo / "blobs", repo / "refs"):
            sub.mkdir(parents=True, exist_ok=True)
        if not (repo / "refs" / revision).is_file():
            (repo / "refs" / revision).write_text(commit)
        for file in sorted(self.remote[revision].iterdir()):
            if (snapshot / file.name).exists() or not any(fnmatch.fnmatch(file.name, p) for p in allow_patterns):
                continue
            start, data = time.perf_counter(), file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            if not blob.exists():  # blobs are shared by content, as in the real cache
                blob.write_bytes(data)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
            time.sleep(max(0.0, len(data) / self.rate - (time.perf_counter() - start)))
        return str(snapshot)


def make_checkpoints(folder: Path, n: int) -> dict[str, Path]:
    tokenizer = build_tokenizer()
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=256,
    )
    remote = {}
    for k in range(n):
        torch.manual_seed(k)
        remote[f"step{k * 100}"] = folder / f"step{k * 100}"
        GPTNeoXForCausalLM(config).save_pretrained(remote[f"step{k * 100}"])
        tokenizer.save_pretrained(remote[f"step{k * 100}"])
    return remote


def write_suite(folder: Path, revisions: list[str], tokens: int, hub: bool) -> Path:
    words = SAMPLE_TEXT.split()
    text = " ".join(words[i % len(words)] for i in range(tokens // 2))
    (folder / "valid.txt").write_text(text)
    if hub:
        model = f'hub_id = "{REPO}"\nrevisions = [{", ".join(repr(r).replace(chr(39), chr(34)) for r in revisions)}]'
    else:
        ckpts = ", ".join(f'{{ step = {r[4:]}, path = "remote/{r}" }}' for r in revisions)
        model = f"checkpoints = [{ckpts}]"
    suite = folder / ("hub.toml" if hub else "local.toml")
    suite.write_text(f'[eval]\nfiles = ["valid.txt"]\nseq_len = 256\n\n[[models]]\nname = "m"\n{model}\n')
    return suite


def timed_extract(suite: Path, out: Path, **kwargs) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    extract(suite, out, progress=False, **kwargs)
    seconds = time.perf_counter() - start
    ds = store.open_store(out)
    tokens = int((ds.token_id[:, 1:] != -1).sum()) * int(ds.done.sum())
    return seconds, tokens


def gemm_flops() -> float:
    a = torch.randn(1024, 1024)
    a @ a
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ a
    return 2 * 1024**3 * reps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=3000, help="tokens of evaluation text")
    args = parser.parse_args()
    print(
        f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        remote = make_checkpoints(tmp / "remote", args.checkpoints)
        revisions = list(remote)
        hub_suite = write_suite(tmp, revisions, args.tokens, hub=True)
        local_suite = write_suite(tmp, revisions, args.tokens, hub=False)
        ckpt_bytes = sum(f.stat().st_size for f in remote[revisions[0]].iterdir())

        # (a) pure compute: every revision cached; then throttled downloads without and with prefetch
        cache = tmp / "hf" / "hub"
        hub_constants.HF_HUB_CACHE = str(cache)
        hub_constants.HF_HUB_OFFLINE = True
        huggingface_hub.snapshot_download = ThrottledHub(cache, remote, rate=math.inf)
        timed_extract(hub_suite, tmp / "warm.zarr")  # fills the cache, warms imports
        pure, tokens = timed_extract(hub_suite, tmp / "pure.zarr")
        rate = ckpt_bytes / (0.7 * pure / len(revisions))
        print(
            f"(a) {len(revisions)} checkpoints of {ckpt_bytes / 1e6:.1f} MB, {tokens // len(revisions):,} tokens "
            f"each; pure compute {pure:.2f} s; throttled download {ckpt_bytes / rate:.2f} s per checkpoint"
        )
        ratios = {}
        for prefetch in (0, 1):
            shutil.rmtree(cache)
            huggingface_hub.snapshot_download = ThrottledHub(cache, remote, rate=rate)
            seconds, _ = timed_extract(hub_suite, tmp / "run.zarr", prefetch=prefetch)
            ratios[prefetch] = seconds / pure
            print(f"    --prefetch {prefetch}: {seconds:.2f} s, wall / pure compute = {ratios[prefetch]:.3f}")
        n_params = sum(p.numel() for p in GPTNeoXForCausalLM.from_pretrained(remote[revisions[0]]).parameters())
        model_flops = 2 * n_params * tokens / pure
        peak = gemm_flops()
        utilisation = model_flops / peak
        print(
            f"    model FLOP/s {model_flops / 1e9:.1f} G over GEMM FLOP/s {peak / 1e9:.1f} G: "
            f"utilisation {utilisation:.1%}"
        )

        # (b) 1 vs 2 workers of a LocalCluster on the local suite
        for workers in (1, 2):
            seconds, tokens = timed_extract(local_suite, tmp / f"w{workers}.zarr", workers=workers)
            print(f"(b) --workers {workers}: {seconds:.2f} s wall incl. cluster start, {tokens / seconds:,.0f} tok/s")

    # (c) Pythia projection
    n_rev, total_params = len(PYTHIA_STEPS), sum(PYTHIA_PARAMS.values())
    flops = 2 * total_params * PYTHIA_TOKENS * n_rev
    chunks = math.ceil(PYTHIA_TOKENS / store.CHUNK_VALUES)
    n_ckpts = n_rev * len(PYTHIA_PARAMS)
    print(
        f"(c) Pythia, {len(PYTHIA_PARAMS)} sizes x {n_rev} revisions, {PYTHIA_TOKENS:,} tokens: "
        f"{flops:.2e} FLOPs (forward, 2 x params x tokens)"
    )
    for label, fraction in (("measured here", utilisation), ("40% (a well-fed A100)", 0.40)):
        print(
            f"    GPU-hours on A100 (312 TFLOP/s bf16) at {label} utilisation {fraction:.1%}: "
            f"{flops / (A100_BF16_FLOPS * fraction) / 3600:,.0f}"
        )
    for dtype, size in (("float32", 4), ("float16", 2)):
        print(
            f"    store per metric ({dtype}): {PYTHIA_TOKENS * n_ckpts * size / 1e9:,.0f} GB in "
            f"{chunks * n_ckpts:,} chunk files ({chunks} per checkpoint)"
        )
    print(
        f"    weights downloaded (float16): {2 * total_params * n_rev / 1e12:.1f} TB in all; "
        f"largest revision {2 * PYTHIA_PARAMS['12b'] / 1e9:.0f} GB (with --evict the cache holds ~K+1 revisions)"
    )


if __name__ == "__main__":
    main()
