"""Analysis at suite scale, measured side by side in one run.

    python benchmarks/analysis.py [--tokens 1000000] [--ckpts 50] [--models 3] [--large]

Builds once (then reuses) a float16 store of synthetic per-token loss curves (sigmoid falls in
log step of every width and midpoint, flat and rising tokens, noise) in the store's layout with
chunks (1, 1, 128, 2048) as `tokendyn extract` writes them. Then prints wall and CPU seconds,
and the process's peak memory so far, of:
  - reading the loss once (a sum over the store): the I/O floor every ratio is relative to,
  - trend categories at 4 start fractions with their shares,
  - the per-token measures of `curve_measures` (final loss, age of acquisition, forgettability,
    cartography), each written to a Zarr store as `tokendyn analyze` does,
  - the age-of-acquisition kernel before this change (10 Levenberg-Marquardt steps from a logit
    line on slices of 8192 tokens), timed on a sample and extrapolated,
  - `tokendyn analyze` end to end (a child process; its own peak memory).
Target: analyze <= 30 s at 1,000,000 tokens x 50 checkpoints x 3 models on a 2-core machine.

--large adds Pythia's shape out of core: 10,000,000 tokens x 154 checkpoints x 1 model in
float16 (3 GB on disk, built once): reading it once and its trend categories.
The machine may be shared: the load average is printed before and after.
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
from tqdm import tqdm

import tokendyn
from tokendyn.analysis import curves
from tokendyn.analysis.trends import STARTS
from tokendyn.store.layout import FORMAT_VERSION, token_chunk

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
            "loss": (("model", "ckpt", "token"), da.zeros((n_models, n_ckpts, n_tokens), dtype=np.float16, chunks=(1, 1, chunk))),
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
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    ratio = f"  {wall / reference:6.1f} x the read" if reference else " " * 21
    print(f"{label:<52} {wall:8.2f} s wall {cpu:8.2f} s cpu{ratio}   peak {peak_gb():.2f} GB", flush=True)
    return wall


def old_aoa_seconds(ds: xr.Dataset, n_sample: int = 8192) -> float:
    """Seconds of the previous age-of-acquisition kernel for every token of every model, from a sample."""
    sys.path.insert(0, str(Path(__file__).parent))
    from aoa_before import sigmoid_midpoint_before  # the kernel as it was, kept for this comparison

    loss = ds["loss"].isel(model=0, token=slice(0, n_sample)).values
    x = np.log10(ds["step"].values[0])
    start = time.process_time()
    sigmoid_midpoint_before(loss.astype(np.float64), x, CHANCE, n_iter=10)
    per_token = (time.process_time() - start) / loss.shape[1]
    return per_token * ds.sizes["token"] * ds.sizes["model"]


def write_measure(data: xr.DataArray, folder: Path) -> None:
    """Write per-token results chunk by chunk (token coordinates stay in the store, as in `tokendyn analyze`)."""
    data = data.reset_coords(drop=True)
    data.encoding = {}
    data.chunk({d: max(c) for d, c in zip(data.dims, data.chunks)}).to_dataset(name=data.name).to_zarr(
        folder / f"{data.name}.zarr", mode="w", consolidated=False
    )


def run_analyze(store: Path, out: Path) -> None:
    """`tokendyn analyze` in a child process; prints its wall time and peak memory."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    command = [str(Path(sys.executable).with_name("tokendyn")), "analyze", str(store), "--out", str(out), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2**20
    status = "ok" if done.returncode == 0 else f"FAILED: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    print(
        f"{'tokendyn analyze (child process, end to end)':<52} {wall:8.2f} s wall   peak {peak:.2f} GB   {status}",
        flush=True,
    )


def bench(store: Path) -> tuple[xr.Dataset, float]:
    """Open the store, time reading it once and its trend categories."""
    ds = tokendyn.open_store(store)
    print(
        f"store {store}: {dict(ds['loss'].sizes)}, {ds['loss'].nbytes / 1e9:.2f} GB {ds['loss'].dtype}, "
        f"chunks {ds['loss'].data.chunksize}",
        flush=True,
    )
    read = timed("read the loss once (sum)", lambda: ds["loss"].sum().compute())
    timed(
        f"trend categories, {len(STARTS)} starts, + shares", lambda: ds.tokendyn.trend_categories(STARTS).share(), read
    )
    return ds, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--ckpts", type=int, default=50)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--large", action="store_true", help="also 10M tokens x 154 checkpoints out of core (3 GB)")
    parser.add_argument("--no-analyze", action="store_true", help="skip the end-to-end `tokendyn analyze` run")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    root = Path(__file__).resolve().parents[1] / "cache" / "bench"
    print(
        f"{os.cpu_count()} cores, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"load average before {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    store = root / f"analysis-{args.tokens}-{args.ckpts}-{args.models}-f16.zarr"
    if not store.is_dir():
        store.parent.mkdir(parents=True, exist_ok=True)
        build_store(store, args.tokens, args.ckpts, args.models)
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        scratch = Path(scratch)
        ds, read = bench(store)
        total = 0.0
        for name in ("final_loss", "age_of_acquisition", "forgettability", "cartography"):
            result = (
                getattr(curves, name)(ds)
                if name != "age_of_acquisition"
                else curves.age_of_acquisition(ds, chance=CHANCE)
            )
            arrays = [result] if isinstance(result, xr.DataArray) else list(result.data_vars.values())
            total += timed(f"curve measure: {name}", lambda: [write_measure(a, scratch) for a in arrays], read)
        print(f"{'  all curve measures':<52} {total:8.2f} s wall", flush=True)
        before = old_aoa_seconds(ds)
        print(f"{'  age of acquisition before (extrapolated cpu)':<52} {before:8.2f} s cpu", flush=True)
        if not args.no_analyze:
            run_analyze(store, scratch / "analysis")
    if args.large:
        large = root / "analysis-10000000-154-1-f16.zarr"
        if not large.is_dir():
            build_store(large, 10_000_000, 154, 1)
        bench(large)
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
