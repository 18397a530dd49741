"""Synthetic stores in the store contract layout (docs/store.md, format 2) with planted trajectories, and the
one planted store the analysis, analyze and report tests share (`planted_folder`, built once per test
session; the `planted_store` fixture of conftest.py opens it).

`write_store` writes any loss array as a contract store with `ds.to_zarr` and reopens it with
`xr.open_zarr`, so the analyses run on lazy dask arrays as they do on real stores. Losses are
given on a (seq, pos) grid for convenience, as sequences starting with a context-only token:
the store holds the scored tokens only (pos > 0 and token_id >= 0, `scored_mask`), flattened in
row-major order along the `token` dim, with doc = seq and offset = pos - 1.
`planted_suite` builds a three-size suite whose token losses are functions of a per-model
"progress" h in [0, h_max]: every token's loss depends on training only through h, validation
perplexity falls monotonically in h, so the sizes coincide at matched perplexity; the sizes reach
different h at the same step, so they differ at matched step.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import xarray as xr

import tokendyn
from tokendyn.store import FORMAT_VERSION

KINDS = ("stagnating", "downward", "upward", "double_descent")
PROPORTIONS = (0.2, 0.55, 0.15, 0.1)
# name: (n_params, final progress h_max, number of checkpoints)
SIZES = {"small": (1e6, 0.55, 16), "medium": (1e7, 0.8, 20), "large": (1e8, 1.0, 24)}
FINAL_STEP = 10_000
TOKENS_PER_STEP = 1000
# Double-descent shape: fall to h = 0.3, rise to h = 0.55, fall again until 0.8.
DD_H = [0.0, 0.3, 0.55, 0.8, 1.0]
DD_G = [1.0, 0.0, 0.75, -0.25, -0.25]
# Token ids by kind, so that the dominant tokens of a cluster are known.
KIND_TOKENS = {
    "stagnating": [10, 11],
    "downward": list(range(20, 30)),
    "upward": [40, 41, 42],
    "double_descent": [50, 51],
}


def scored_mask(token_id: np.ndarray) -> np.ndarray:
    """(seq, pos) cells of a grid that become stored tokens: not the first position, not padding."""
    return (np.asarray(token_id) >= 0) & (np.arange(np.shape(token_id)[1]) > 0)[None, :]


def flat(grid: np.ndarray, token_id: np.ndarray | None = None) -> np.ndarray:
    """A (..., seq, pos) grid as (..., token), the way `write_store` stores it."""
    grid = np.asarray(grid)
    mask = scored_mask(np.full(grid.shape[-2:], 7) if token_id is None else token_id)
    return grid[..., mask]


def write_store(
    path: Path,
    loss: np.ndarray,
    steps: np.ndarray,
    *,
    models=None,
    n_params=None,
    tokens_seen=None,
    token_id=None,
    vocab=None,
    seq_chunk: int = 8,
) -> xr.Dataset:
    """Write loss (model, ckpt, seq, pos) and steps (model, ckpt; NaN = no such checkpoint) as a store.

    Keeps the scored cells (`scored_mask`) as the token dim, NaN on missing checkpoints, derives
    val_ppl = exp(mean loss) per checkpoint, and returns the reopened lazy dataset.
    vocab: the text of every token id (the store's `vocab_text`); none by default.
    """
    loss = np.array(loss, dtype=np.float32)
    steps = np.asarray(steps, dtype=float)
    n_models, n_ckpt, n_seq, n_pos = loss.shape
    models = models or [f"m{i}" for i in range(n_models)]
    n_params = np.asarray(n_params if n_params is not None else [1e6 * 10**i for i in range(n_models)], float)
    token_id = np.asarray(token_id if token_id is not None else np.full((n_seq, n_pos), 7), dtype=np.int64)
    done = np.isfinite(steps)
    mask = scored_mask(token_id)
    loss = loss[:, :, mask]
    loss[~done] = np.nan
    seq, pos = np.nonzero(mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # missing checkpoints: mean of nothing
        mean = np.nanmean(loss.astype(np.float64), axis=-1)
    ds = xr.Dataset(
        {"loss": (("model", "ckpt", "token"), loss), "done": (("model", "ckpt"), done)},
        coords={
            "model": np.array(models, dtype=np.dtypes.StringDType()),
            "ckpt": np.arange(n_ckpt),
            "step": (("model", "ckpt"), steps),
            "val_ppl": (("model", "ckpt"), np.where(done, np.exp(mean), np.nan)),
            "tokens_seen": (("model", "ckpt"), steps * TOKENS_PER_STEP if tokens_seen is None else tokens_seen),
            "n_params": ("model", n_params),
            "n_params_nonembed": ("model", n_params / 2),
            "token_id": ("token", token_id[mask]),
            "doc": ("token", seq),
            "offset": ("token", pos - 1),
            "n_context": ("token", pos),
        },
    )
    if vocab is not None:
        ds = ds.assign_coords(vocab_text=("vocab", np.array(vocab, dtype=object)))
    ds.attrs.update(tokendyn_version=tokendyn.__version__, format_version=FORMAT_VERSION)  # checked by open_store
    ds.chunk({"model": 1, "ckpt": 1, "token": seq_chunk * (n_pos - 1)}).to_zarr(path, mode="w", consolidated=True)
    return xr.open_zarr(path)


def planted_loss(kind: str, base: np.ndarray, amp: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Noise-free loss of tokens of one kind at progress h (broadcasting)."""
    if kind == "stagnating":
        return base + 0 * h
    if kind == "downward":
        return base + amp * (1 - h)
    if kind == "upward":
        return base + amp * h
    return base + amp * np.interp(h, DD_H, DD_G)


def progress(step: np.ndarray, h_max: float) -> np.ndarray:
    """Training progress of a model at `step`: larger models get further in the same steps."""
    return h_max * np.sqrt(step / FINAL_STEP)


def planted_suite(
    path: Path, n_seq: int = 24, seq_len: int = 32, noise: float = 0.005, seed: int = 0, vocab=None
) -> tuple[xr.Dataset, dict]:
    """The three-size planted suite; returns (lazy dataset, truth).

    vocab: the text of every token id (default " w<id>" for 64 ids; age of acquisition's chance level
    is ln of the vocabulary size).

    truth: "kind" (token,) index into KINDS, "base", "amp" (token,),
    "h" (model, ckpt) progress (NaN where the model has fewer checkpoints), "h_max" per model.
    """
    rng = np.random.default_rng(seed)
    n_ckpt = max(c for _, _, c in SIZES.values())
    kind = rng.choice(len(KINDS), size=(n_seq, seq_len), p=PROPORTIONS)
    base = rng.uniform(1, 4, size=kind.shape)
    amp = np.select(
        [kind == 1, kind == 2, kind == 3],
        [rng.uniform(2, 3, kind.shape), rng.uniform(1.5, 2.5, kind.shape), rng.uniform(1.5, 2.5, kind.shape)],
        0,
    )
    token_id = np.zeros(kind.shape, dtype=np.int64)
    for k, name in enumerate(KINDS):
        token_id[kind == k] = rng.choice(KIND_TOKENS[name], size=int((kind == k).sum()))
    token_id[-1, seq_len // 2 :] = -1  # padding at the end of the last sequence
    steps = np.full((len(SIZES), n_ckpt), np.nan)
    h = np.full_like(steps, np.nan)
    loss = np.zeros((len(SIZES), n_ckpt, n_seq, seq_len))
    for m, (_, h_max, count) in enumerate(SIZES.values()):
        steps[m, :count] = np.linspace(0, FINAL_STEP, count)
        h[m, :count] = progress(steps[m, :count], h_max)
        for k, name in enumerate(KINDS):
            curve = planted_loss(name, base[None], amp[None], h[m, :count, None, None])
            loss[m, :count] = np.where(kind[None] == k, curve, loss[m, :count])
    loss += rng.normal(0, noise, loss.shape)
    ds = write_store(
        path,
        loss,
        steps,
        models=list(SIZES),
        n_params=[v[0] for v in SIZES.values()],
        token_id=token_id,
        vocab=[f" w{i}" for i in range(64)] if vocab is None else vocab,
    )
    truth = {
        "kind": flat(kind, token_id),
        "base": flat(base, token_id),
        "amp": flat(amp, token_id),
        "h": h,
        "h_max": np.array([v[1] for v in SIZES.values()]),
    }
    return ds, truth


def write_tiled_store(
    path: Path, row_loss: np.ndarray, steps: np.ndarray, n_seq: int, seq_chunk: int = 256
) -> xr.Dataset:
    """A large store whose every sequence repeats row_loss (model, ckpt, pos) (pos 0 not stored),
    written chunk by chunk.

    The loss array never exists in memory here, and repeated rows compress to almost nothing on
    disk, so a store far larger than a memory cap is quick to write.
    """
    import dask.array as dsa

    row_loss = np.array(row_loss, dtype=np.float32)[:, :, 1:]
    n_models, n_ckpt, n_pos = row_loss.shape
    shape = (n_models, n_ckpt, n_seq, n_pos)
    loss = dsa.broadcast_to(dsa.from_array(row_loss[:, :, None, :], chunks=(1, 1, 1, n_pos)), shape)
    loss = loss.rechunk((1, 1, seq_chunk, n_pos)).reshape(n_models, n_ckpt, n_seq * n_pos)
    ds = xr.Dataset(
        {"loss": (("model", "ckpt", "token"), loss), "done": (("model", "ckpt"), np.isfinite(steps))},
        coords={
            "model": np.array([f"m{i}" for i in range(n_models)], dtype=np.dtypes.StringDType()),
            "ckpt": np.arange(n_ckpt),
            "step": (("model", "ckpt"), steps),
            "tokens_seen": (("model", "ckpt"), steps * TOKENS_PER_STEP),
            "val_ppl": (("model", "ckpt"), np.exp(np.nanmean(row_loss, axis=-1))),
            "n_params": ("model", 1e6 * 10 ** np.arange(n_models)),
            "token_id": ("token", dsa.full(n_seq * n_pos, 7, dtype=np.int32, chunks=seq_chunk * n_pos)),
            "doc": ("token", dsa.arange(n_seq * n_pos, chunks=seq_chunk * n_pos) // n_pos),
        },
    )
    ds.attrs.update(tokendyn_version=tokendyn.__version__, format_version=FORMAT_VERSION)
    ds.to_zarr(path, mode="w", consolidated=True)
    return xr.open_zarr(path)


# --- the shared planted store ------------------------------------------------------------------------

HOSTILE = {50: "<script>alert(1)</script>", 51: "&amp;", 40: '"q" <b>bold</b>', 10: "$x$ & y"}
REPORT_OPTIONS = {"clusters": {"n_clusters": "shapes"}}  # one cluster per shape (the default, stated)


def vocabulary(size: int = 64) -> np.ndarray:
    """Token texts "w<id>", with the hostile texts of HOSTILE (which need HTML escaping) at their ids."""
    return np.array([HOSTILE.get(i, f" w{i}") for i in range(size)], dtype=object)


def planted_store_with_vocab(path: Path, **options) -> tuple[xr.Dataset, dict]:
    """`planted_suite` plus a `vocab_text` coordinate; returns (the store opened by tokendyn, truth)."""
    vocab = xr.Dataset(
        coords={"vocab_text": ("vocab", vocabulary())},
        attrs={"tokendyn_version": tokendyn.__version__, "format_version": FORMAT_VERSION},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's note that consolidated metadata is not in the v3 spec
        _, truth = planted_suite(path, **options)
        vocab.to_zarr(path, mode="a")
    return tokendyn.open_store(path), truth


def planted_folder(tmp_path_factory) -> Path:
    """A folder with the planted store `p.zarr` (with the hostile vocabulary) and its truth `truth.npz`,
    built once per test session. Tests only read the store; outputs go elsewhere."""
    folder = tmp_path_factory.getbasetemp() / "planted"
    if not (folder / "truth.npz").is_file():
        _, truth = planted_store_with_vocab(folder / "p.zarr")
        np.savez(folder / "truth.npz", **truth)
    return folder


def planted_report(tmp_path_factory) -> Path:
    """`planted_folder` with the full report on its store in `report/` (default options but
    REPORT_OPTIONS), written once per test session: the analyses, report and browser tests all read it."""
    from tokendyn.pipelines.report import write_report

    folder = planted_folder(tmp_path_factory)
    if not (folder / "report" / "index.html").is_file():
        write_report(folder / "p.zarr", folder / "report", options=REPORT_OPTIONS, progress=False)
    return folder
