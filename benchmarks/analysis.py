"""Analysis at suite scale, measured side by side in one run.

    python benchmarks/analysis.py [--tokens 1000000] [--ckpts 50] [--models 3] [--large] [--no-analyze]
                                  [--per-study] [--no-studies]

Builds once (then reuses, under cache/bench/) float16 format-2 stores of synthetic per-token loss
curves (sigmoid falls in log step of every width and midpoint, flat and rising tokens, noise) in
the chunks `tokendyn extract` writes, at --tokens and at twice that. Then prints wall and CPU
seconds (CPU seconds are what to compare on a shared machine) and peak memory of:
  - reading the loss once (decompressed to float32 and summed): every ratio is relative to it,
  - the age-of-acquisition kernel now and before issue 15 (logit-line start, 10 steps), per token,
  - every study as `tokendyn analyze` runs it (run, then write its results), in one process,
  - `tokendyn analyze` end to end in a child process at both sizes, each with its own peak memory,
    and what the second size added per (token, model); then the same with glibc's own malloc
    thresholds (before `tokendyn.memory` fixed them). Both sizes span several of the analyses'
    chunks (whole checkpoints x about 0.5M tokens at 50 checkpoints), so the working memory is the
    same in both and the difference is the per-token results held until written (a few bytes per
    token and model), not the loss (100 bytes per token and model at 50 float16 checkpoints).
--per-study adds every study alone (`tokendyn analyze --studies NAME`, child processes) at both sizes:
its peak memory at each and what the larger size added per (token, model). --no-studies skips
timing the studies in this process.
Target: analyze <= 30 s wall at 1,000,000 tokens x 50 checkpoints x 3 models on 2 idle cores.

--large adds Pythia's shape out of core: 10,000,000 tokens x 154 checkpoints x 1 model in float16
(3.1 GB, built once): its build time, reading it once, and its trend categories at 4 starts.
The load average is printed before and after: on a shared machine wall times are upper bounds.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import torch
import xarray as xr
import zarr
from threadpoolctl import threadpool_limits
from tqdm import tqdm

import tokendyn
from tokendyn.analysis import curves
from tokendyn.analysis.labels import label_share
from tokendyn.analysis.trajectories import over_token_slices
from tokendyn.analysis.trends import STARTS
from tokendyn.pipelines.analyze import run_studies, write_results
from tokendyn.store.layout import FORMAT_VERSION, token_chunk
from tokendyn.studies import STUDIES

CHANCE = float(np.log(50_000))  # ln(vocabulary size): the store's vocabulary has Pythia's size, 50k
DOC_TOKENS = 2048  # tokens per synthetic document (doc and offset coordinates)


class Curves:
    """Synthetic per-token loss curves against log10 step x: 70% fall along a sigmoid from chance to a
    floor (every width and midpoint; larger models earlier), 20% flat, 10% rising; noise per checkpoint.

    Token parameters are drawn once per model (float32, a few arrays of n_tokens); each checkpoint
    then costs a few vectorised passes, so a 10M-token x 154-checkpoint store builds in about a minute.
    """

    def __init__(self, n_tokens: int, model: int, x_range: tuple[float, float]):
        rng = np.random.default_rng(model)
        self.kind = rng.choice(np.arange(3, dtype=np.int8), size=n_tokens, p=[0.7, 0.2, 0.1])
        self.lo = rng.uniform(0.5, 6, n_tokens).astype(np.float32)
        self.k = rng.uniform(1, 20, n_tokens).astype(np.float32)
        self.mid = (rng.uniform(*x_range, n_tokens) - 0.3 * model).astype(np.float32)
        self.x_range = x_range
        self.noise = rng.normal(0, 0.1, n_tokens + 4099).astype(np.float32)  # shifted per checkpoint: cheap noise

    def at(self, x: float, ckpt: int) -> np.ndarray:
        t = self.k * (np.float32(x) - self.mid)
        np.clip(t, -50, 50, out=t)
        np.exp(t, out=t)
        t += 1
        falling = self.lo + (CHANCE - self.lo) / t
        rising = self.lo + np.float32((x - self.x_range[0]) / (self.x_range[1] - self.x_range[0]))
        loss = np.where(self.kind == 0, falling, np.where(self.kind == 1, self.lo + 2, rising))
        shift = (ckpt * 1031) % 4099
        loss += self.noise[shift : shift + len(loss)]
        return loss.astype(np.float16)


def build_store(path: Path, n_tokens: int, n_ckpts: int, n_models: int) -> None:
    """A float16 format-2 store of synthetic curves with Pythia's log-spaced steps, written checkpoint
    by checkpoint straight into Zarr in the chunks `tokendyn extract` writes (1, 1, 2**18 tokens)."""
    steps = np.geomspace(1000, 143_000, n_ckpts)
    x = np.log10(steps)
    x_range = (float(x[len(x) // 4]), float(x[-3]))
    chunk = token_chunk(n_tokens)
    token = np.arange(n_tokens)
    ds = xr.Dataset(
        {
            "loss": (
                ("model", "ckpt", "token"),
                da.zeros((n_models, n_ckpts, n_tokens), dtype=np.float16, chunks=(1, 1, chunk)),
            ),
            "done": (("model", "ckpt"), np.ones((n_models, n_ckpts), bool)),
        },
        coords={
            "model": [f"m{i}" for i in range(n_models)],
            "ckpt": np.arange(n_ckpts),
            "step": (("model", "ckpt"), np.tile(steps, (n_models, 1))),
            "tokens_seen": (("model", "ckpt"), np.tile(steps * 2**21, (n_models, 1))),
            "val_ppl": (("model", "ckpt"), np.ones((n_models, n_ckpts))),
            "n_params": ("model", 1e7 * 10.0 ** np.arange(n_models)),
            "token_id": ("token", np.random.default_rng(0).integers(0, 50_000, n_tokens)),
            "doc": ("token", token // DOC_TOKENS),
            "offset": ("token", token % DOC_TOKENS),
            "n_context": ("token", token % DOC_TOKENS),
            "vocab_text": ("vocab", np.array([f"t{i}" for i in range(50_000)], dtype=object)),
        },
        attrs={"tokendyn_version": tokendyn.__version__, "format_version": FORMAT_VERSION},
    )
    encoding = {"loss": {"chunks": (1, 1, chunk)}, **{n: {"chunks": (chunk,)} for n in ("token_id", "doc", "offset")}}
    print(f"building {path} ({ds['loss'].nbytes / 1e9:.2f} GB of float16 loss) ...", flush=True)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    ds.to_zarr(partial, mode="w", compute=False, encoding=encoding, consolidated=False)
    loss = zarr.open_array(partial / "loss", mode="r+")
    val_ppl = np.empty((n_models, n_ckpts))
    for m in range(n_models):
        curves = Curves(n_tokens, m, x_range)
        for c in tqdm(range(n_ckpts), desc=f"model {m}", unit="ckpt", leave=False):
            row = curves.at(x[c], c)
            loss[m, c] = row
            val_ppl[m, c] = np.exp(row.mean(dtype=np.float64))
    zarr.open_group(partial, mode="r+")["val_ppl"][...] = val_ppl
    zarr.consolidate_metadata(partial)
    partial.rename(path)


def peak_gb() -> float:
    """Peak resident memory of this process so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(label: str, fn, reference: float | None = None) -> float:
    """Run fn; print wall and CPU seconds (and CPU seconds over `reference`'s) and the peak so far."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    ratio = f"  {cpu / reference:6.1f} x the read" if reference else " " * 21
    print(f"{label:<52} {wall:8.2f} s wall {cpu:8.2f} s cpu{ratio}   peak {peak_gb():.2f} GB", flush=True)
    return wall


def aoa_kernels(ds: xr.Dataset, n_sample: int = 16_384) -> tuple[float, float]:
    """CPU microseconds per token of the age-of-acquisition kernel now and before, one thread, same tokens."""
    loss = ds["loss"].isel(model=0, token=slice(0, n_sample)).values
    x = np.log10(ds["step"].values[0])
    with threadpool_limits(limits=1, user_api="blas"):  # one thread, as inside `tokendyn analyze`
        return _aoa_kernels(loss, x, n_sample)


def _aoa_kernels(loss: np.ndarray, x: np.ndarray, n_sample: int) -> tuple[float, float]:
    sys.path.insert(0, str(Path(__file__).parent))
    from aoa_before import sigmoid_midpoint_before  # the kernel as it was, kept for this comparison

    curves._sigmoid_midpoint(np.ascontiguousarray(loss[:, :64]), x, CHANCE, n_iter=3)  # compile or load: untimed
    start = time.process_time()
    over_token_slices(curves._sigmoid_midpoint, loss.T, curves.AOA_SLICE_TOKENS, x=x, chance=CHANCE, n_iter=3)
    now = time.process_time() - start
    start = time.process_time()
    over_token_slices(sigmoid_midpoint_before, loss.T.astype(np.float64), 8192, x=x, chance=CHANCE, n_iter=10)
    before = time.process_time() - start
    return 1e6 * now / n_sample, 1e6 * before / n_sample


def per_study(ds: xr.Dataset, folder: Path, reference: float) -> list[str]:
    """Each study as `tokendyn analyze` runs it (`run_studies`: results several studies use are
    computed once, by the first), then writing its tables and labels, timed; return those that ran."""
    total_wall = total_cpu = 0.0
    ran = []
    studies = run_studies(ds, list(STUDIES), progress=False)
    while True:
        wall, cpu = time.perf_counter(), time.process_time()
        outcome = next(studies, None)
        if outcome is None:
            break
        if outcome.result is not None:
            write_results(outcome.result, folder)
            ran.append(outcome.name)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        total_wall, total_cpu = total_wall + wall, total_cpu + cpu
        note = f"   skipped ({outcome.skipped[:50]})" if outcome.skipped else f"   peak {peak_gb():.2f} GB"
        label = f"{'  study ' + outcome.name:<52} {wall:8.2f} s wall {cpu:8.2f} s cpu"
        print(f"{label}  {cpu / reference:6.1f} x the read{note}", flush=True)
    ratio = total_cpu / reference
    print(f"{'  all studies':<52} {total_wall:8.2f} s wall {total_cpu:8.2f} s cpu  {ratio:6.1f} x the read")
    return ran


# `tokendyn` with glibc's own malloc thresholds: the CLI with `tokendyn.memory.use` doing nothing.
GLIBC_DEFAULTS = (
    "import sys, tokendyn.memory, tokendyn.cli; tokendyn.memory.use = lambda _: False; sys.exit(tokendyn.cli.main())"
)


def run_analyze(store: Path, out: Path, label: str, studies: str | None = None, glibc_defaults: bool = False) -> float:
    """`tokendyn analyze` (only `studies`, comma-separated, if given) in a child process: print its
    wall and CPU seconds and return its own peak memory (GB). glibc_defaults: leave glibc's malloc
    thresholds as they are (what `tokendyn analyze` did before it fixed them).

    The child runs under /usr/bin/time: a child forked straight from this (large) process would
    report this process's resident memory at the fork as its own peak.
    """
    timing = out.with_name(out.name + ".time")
    tokendyn_cli = (
        [sys.executable, "-c", GLIBC_DEFAULTS] if glibc_defaults else [str(Path(sys.executable).with_name("tokendyn"))]
    )
    command = ["/usr/bin/time", "-f", "%M %U %S", "-o", str(timing), *tokendyn_cli, "analyze", str(store)]
    command += ["--out", str(out), "--quiet"] + (["--studies", studies] if studies else [])
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    peak_kb, user, system = (float(v) for v in timing.read_text().split()[-3:])
    ok = "ok" if done.returncode == 0 else f"FAILED: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    cpu, peak = user + system, peak_kb / 2**20
    print(f"{label:<52} {wall:8.2f} s wall {cpu:8.2f} s cpu   peak {peak:.2f} GB   {ok}", flush=True)
    return peak


def added_bytes(peaks: dict[int, float], n_models: int) -> float:
    """Peak memory the larger size added per (token, model), in bytes, from {n_tokens: peak GB}."""
    (small, low), (large, high) = sorted(peaks.items())
    return (high - low) * 2**30 / ((large - small) * n_models)


def study_growth(stores: dict[int, Path], scratch: Path, n_models: int, names: list[str]) -> None:
    """Each study alone (`tokendyn analyze --studies NAME`) at both sizes, one after the other in
    child processes: its peak memory at each and what the larger size added per (token, model)."""
    for name in names:
        peaks = {
            n: run_analyze(store, scratch / f"{name}-{n}", f"  --studies {name}, {n:,} tokens", name)
            for n, store in stores.items()
        }
        print(f"{'    peak added per (token, model)':<52} {added_bytes(peaks, n_models):8.1f} bytes", flush=True)


def read_once(ds: xr.Dataset) -> float:
    """CPU seconds of reading the loss once (decompress and convert to float32: every analysis does that)."""
    start = time.process_time()
    timed("read the loss once (float32 sum)", lambda: ds["loss"].astype(np.float32).sum().compute())
    return time.process_time() - start


def bench_large(root: Path) -> None:
    """Pythia's shape out of core: 10M tokens x 154 checkpoints x 1 model, float16 (built once)."""
    large = root / "analysis-10000000-154-1-f16.zarr"
    if not large.is_dir():
        started = time.perf_counter()
        build_store(large, 10_000_000, 154, 1)
        print(f"{'  built in':<52} {time.perf_counter() - started:8.2f} s wall")
    ds = tokendyn.open_store(large)
    print(f"store {large.name}: {dict(ds['loss'].sizes)}, {ds['loss'].nbytes / 1e9:.2f} GB {ds['loss'].dtype}")
    read = read_once(ds)
    trends = f"trend categories, {len(STARTS)} starts, + shares (out of core)"
    timed(trends, lambda: label_share(ds.tokendyn.trend_categories(STARTS)), read)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--ckpts", type=int, default=50)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--large", action="store_true", help="also 10M tokens x 154 checkpoints x 1 model out of core")
    parser.add_argument("--no-analyze", action="store_true", help="skip the end-to-end `tokendyn analyze` runs")
    parser.add_argument(
        "--per-study", action="store_true", help="also each study alone at both sizes: its peak memory growth"
    )
    parser.add_argument("--no-studies", action="store_true", help="skip timing every study in this process")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    root = Path(__file__).resolve().parents[1] / "cache" / "bench"
    print(
        f"{os.cpu_count()} cores, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"load average before {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    stores = {}
    for n_tokens in (args.tokens, 2 * args.tokens):  # does peak memory grow with tokens?
        stores[n_tokens] = root / f"analysis-{n_tokens}-{args.ckpts}-{args.models}-f16.zarr"
        if not stores[n_tokens].is_dir():
            stores[n_tokens].parent.mkdir(parents=True, exist_ok=True)
            build_store(stores[n_tokens], n_tokens, args.ckpts, args.models)
    ds = tokendyn.open_store(stores[args.tokens])
    print(f"store {stores[args.tokens].name}: {dict(ds['loss'].sizes)}, {ds['loss'].nbytes / 1e9:.2f} GB float16")
    read = read_once(ds)
    now, before = aoa_kernels(ds)
    label = "age-of-acquisition kernel, cpu us/token, one thread"
    print(f"{label:<52} now {now:.1f}, before {before:.1f} ({before / now:.1f}x)", flush=True)
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        ran = list(STUDIES) if args.no_studies else per_study(ds, Path(scratch), read)
        if not args.no_analyze:
            for glibc_defaults in (False, True):
                suffix = ", glibc thresholds" if glibc_defaults else ""
                peaks = {
                    n: run_analyze(
                        store,
                        Path(scratch) / f"analysis-{n}-{glibc_defaults}",
                        f"tokendyn analyze, {n:,} tokens{suffix}",
                        glibc_defaults=glibc_defaults,
                    )
                    for n, store in stores.items()
                }
                added = added_bytes(peaks, args.models)
                print(f"{'  peak added per (token, model)':<52} {added:8.1f} bytes (the loss: {2 * args.ckpts} bytes)")
            if args.per_study:
                study_growth(stores, Path(scratch), args.models, ran)
    if args.large:
        bench_large(root)
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
