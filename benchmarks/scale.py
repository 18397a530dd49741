"""Scale: prefetch hides downloads, workers add throughput, and what a Pythia suite costs.

    .venv/bin/python benchmarks/scale.py            # the full run: <= 8 min on an idle 2-core machine
    .venv/bin/python benchmarks/scale.py --checkpoints 6 --tokens 2000 --layers 2   # a quick check

(a) A suite of 20 hub checkpoints whose "downloads" are a throttled copy from local folders into a
    Hugging Face cache (a file copy, then a sleep up to the set bandwidth: it holds neither the GIL
    nor a core; the bandwidth makes one download take 70% of one checkpoint's compute). Wall time
    over pure compute (every revision already cached), without and with --prefetch 1; goal: <= 1.05
    with prefetch (the first download cannot overlap anything: 1 + 0.7 / 20 = 1.035 at best).
    Pure compute is timed before and after the throttled runs (prefetch 1 first, then 0) and their
    mean is the reference: a machine's speed drifts over the minutes this takes (clock boost, other
    load), and a reference timed only before the throttled runs counted that drift as download
    overhead. Both pure timings are printed, so the drift is visible.
(b) Throughput (scored tokens/s) of a LocalCluster of 1 and of 2 worker processes (one torch thread
    each, as dask starts them) on the same suite as local folders, cluster start-up timed apart.
(c) Projection for Pythia (the 8 sizes 70M-12B x 154 revisions, 10M tokens): FLOPs, A100-hours at
    the utilisation measured in (a) (model FLOP/s over this CPU's float32 GEMM FLOP/s) and at an
    assumed 40%, store bytes (from the bytes per token measured in (a)), chunk files, weights to
    download.
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

# Total parameters of the 8 Pythia sizes of the paper (from the released configs).
PYTHIA_PARAMS = {
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
ASSUMED_UTILISATION = 0.40  # a well-fed A100 on a forward pass of a large model
PYTHIA_TOKENS = 10_000_000
PYTHIA_WEIGHT_BYTES = 2  # the revisions are published in float16
DOWNLOAD_SHARE = 0.7  # one throttled download takes this share of one checkpoint's compute
REPO = "bench/run"


class ThrottledHub:
    """snapshot_download stand-in: copies a local folder's allowed files into the cache at `rate` bytes/s.

    The copy itself is a kernel copy (shutil.copyfile); the rest of each file's time is a sleep, so a
    download in a background thread takes no core from the scoring.
    """

    def __init__(self, cache: Path, remote: dict[str, Path], sha256: dict[Path, str], rate: float) -> None:
        self.cache, self.remote, self.sha256, self.rate = cache, remote, sha256, rate

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
            start = time.perf_counter()
            blob = repo / "blobs" / self.sha256[file]  # named by content, as in the real cache
            if not blob.exists():
                shutil.copyfile(file, blob)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
            time.sleep(max(0.0, file.stat().st_size / self.rate - (time.perf_counter() - start)))
        return str(snapshot)


def make_checkpoints(folder: Path, n: int, hidden: int, layers: int) -> dict[str, Path]:
    tokenizer = build_tokenizer()
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
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
    (folder / "valid.txt").write_text(" ".join(words[i % len(words)] for i in range(tokens // 2)))
    if hub:
        model = f'hub_id = "{REPO}"\nrevisions = [{", ".join(f"{chr(34)}{r}{chr(34)}" for r in revisions)}]'
    else:
        ckpts = ", ".join(f'{{ step = {r[4:]}, path = "remote/{r}" }}' for r in revisions)
        model = f"checkpoints = [{ckpts}]"
    suite = folder / ("hub.toml" if hub else "local.toml")
    suite.write_text(f'[eval]\nfiles = ["valid.txt"]\nseq_len = 256\n\n[[models]]\nname = "m"\n{model}\n')
    return suite


def timed_extract(suite: Path, out: Path, **kwargs) -> dict:
    """Wall and CPU seconds of one extraction into a new store, and the tokens it scored."""
    shutil.rmtree(out, ignore_errors=True)
    wall, cpu = time.perf_counter(), time.process_time()
    extract(suite, out, progress=False, **kwargs)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    ds = store.open_store(out)
    return {"wall": wall, "cpu": cpu, "tokens": ds.sizes["token"] * int(ds.done.sum())}


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def gemm_flops() -> float:
    """float32 matmul FLOP/s of this CPU with the configured threads (the peak the utilisation is relative to)."""
    a = torch.randn(1024, 1024)
    a @ a
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ a
    return 2 * 1024**3 * reps / (time.perf_counter() - start)


def prefetch_overlap(tmp: Path, remote: dict[str, Path], hub_suite: Path) -> dict:
    """(a): pure compute, then throttled downloads without and with --prefetch 1."""
    sha256 = {f: hashlib.sha256(f.read_bytes()).hexdigest() for folder in remote.values() for f in folder.iterdir()}
    cache = tmp / "hf" / "hub"
    hub_constants.HF_HUB_CACHE = str(cache)
    hub_constants.HF_HUB_OFFLINE = True
    huggingface_hub.snapshot_download = ThrottledHub(cache, remote, sha256, rate=math.inf)
    timed_extract(hub_suite, tmp / "warm.zarr")  # fills the cache, warms imports and the allocator
    pure = timed_extract(hub_suite, tmp / "pure.zarr", prefetch=0)
    n = len(remote)
    ckpt_bytes = sum(f.stat().st_size for f in next(iter(remote.values())).iterdir())
    rate = ckpt_bytes / (DOWNLOAD_SHARE * pure["wall"] / n)
    print(
        f"(a) {n} checkpoints of {ckpt_bytes / 1e6:.1f} MB, {pure['tokens'] // n:,} tokens each; pure compute "
        f"{pure['wall']:.2f} s wall, {pure['cpu']:.2f} s CPU; throttled download {ckpt_bytes / rate:.2f} s each"
    )
    runs = {}
    for prefetch in (1, 0):
        shutil.rmtree(cache)
        huggingface_hub.snapshot_download = ThrottledHub(cache, remote, sha256, rate=rate)
        runs[prefetch] = timed_extract(hub_suite, tmp / "run.zarr", prefetch=prefetch)
    after = timed_extract(hub_suite, tmp / "pure.zarr", prefetch=0)
    reference = (pure["wall"] + after["wall"]) / 2
    print(
        f"    pure compute again after the throttled runs: {after['wall']:.2f} s wall, {after['cpu']:.2f} s CPU; "
        f"reference: their mean, {reference:.2f} s"
    )
    for prefetch in (0, 1):
        print(
            f"    --prefetch {prefetch}: {runs[prefetch]['wall']:.2f} s wall, {runs[prefetch]['cpu']:.2f} s CPU; "
            f"wall / pure compute = {runs[prefetch]['wall'] / reference:.3f}" + ("  (goal <= 1.05)" if prefetch else "")
        )
    return {"pure": pure, "store": tmp / "pure.zarr"}


def workers_throughput(local_suite: Path, tmp: Path) -> None:
    """(b): scored tokens/s of a LocalCluster of 1 and 2 worker processes."""
    from distributed import Client

    from tokendyn.models.distributed import local_cluster

    rates = {}
    for workers in (1, 2):
        start = time.perf_counter()
        with local_cluster(workers) as cluster, Client(cluster) as client:
            client.run(lambda: __import__("tokendyn.models.extract"))  # imports torch and transformers
            started = time.perf_counter() - start
            run = timed_extract(local_suite, tmp / f"w{workers}.zarr", scheduler=cluster.scheduler_address)
        rates[workers] = run["tokens"] / run["wall"]
        print(
            f"(b) {workers} worker(s): {run['wall']:.2f} s wall ({started:.1f} s cluster start-up apart), "
            f"{rates[workers]:,.0f} tokens/s"
        )
    print(f"    2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")


def pythia_projection(utilisation: float, store_path: Path, n_tokens: int, n_ckpts: int) -> None:
    """(c): the cost of scoring Pythia, from the measured utilisation and the measured store bytes per token."""
    metric_bytes = du(store_path / "loss") / (n_tokens * n_ckpts)  # per scored token and checkpoint
    fixed_bytes = (du(store_path) - du(store_path / "loss")) / n_tokens  # token coordinates, metadata
    n_rev, n_sizes, params = len(PYTHIA_STEPS), len(PYTHIA_PARAMS), sum(PYTHIA_PARAMS.values())
    flops = 2 * params * PYTHIA_TOKENS * n_rev
    chunks = math.ceil(PYTHIA_TOKENS / store.token_chunk(PYTHIA_TOKENS)) * n_rev * n_sizes
    print(
        f"(c) Pythia, {n_sizes} sizes ({params / 1e9:.1f}e9 parameters) x {n_rev} revisions, {PYTHIA_TOKENS:,} "
        f"tokens: {flops:.2e} forward FLOPs (2 x params x tokens)"
    )
    for label, fraction in (("measured here", utilisation), ("assumed", ASSUMED_UTILISATION)):
        print(
            f"    A100-hours (312 TFLOP/s bf16) at the {label} utilisation {fraction:.1%}: "
            f"{flops / (A100_BF16_FLOPS * fraction) / 3600:,.0f}"
        )
    store_bytes = PYTHIA_TOKENS * (metric_bytes * n_rev * n_sizes + fixed_bytes)
    print(
        f"    store, loss only: {store_bytes / 1e9:,.1f} GB (measured {metric_bytes:.2f} bytes per token and "
        f"checkpoint, {fixed_bytes:.1f} per token for its coordinates), {chunks:,} chunk files"
    )
    print(
        f"    weights to download (float16 safetensors): {PYTHIA_WEIGHT_BYTES * params * n_rev / 1e12:.1f} TB; "
        f"one 12B revision {PYTHIA_WEIGHT_BYTES * PYTHIA_PARAMS['12b'] / 1e9:.0f} GB "
        "(with --evict --prefetch 1 the cache holds about two revisions per worker)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=4000, help="tokens of evaluation text (default: 4000)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the test model (default: 256)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the test model (default: 4)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--skip-workers", action="store_true", help="leave out (b)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        remote = make_checkpoints(tmp / "remote", args.checkpoints, args.hidden, args.layers)
        revisions = list(remote)
        hub_suite = write_suite(tmp, revisions, args.tokens, hub=True)
        local_suite = write_suite(tmp, revisions, args.tokens, hub=False)
        measured = prefetch_overlap(tmp, remote, hub_suite)
        pure = measured["pure"]
        n_params = sum(p.numel() for p in GPTNeoXForCausalLM.from_pretrained(remote[revisions[0]]).parameters())
        model_flops, peak = 2 * n_params * pure["tokens"] / pure["wall"], gemm_flops()
        print(
            f"    model FLOP/s {model_flops / 1e9:.2f} G (loading included) over GEMM FLOP/s {peak / 1e9:.1f} G: "
            f"utilisation {model_flops / peak:.1%}"
        )
        if not args.skip_workers:
            workers_throughput(local_suite, tmp)
        tokens = pure["tokens"] // len(revisions)
        pythia_projection(model_flops / peak, measured["store"], tokens, len(revisions))


if __name__ == "__main__":
    main()
