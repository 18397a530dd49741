"""Compile the analyses' numba kernels ahead of the first real run: `python -m tokendyn.pipelines.warm`.

numba compiles a kernel the first time it meets an input type and caches the machine code on disk
next to its module (`cache=True`), once per install: about 17 CPU s for a float16 store and 27 s for
a float32 one. `scripts/setup` runs this module so that the compiling happens at install time, not
in a newcomer's first `tokendyn demo` or `tokendyn analyze`. It runs the studies on a tiny synthetic
store of each loss dtype `tokendyn extract` writes (float32, float16); those that need more than the
loss (sets, tasks) skip, and none of them has a kernel of its own.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from tokendyn import __version__
from tokendyn.pipelines.analyze import run_studies
from tokendyn.store import FORMAT_VERSION, open_store
from tokendyn.studies import STUDIES

DTYPES = ("float32", "float16")


def tiny_store(path: Path, dtype: str, n_models: int = 3, n_ckpts: int = 12, n_tokens: int = 2048) -> Path:
    """A store of `n_tokens` random falling, flat and rising loss curves (seeded) in `dtype`."""
    rng = np.random.default_rng(0)
    steps = np.concatenate([[0], np.geomspace(1, 1000, n_ckpts - 1).round()])
    progress = np.log1p(steps) / np.log1p(steps[-1])  # 0 at the start, 1 at the end
    chance = float(np.log(1000))
    drop = rng.uniform(-0.5, 1.0, (n_models, 1, n_tokens))  # negative: the token's loss rises
    noise = rng.normal(0, 0.1, (n_models, n_ckpts, n_tokens))
    loss = np.clip(chance * (1 - drop * progress[None, :, None]) + noise, 0.0, None)
    val_ppl = np.exp(loss.mean(axis=2))
    token = np.arange(n_tokens)
    ds = xr.Dataset(
        {
            "loss": (("model", "ckpt", "token"), loss.astype(dtype)),
            "done": (("model", "ckpt"), np.ones((n_models, n_ckpts), bool)),
        },
        coords={
            "model": [f"m{i}" for i in range(n_models)],
            "ckpt": np.arange(n_ckpts),
            "step": (("model", "ckpt"), np.tile(steps, (n_models, 1))),
            "tokens_seen": (("model", "ckpt"), np.tile(steps * 1000, (n_models, 1))),
            "val_ppl": (("model", "ckpt"), val_ppl),
            "n_params": ("model", 1e6 * 10.0 ** np.arange(n_models)),
            "token_id": ("token", rng.integers(0, 1000, n_tokens)),
            "doc": ("token", token // 256),
            "offset": ("token", token % 256),
            "n_context": ("token", token % 256),
            "vocab_text": ("vocab", np.array([f"t{i}" for i in range(1000)], dtype=object)),
        },
        attrs={"tokendyn_version": __version__, "format_version": FORMAT_VERSION},
    )
    ds.to_zarr(path, mode="w-", consolidated=True)
    return path


def warm(dtypes: tuple[str, ...] = DTYPES) -> dict[str, list[str]]:
    """Run every study on a tiny store of each loss dtype; return the studies that ran (not skipped) per dtype."""
    ran = {}
    with tempfile.TemporaryDirectory(prefix="tokendyn-warm-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's notes on object strings and consolidated metadata
        for dtype in dtypes:
            ds = open_store(tiny_store(Path(tmp) / f"{dtype}.zarr", dtype))
            ran[dtype] = [o.name for o in run_studies(ds, list(STUDIES), progress=False) if o.result is not None]
    return ran


if __name__ == "__main__":
    started = time.perf_counter()
    warm()
    print(f"setup: compiled the analysis kernels for float32 and float16 loss ({time.perf_counter() - started:.0f} s)")
