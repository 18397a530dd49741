"""Trend categories and clustering at scale, measured side by side in one run.

    python benchmarks/trajectories.py [--tokens 1000000] [--ckpts 50] [--models 3] [--store PATH]

Builds once (then reuses) a float32 store in the store contract layout, chunks (1, 1, 128, 2048)
as `tokendyn extract` writes them, holding synthetic trajectories (falling, rising, flat and
double-descent tokens with noise). Then prints wall times, with the default threaded dask
scheduler on this machine, of:
  - reading the loss once (a sum over the store): the I/O floor,
  - trend categories at 4 start fractions with their shares (target <= 10 s for 1,000,000 tokens x
    50 checkpoints x 3 models), and at 1 start fraction,
  - the per-token scipy.stats.linregress loop of the original analysis, on a sample, extrapolated,
  - clustering on the matched-perplexity grid, n_clusters="auto" (k = 2..8) and n_clusters=6,
with ratios, and the load average (the machine may be shared: say so when you quote the numbers).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import scipy.stats
import xarray as xr
import zarr

import tokendyn
from tokendyn.analysis.labels import label_share
from tokendyn.analysis.trends import STARTS

SEQ_LEN, SEQ_CHUNK = 2048, 128


def _block(model: int, ckpt: int, seq_block: int, h: float, n_seq: int) -> np.ndarray:
    """Loss of one (model, ckpt, seq chunk): token parameters fixed per seq chunk, noise per block."""
    tokens = np.random.default_rng(seq_block)
    kind = tokens.choice(4, size=(n_seq, SEQ_LEN), p=[0.2, 0.55, 0.15, 0.1])
    base, amp = tokens.uniform(1, 4, kind.shape), tokens.uniform(0.5, 3, kind.shape)
    double_descent = np.interp(h, [0, 0.3, 0.55, 0.8], [1, 0, 0.75, -0.25])
    shape = np.select([kind == 1, kind == 2, kind == 3], [1 - h, h, double_descent], 0)
    noise = np.random.default_rng([model, ckpt, seq_block]).normal(0, 0.05, kind.shape)
    loss = (base + amp * shape + noise).astype(np.float32)
    loss[:, 0] = np.nan
    return loss[None, None]


def build_store(path: Path, n_tokens: int, n_ckpts: int, n_models: int) -> None:
    n_seq = -(-n_tokens // SEQ_LEN)
    steps = np.linspace(1000, 50_000, n_ckpts)
    h_max = np.linspace(0.6, 1.0, n_models)
    progress = h_max[:, None] * np.sqrt(steps / steps[-1])[None, :]

    def block(block_info=None):
        m, c, s, _ = block_info[None]["chunk-location"]
        rows = block_info[None]["chunk-shape"][2]
        return _block(m, c, s, progress[m, c], rows)

    seq_chunks = da.core.normalize_chunks(SEQ_CHUNK, (n_seq,))[0]
    loss = da.map_blocks(block, dtype=np.float32, chunks=((1,) * n_models, (1,) * n_ckpts, seq_chunks, (SEQ_LEN,)))
    ds = xr.Dataset(
        {
            "loss": (("model", "ckpt", "seq", "pos"), loss),
            "done": (("model", "ckpt"), np.ones((n_models, n_ckpts), bool)),
        },
        coords={
            "model": [f"m{i}" for i in range(n_models)],
            "ckpt": np.arange(n_ckpts),
            "step": (("model", "ckpt"), np.tile(steps, (n_models, 1))),
            "tokens_seen": (("model", "ckpt"), np.tile(steps * 2**21, (n_models, 1))),
            "val_ppl": (("model", "ckpt"), np.ones((n_models, n_ckpts))),
            "n_params": ("model", 1e7 * 10.0 ** np.arange(n_models)),
            "token_id": (("seq", "pos"), np.random.default_rng(0).integers(0, 50_000, (n_seq, SEQ_LEN))),
        },
        attrs={"tokendyn_version": tokendyn.__version__},
    )
    print(f"building {path} ({ds['loss'].nbytes / 1e9:.2f} GB of float32 loss) ...", flush=True)
    ds.to_zarr(path, mode="w")
    val_ppl = np.exp(xr.open_zarr(path)["loss"].mean(["seq", "pos"]).values)
    group = zarr.open_group(path, mode="r+")
    group["val_ppl"][...] = val_ppl
    zarr.consolidate_metadata(path)


def timed(label: str, fn, reference: float | None = None) -> float:
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    ratio = f"   ({seconds / reference:.2f} x the read)" if reference else ""
    print(f"{label:<58} {seconds:8.2f} s{ratio}", flush=True)
    return seconds


def linregress_loop_seconds(ds: xr.Dataset, n_sample: int = 2000) -> float:
    """Seconds of the per-token linregress loop for every token of every model at 4 starts, from a sample."""
    loss = ds["loss"].isel(model=0, seq=0).values[:, 1 : n_sample + 1].astype(np.float64)
    x = np.log(ds["step"].values[0])
    start = time.perf_counter()
    for token in range(loss.shape[1]):
        ppl = np.exp(loss[:, token])
        scipy.stats.linregress(x, ppl / ppl[0])
    per_fit = (time.perf_counter() - start) / loss.shape[1]
    n_tokens = ds.sizes["seq"] * (ds.sizes["pos"] - 1)
    return per_fit * n_tokens * ds.sizes["model"] * len(STARTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--ckpts", type=int, default=50)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--store", type=Path, default=None, help="default: cache/bench/trajectories-T-C-M.zarr")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    root = Path(__file__).resolve().parents[1]
    store = args.store or root / "cache" / "bench" / f"trajectories-{args.tokens}-{args.ckpts}-{args.models}.zarr"
    if not (store / "zarr.json").is_file():
        store.parent.mkdir(parents=True, exist_ok=True)
        build_store(store, args.tokens, args.ckpts, args.models)
    ds = tokendyn.open_store(store)
    sizes = dict(ds["loss"].sizes)
    print(f"store {store}: {sizes}, {ds['loss'].nbytes / 1e9:.2f} GB float32, chunks {ds['loss'].data.chunksize}")
    print(f"{os.cpu_count()} cores, load average before {os.getloadavg()[0]:.1f}")
    read = timed("read the loss once (sum)", lambda: ds["loss"].sum().compute())
    timed(
        f"trend categories, {len(STARTS)} starts, + shares",
        lambda: label_share(ds.tokendyn.trend_categories(STARTS)),
        read,
    )
    timed("trend categories, 1 start (0.2), + shares", lambda: label_share(ds.tokendyn.trend_categories(0.2)), read)
    loop = linregress_loop_seconds(ds)
    print(f"{'per-token scipy.stats.linregress loop (extrapolated)':<58} {loop:8.0f} s")
    timed("cluster, matched-perplexity grid, n_clusters=auto", lambda: ds.tokendyn.cluster("auto"), read)
    timed("cluster, matched-perplexity grid, n_clusters=6", lambda: ds.tokendyn.cluster(6), read)
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
