"""Sequence-level patterns (methods.md §1.4): perplexity of whole evaluation sets and true/false pairs.

A store holds the main set at its root and named sets in `sets/<name>` (see `tokendyn.store`);
`tokendyn.open_store(path, set=...)` opens one set. The functions here that span sets take a store
path, or a dataset opened from a store (its path is `ds.encoding["source"]`, which
`xarray.open_zarr` sets); an in-memory dataset without one stands for its own set only.

- `sequence_ppl`: per set, model and checkpoint, exp(token-weighted mean loss), i.e. the
  perplexity of all the set's predicted tokens together (not a mean of per-sequence perplexities).
- `curve_at_perplexity`: any per-checkpoint curve read at matched validation perplexity, with the
  interpolation rule of `tokendyn.analysis.trajectories.at_axis` (linear in log perplexity on the running
  minimum of validation perplexity; log of the curve interpolated, i.e. geometric in perplexity).
- `turning_points`: where a curve stops falling and rises again.
- `pair_scores`, `pair_preference`, `pair_margin`: true/false statement pairs (sets of kind "pairs").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from tokendyn.analysis import trajectories
from tokendyn.data.corpus import PAD
from tokendyn.errors import TokendynError
from tokendyn.store import (
    CHECKPOINT_COORDS,
    TASK_SET_PREFIX,
    TOKEN_DIMS,
    list_sets,
    open_store,
    store_path,
    within_selection,
)

REDUCTIONS = ("sum", "mean")


# --- sets of a store -------------------------------------------------------------------------------


def set_params(ds: xr.Dataset) -> dict:
    """The protocol parameters of a set (name, kind, context, corrupt, ...), from its `protocol` attribute."""
    params = json.loads(ds.attrs["protocol"]) if "protocol" in ds.attrs else {}
    params.setdefault("name", ds.attrs.get("tokendyn_set", "main"))
    params.setdefault("kind", "pairs" if "is_true" in ds.coords else "text")
    return params


def open_sets(source: str | Path | xr.Dataset, sets: Sequence[str] | None = None) -> dict[str, xr.Dataset]:
    """name -> dataset of the store's sets (default: main and every named set except task sets); a set
    of at most `trajectories.SMALL_SET_BYTES` is read into memory. A dataset `source` gives its store
    and its models and checkpoints (`tokendyn.store.within_selection`)."""
    path = store_path(source) if isinstance(source, xr.Dataset) else Path(source)
    if path is None:
        return {set_params(source)["name"]: source}
    if sets is None:
        names = ["main", *(name for name in list_sets(path) if not name.startswith(TASK_SET_PREFIX))]
    else:
        names = list(sets)
    return {name: trajectories.load_if_small(within_selection(open_store(path, set=name), source)) for name in names}


# --- perplexity of sets ----------------------------------------------------------------------------


def set_perplexity(ds: xr.Dataset, by: str | None = None) -> xr.DataArray:
    """exp(mean loss over all predicted tokens of the set) per (model, ckpt); NaN where not done.

    by: a per-token coordinate (e.g. "mixture" of a generated set, a document field); gives one
    perplexity per value, dims (model, ckpt, by).
    """
    loss = ds["loss"].where(ds["done"]) if "done" in ds else ds["loss"]
    loss = loss.reset_coords(drop=True).astype(np.float64)
    total, count = loss, loss.notnull()
    if by is None:
        total, count = total.sum(TOKEN_DIMS), count.sum(TOKEN_DIMS)
    else:
        key = ds[by].reset_coords(drop=True).load()
        if key.dims != TOKEN_DIMS:
            raise TokendynError(f"coordinate '{by}' has dims {key.dims}; group sets by a per-token coordinate")
        total, count = total.groupby(key).sum(), count.groupby(key).sum()
    return np.exp(total / count).where(count > 0)


def sequence_ppl(
    source: str | Path | xr.Dataset, sets: Sequence[str] | None = None, by: str | None = None
) -> xr.DataArray:
    """Perplexity of each evaluation set: (set, model, ckpt), computed.

    by: a per-token coordinate, e.g. "mixture": every set that has it is split into one entry
    per value, named "<set>:<value>" (a generated file with several mixtures gives one curve per
    mixture); sets without it stay whole.
    Coordinates: `step`, `val_ppl`, `tokens_seen` (model, ckpt) from the main set, so the result
    plots against validation perplexity and goes into `curve_at_perplexity`; per entry `kind`
    ("text" or "pairs"), `corrupt` (replaced fraction, NaN if none), `n_tokens` (predicted
    tokens), `source_set` and `group` (the value of `by`, "" for a whole set).
    """
    datasets = open_sets(source, sets)
    first = next(iter(datasets.values()))
    curves, rows = [], []
    for name, ds in datasets.items():
        params = set_params(ds)
        row = {"kind": params["kind"], "corrupt": params.get("corrupt") or np.nan, "source_set": name}
        tokens = trajectories.valid_tokens(ds)
        if by is not None and by in ds.coords:
            curve = set_perplexity(ds, by).compute()
            counts = tokens.assign_coords({by: ds[by].reset_coords(drop=True).load()}).groupby(by).sum()
            for value in curve[by].values:
                curves.append(curve.sel({by: value}, drop=True))
                rows.append(
                    {**row, "set": f"{name}:{value}", "group": str(value), "n_tokens": int(counts.sel({by: value}))}
                )
        else:
            curves.append(set_perplexity(ds).compute())
            rows.append({**row, "set": name, "group": "", "n_tokens": int(tokens.sum())})
    coords = {name: first[name].reset_coords(drop=True) for name in CHECKPOINT_COORDS if name in first.coords}
    coords.update({key: ("set", [row[key] for row in rows]) for key in rows[0] if key != "set"})
    coords["set"] = [row["set"] for row in rows]
    if "n_params" in first.coords:
        coords["n_params"] = first["n_params"].reset_coords(drop=True)
    out = xr.concat(curves, dim="set").assign_coords({"model": first["model"].values, **coords})
    return (
        out.rename("sequence_ppl")
        .drop_attrs()
        .assign_attrs(long_name="perplexity of the evaluation set (token-weighted)")
        .compute()
    )


def curve_at_perplexity(
    curve: xr.DataArray,
    levels: Sequence[float] | None = None,
    n_levels: int = trajectories.default_of(trajectories.at_perplexity, "n_levels"),
) -> xr.DataArray:
    """A per-checkpoint curve (..., model, ckpt) read at matched validation perplexity: (..., model, val_ppl).

    `curve` needs the coordinates `val_ppl` and `step` (model, ckpt), as `sequence_ppl` gives;
    values must be positive (perplexities). levels: validation perplexities (default: `n_levels`
    levels every model reaches, `trajectories.perplexity_grid`). Levels a model does not reach are NaN.
    """
    missing = [name for name in ("val_ppl", "step") if name not in curve.coords]
    if missing or not {"model", "ckpt"} <= set(curve.dims):
        raise TokendynError(
            "the curve needs dims (model, ckpt) and the coordinates val_ppl and step; pass the output of sequence_ppl"
        )
    other = [dim for dim in curve.dims if dim not in ("model", "ckpt")]
    values = curve.transpose("model", "ckpt", *other).values.reshape(curve.sizes["model"], curve.sizes["ckpt"], -1)
    # trajectories.at_perplexity interpolates per-token losses: give it log(curve) as "tokens"
    ds = xr.Dataset(
        {"loss": (("model", "ckpt", *TOKEN_DIMS), np.log(values))},
        coords={
            "model": curve["model"].values,
            "ckpt": np.arange(curve.sizes["ckpt"]),
            **{name: curve[name].reset_coords(drop=True) for name in CHECKPOINT_COORDS if name in curve.coords},
        },
    )
    matched = trajectories.at_perplexity(ds, levels, n_levels)
    shape = (curve.sizes["model"], matched.sizes["val_ppl"], *(curve.sizes[d] for d in other))
    out = xr.DataArray(
        np.exp(matched.values).reshape(shape),
        dims=("model", "val_ppl", *other),
        coords={
            "model": curve["model"].values,
            "val_ppl": matched["val_ppl"].values,
            "step": matched["step"],
            **{d: curve[d] for d in other if d in curve.coords},
        },
    )
    extra = {
        name: coord for name, coord in curve.coords.items() if name not in out.coords and set(coord.dims) <= set(other)
    }
    return out.assign_coords(extra).transpose(*other, "model", "val_ppl").rename(curve.name).assign_attrs(curve.attrs)


def turning_points(curve: xr.DataArray, tol: float = 0.05) -> xr.Dataset:
    """Where each model's curve (..., model, ckpt) reaches a minimum and then rises, if it does.

    Over the model's checkpoints in step order (NaN points skipped), in log units
    (y = log curve: nats per token for a perplexity): the curve *turns* at the first checkpoint j
    where y rises at least `tol` above its running minimum; the turning point is the checkpoint
    of that minimum (before j). Default tol = 0.05, a 5% rise in perplexity.
    Returns (..., model): `turns` (bool), `turn_ckpt` (-1 if none), `turn_step`, `turn_val_ppl`
    and `turn_value` (curve at the turning point), `fall` = y(first) - y(turn) (0 when the curve
    only rose from the start) and `rise` = max y after the turn - y(turn); NaN when no turn.
    """
    if tol <= 0:
        raise TokendynError(f"tol = {tol} must be positive (a rise in log units, e.g. 0.05)")
    if "step" not in curve.coords or not {"model", "ckpt"} <= set(curve.dims):
        raise TokendynError(
            "the curve needs dims (model, ckpt) and the coordinate step; pass the output of sequence_ppl"
        )
    other = [dim for dim in curve.dims if dim not in ("model", "ckpt")]
    y = np.log(curve.transpose(*other, "model", "ckpt").values.astype(float))
    step = curve["step"].transpose("model", "ckpt").values.astype(float)
    val_ppl = curve["val_ppl"].transpose("model", "ckpt").values.astype(float) if "val_ppl" in curve.coords else None
    n_models = curve.sizes["model"]
    shape = (*y.shape[:-2], n_models)
    result = {
        "turns": np.zeros(shape, bool),
        "turn_ckpt": np.full(shape, -1),
        "turn_step": np.full(shape, np.nan),
        "turn_val_ppl": np.full(shape, np.nan),
        "turn_value": np.full(shape, np.nan),
        "fall": np.full(shape, np.nan),
        "rise": np.full(shape, np.nan),
    }
    for m in range(n_models):
        idx = np.flatnonzero(np.isfinite(step[m]))
        idx = idx[np.argsort(step[m, idx], kind="stable")]
        if len(idx) == 0:
            continue
        ym = y[..., m, idx]
        finite = np.isfinite(ym)
        running = np.fmin.accumulate(np.where(finite, ym, np.inf), axis=-1)
        risen = finite & (ym - running >= tol)
        turns = risen.any(-1)
        first_rise = np.where(turns, risen.argmax(-1), len(idx))
        before = np.arange(len(idx)) < first_rise[..., None]
        turn = np.argmin(np.where(before & finite, ym, np.inf), axis=-1)
        turn_y = np.take_along_axis(ym, turn[..., None], -1)[..., 0]
        after = (np.arange(len(idx)) > turn[..., None]) & finite
        first_y = np.take_along_axis(ym, np.argmax(finite, -1)[..., None], -1)[..., 0]
        ckpt = idx[turn]
        result["turns"][..., m] = turns
        result["turn_ckpt"][..., m] = np.where(turns, ckpt, -1)
        result["turn_step"][..., m] = np.where(turns, step[m, ckpt], np.nan)
        if val_ppl is not None:
            result["turn_val_ppl"][..., m] = np.where(turns, val_ppl[m, ckpt], np.nan)
        result["turn_value"][..., m] = np.where(turns, np.exp(turn_y), np.nan)
        result["fall"][..., m] = np.where(turns, first_y - turn_y, np.nan)
        result["rise"][..., m] = np.where(turns, np.max(np.where(after, ym, -np.inf), -1) - turn_y, np.nan)
    dims = (*other, "model")
    coords = {"model": curve["model"].values, **{d: curve[d] for d in other if d in curve.coords}}
    coords.update(
        {name: coord for name, coord in curve.coords.items() if name not in coords and set(coord.dims) <= set(other)}
    )
    out = xr.Dataset({name: (dims, values) for name, values in result.items()}, coords=coords)
    out.attrs["tol"] = tol
    return out


# --- true/false pairs ------------------------------------------------------------------------------


def pair_tokens(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Token indices of every pair's two texts, and which of them differ.

    Returns (index, valid, differs), each (pair, side, k) with side 0 = true, 1 = false: `index`
    is an index along the token dim of the k-th stored token of the text (padded with 0), `valid`
    marks real tokens, `differs` the tokens between the common prefix and the common suffix of the
    two token sequences (longest common prefix first, then the longest common suffix of what
    remains). Documents 2p and 2p + 1 are the true and the false text of pair p
    (`tokendyn.data.corpus`); pairs with a text missing from the store (cut by max_sequences) are
    left out. Also returns the indices of the pairs kept.
    """
    token_id = ds["token_id"].values
    doc = ds["doc"].values
    in_pairs = "is_true" in ds.coords and "pair" in ds.coords
    if in_pairs and (np.any(ds["pair"].values != doc // 2) or np.any(ds["is_true"].values != (doc % 2 == 0))):
        raise TokendynError("the set's documents are not in true, false order per pair; re-extract the pairs set")
    order = np.argsort(doc, kind="stable")  # token indices grouped by document, in text order
    n_docs = int(doc.max()) + 1
    counts = np.bincount(doc, minlength=n_docs + n_docs % 2).reshape(-1, 2)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).reshape(-1, 2)
    kept = np.flatnonzero(counts.min(1) > 0)
    counts, starts = counts[kept], starts[kept]
    if len(kept) == 0:
        raise TokendynError("the pairs set holds no complete pair; raise its max_sequences")
    rank = np.arange(counts.max())
    present = rank < counts[..., None]
    index = np.where(present, order[np.minimum(starts[..., None] + rank, len(order) - 1)], 0)
    ids = np.where(present, token_id[index], PAD)
    differs = _differing(ids[:, 0], ids[:, 1], counts)
    return index, present, differs & present, kept


def _differing(a: np.ndarray, b: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(pair, 2, k) mask of the tokens outside the common prefix and common suffix of rows a and b."""
    width = a.shape[1]
    rank = np.arange(width)
    shorter = lengths.min(1)
    same = (a == b) & (rank < shorter[:, None])
    prefix = np.where(same.all(1), width, np.argmin(same, 1))
    prefix = np.minimum(prefix, shorter)
    # suffix: compare the texts right-aligned
    ra = _right_align(a, lengths[:, 0])
    rb = _right_align(b, lengths[:, 1])
    same_end = (ra == rb)[:, ::-1] & (rank < (shorter - prefix)[:, None])
    suffix = np.where(same_end.all(1), width, np.argmin(same_end, 1))
    suffix = np.minimum(suffix, shorter - prefix)
    out = np.zeros((len(a), 2, width), bool)
    for side, n in enumerate((lengths[:, 0], lengths[:, 1])):
        out[:, side] = (rank >= prefix[:, None]) & (rank < (n - suffix)[:, None])
    return out


def _right_align(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    width = rows.shape[1]
    source = np.arange(width) - (width - lengths[:, None])
    return np.where(source >= 0, np.take_along_axis(rows, np.clip(source, 0, None), 1), PAD - 1)


def pair_scores(ds: xr.Dataset) -> xr.Dataset:
    """Per (model, ckpt, pair) loss sums of a pairs set, lazy.

    Variables, each with a `side` dim ("true", "false"): `total` (summed loss of the text's
    scored tokens, nats = -log p(text | the prefix)), `n_tokens` (scored tokens), `span`
    (summed loss over the tokens that differ between the two texts, see `pair_tokens`) and
    `n_span`. NaN where the checkpoint is not done.
    """
    if set_params(ds)["kind"] != "pairs":
        raise TokendynError(f"set '{set_params(ds)['name']}' is not a pairs set; open a set of kind \"pairs\"")
    index, valid, differs, pairs = pair_tokens(ds)
    dims = ("pair", "side", "k")
    loss = trajectories.token_loss(ds).reset_coords(drop=True).astype(np.float64)
    gathered = loss.isel(token=xr.DataArray(index, dims=dims))
    valid_da, differs_da = xr.DataArray(valid, dims=dims), xr.DataArray(differs & valid, dims=dims)
    done = ds["done"].reset_coords(drop=True)
    out = xr.Dataset(
        {
            "total": gathered.where(valid_da).sum("k").where(done),
            "n_tokens": valid_da.sum("k"),
            "span": gathered.where(differs_da).sum("k").where(done),
            "n_span": differs_da.sum("k"),
        }
    )
    coords = {name: ds[name].reset_coords(drop=True) for name in CHECKPOINT_COORDS if name in ds.coords}
    return out.assign_coords(side=["true", "false"], pair=pairs, model=ds["model"].values, **coords)


def pair_preference(
    source: str | Path | xr.Dataset, sets: Sequence[str] | None = None, reduce: str = "sum"
) -> xr.DataArray:
    """Share of pairs where the true text has the lower loss: (set, model, ckpt), computed.

    reduce: "sum" (default) compares total loss, i.e. the probability of the whole text; with the
    same template the texts can differ in length (a multi-token attribute), and the total charges
    each token of the attribute, where a per-token mean would reward a text for being longer with
    easy tokens. "mean" compares the mean loss per token. Ties count one half.
    source: a store path or a dataset; a pairs set's dataset stands for itself, any other for all
    the store's pairs sets (or those named in `sets`).
    """
    if reduce not in REDUCTIONS:
        raise TokendynError(f"unknown reduce '{reduce}'; use one of {', '.join(REDUCTIONS)}")

    def share(scores: xr.Dataset) -> xr.DataArray:
        value = scores["total"] if reduce == "sum" else scores["total"] / scores["n_tokens"]
        true, false = value.sel(side="true"), value.sel(side="false")
        wins = (true < false) + 0.5 * (true == false)
        return wins.mean("pair").where(true.notnull().all("pair"))

    return _per_pairs_set(source, sets, share, "pair_preference").assign_attrs(
        long_name="share of pairs where the true text has the lower loss", reduce=reduce
    )


def pair_margin(source: str | Path | xr.Dataset, sets: Sequence[str] | None = None) -> xr.DataArray:
    """Mean over pairs of (loss of the false text - loss of the true text) on their differing tokens.

    In nats, (set, model, ckpt), computed; positive when the model prefers the true statement. The
    differing tokens are those left after trimming the common prefix and suffix (`pair_tokens`):
    both texts are scored with the same left context there, so the difference is
    log p(true part | prefix) - log p(false part | prefix).
    """

    def margin(scores: xr.Dataset) -> xr.DataArray:
        return (scores["span"].sel(side="false") - scores["span"].sel(side="true")).mean("pair", skipna=False)

    return _per_pairs_set(source, sets, margin, "pair_margin").assign_attrs(
        units="nats", long_name="mean loss of the false minus the true text on the tokens where they differ"
    )


def _per_pairs_set(source, sets, summary, name: str) -> xr.DataArray:
    if sets is None and isinstance(source, xr.Dataset) and set_params(source)["kind"] == "pairs":
        sets = [set_params(source)["name"]]
    datasets = {key: ds for key, ds in open_sets(source, sets).items() if set_params(ds)["kind"] == "pairs"}
    if not datasets:
        raise TokendynError(
            'the store has no set of kind "pairs"; add one with tokendyn extract SUITE --pairs FILE.jsonl --out STORE'
        )
    scores = [pair_scores(ds) for ds in datasets.values()]
    curves = [summary(s).drop_vars(["side", "pair"], errors="ignore") for s in scores]
    counts = [s.sizes["pair"] for s in scores]
    out = xr.concat(curves, dim="set").assign_coords(set=list(datasets), n_pairs=("set", counts))
    return out.compute().rename(name).drop_attrs()
