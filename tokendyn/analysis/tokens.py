"""Looking at the tokens themselves: selection by training step, the tokens that moved most between
two steps with their text and context, and whitespace made visible.

Token positions are addressed generically through the store's per-token dimensions
(`tokendyn.store.TOKEN_DIMS`): tokens are taken in that order, flattened, and a token's neighbours
are the tokens next to it in that order that belong to the same document (`doc`).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from tokendyn.analysis.labels import flag_names
from tokendyn.analysis.trajectories import done_checkpoints, load_small, model_index, trained_checkpoints
from tokendyn.data.corpus import PAD
from tokendyn.errors import TokendynError
from tokendyn.store.layout import TOKEN_DIMS

WHITESPACE = {"\n": "⏎", " ": "␣", "\t": "→", "\r": "␍"}
INVISIBLE = ("Cc", "Cf", "Cs")  # Unicode categories shown by code point: controls, format characters, surrogates
RANKINGS = ("drop", "rise", "change", "loss")


def show_whitespace(text: str, spaces: bool = True) -> str:
    """Whitespace made visible: newline ⏎, tab →, carriage return ␍, and (with `spaces`) space ␣;
    every other control or format character (bidirectional overrides, zero-width joiners, ...) as
    ⟨U+XXXX⟩, so that it can neither hide nor reorder the text around it.

    Token columns show every space (a token " the" and "the" differ); running text keeps its spaces
    (`spaces=False`) and shows only the characters that would break a line or vanish.
    """
    table = WHITESPACE if spaces else {k: v for k, v in WHITESPACE.items() if k != " "}
    return "".join(table.get(c, f"⟨U+{ord(c):04X}⟩" if unicodedata.category(c) in INVISIBLE else c) for c in text)


# --- selection by training step --------------------------------------------------------------------


def by_step(ds: xr.Dataset, model: int | str) -> xr.Dataset:
    """One model's done checkpoints indexed by training step: `by_step(ds, "m").loss.sel(step=2000)`.

    `step` is a (model, ckpt) coordinate in the store (models may have different steps), so
    `ds.loss.sel(step=...)` cannot work on the whole store; per model it can. Steps are integers
    when they all are.
    """
    ds = load_small(ds)
    m = model_index(ds, model)
    idx = done_checkpoints(ds, m)
    view = ds.isel(model=m, ckpt=idx)
    steps = view["step"].values
    if np.all(steps == np.round(steps)):
        view = view.assign_coords(step=("ckpt", steps.astype(np.int64)))
    return view.swap_dims(ckpt="step")


def sel_step(ds: xr.Dataset, model: int | str, step: float | Sequence[float]) -> xr.Dataset:
    """The checkpoint(s) of `model` at training step(s) `step` (exact; a TokendynError lists the steps there are)."""
    view = by_step(ds, model)
    wanted = np.atleast_1d(np.asarray(step, dtype=float))
    missing = [s for s in wanted if s not in view["step"].values]
    if missing:
        have = ", ".join(str(s) for s in view["step"].values)
        raise TokendynError(
            f"model {view['model'].values} has no done checkpoint at step "
            f"{', '.join(f'{s:g}' for s in missing)}; it has steps {have}"
        )
    return view.sel(step=step)


# --- the tokens that moved -------------------------------------------------------------------------


def flat_tokens(da: xr.DataArray) -> np.ndarray:
    """Values over the token dims, in TOKEN_DIMS order, flattened."""
    return np.asarray(da.transpose(*TOKEN_DIMS).values).reshape(-1)


def _model_values(array: xr.DataArray, m: int, what: str) -> np.ndarray:
    """array's values for model m over the token dims, flattened; a one-line error for any other dim."""
    array = array.isel(model=m) if "model" in array.dims else array
    extra = [d for d in array.dims if d not in TOKEN_DIMS]
    if extra:
        example = f"{extra[0]}={array[extra[0]].values[0].item()!r}" if extra[0] in array.coords else f"{extra[0]}=0"
        raise TokendynError(f"{what} has the dims {extra} besides the tokens; pick one, e.g. .sel({example})")
    return flat_tokens(array)


def _contexts(
    ds: xr.Dataset, vocab: np.ndarray | None, flat_idx: np.ndarray, width: int
) -> tuple[list[str], list[str]]:
    """(token text, context) of tokens at flat indices: up to `width` tokens either side within the
    token's document, their text joined as it is (spaces kept), the token between [[ ]]. Reads only
    the tokens around each one, not the store's every id."""

    def text(i: int) -> str:
        return str(vocab[i]) if vocab is not None and 0 <= i < len(vocab) else f"#{i}"

    (dim,) = TOKEN_DIMS
    tokens, contexts = [], []
    for t in flat_idx:
        lo = max(0, t - width)
        around = ds[["token_id", "doc"] if "doc" in ds.variables else ["token_id"]].isel(
            {dim: slice(lo, t + 1 + width)}
        )
        ids = around["token_id"].values
        same = ids != PAD
        if "doc" in around:
            same &= around["doc"].values == around["doc"].values[t - lo]
        shown = [text(i) for i in ids]
        shown[t - lo] = "[[" + shown[t - lo] + "]]"
        tokens.append(text(ids[t - lo]))
        contexts.append(show_whitespace("".join(x for x, keep in zip(shown, same) if keep), spaces=False))
    return tokens, contexts


def steps_between(ds: xr.Dataset, m: int, between: tuple[float, float] | None) -> tuple[int, int]:
    """ckpt indices of the two compared steps; default the first trained checkpoint (step > 0) and the
    last, or the first done checkpoint (step 0, the untrained model) and the last when the model has
    fewer than two trained checkpoints: what training changed is then the only change to show."""
    done = done_checkpoints(ds, m)
    if len(done) == 0:
        raise TokendynError(f"model {ds['model'].values[m]} has no done checkpoint; run extraction first")
    if between is None:
        trained = trained_checkpoints(ds, m)
        return int((trained if len(trained) >= 2 else done)[0]), int(done[-1])
    if len(between) != 2:
        raise TokendynError("between takes two training steps, e.g. between=(1000, 143000)")
    steps = ds["step"].values[m, done]
    out = []
    for step in between:
        hit = np.flatnonzero(steps == step)
        if len(hit) == 0:
            raise TokendynError(
                f"model {ds['model'].values[m]} has no done checkpoint at step {step:g}; it has "
                f"steps {', '.join(f'{s:g}' for s in steps)}"
            )
        out.append(int(done[hit[0]]))
    return out[0], out[1]


def top_tokens(
    ds: xr.Dataset,
    by: str | xr.DataArray = "drop",
    k: int = 20,
    between: tuple[float, float] | None = None,
    model: int | str | None = None,
    labels: xr.DataArray | Mapping[str, xr.DataArray] | None = None,
    width: int = 5,
) -> pd.DataFrame:
    """The k tokens of one model that rank highest `by`, with their text, context and loss per checkpoint.

    by: "drop" (largest loss fall from the first to the second step of `between`), "rise" (largest
        increase), "change" (largest absolute change), "loss" (highest loss at the second step), or a
        per-token DataArray (dims TOKEN_DIMS, optionally with `model`) ranked highest first, e.g.
        `curve_measures()["forgettability"]`.
    between: two training steps (default: the model's first trained checkpoint, step > 0, and its last;
        with one trained checkpoint, step 0 and it: `steps_between`).
    model: a name or index (needed when the store has several models).
    labels: a label array (trend categories, Rho-1 classes, clusters) or {column: label array}; each
        adds a column with the token's label name in this model.
    width: tokens of context either side, from the same document.
    Returns a DataFrame: the token's position (`<dim>_index` per token dim; `doc` and `offset`
    where stored), token_id, token (whitespace
    visible: ␣ space, ⏎ newline, → tab), context (the text with its spaces, the token in [[ ]]),
    the label columns, `change` (loss at the second step minus the first, nats), and one column
    `loss@<step>` per done checkpoint.
    """
    ds = load_small(ds)
    if model is None:
        if ds.sizes["model"] > 1:
            raise TokendynError(
                f"top_tokens needs a model: pass model= one of {', '.join(map(str, ds['model'].values))}"
            )
        model = 0
    m = model_index(ds, model)
    if k < 1:
        raise TokendynError("k must be at least 1 token")
    a, b = steps_between(ds, m, between)
    loss = ds["loss"].isel(model=m)
    first, last = flat_tokens(loss.isel(ckpt=a)).astype(float), flat_tokens(loss.isel(ckpt=b)).astype(float)
    change = last - first
    if isinstance(by, xr.DataArray):
        score = _model_values(by, m, "by").astype(float)
    elif by in RANKINGS:
        score = {"drop": -change, "rise": change, "change": np.abs(change), "loss": last}[by]
    else:
        raise TokendynError(f"unknown ranking {by!r}; use one of {', '.join(RANKINGS)} or a per-token DataArray")
    score = np.where(np.isfinite(score) & np.isfinite(change), score, -np.inf)
    order = np.argsort(-score, kind="stable")[:k]
    order = order[np.isfinite(score[order])]
    vocab = ds["vocab_text"].values if "vocab_text" in ds.variables else None
    tokens, contexts = _contexts(ds, vocab, order, width)
    shape = tuple(ds.sizes[d] for d in TOKEN_DIMS)
    index = dict(zip(TOKEN_DIMS, np.unravel_index(order, shape)))
    picked = {d: xr.DataArray(v, dims="picked") for d, v in index.items()}
    where = {f"{dim}_index": value for dim, value in index.items()}
    for name in ("doc", "offset"):  # where the token stands in its document
        if name in ds.coords and ds[name].dims == TOKEN_DIMS:
            where[name] = ds[name].isel(picked).values
    table = pd.DataFrame(where)
    table.insert(0, "model", str(ds["model"].values[m]))
    table["token_id"] = ds["token_id"].isel(picked).values
    table["token"] = [show_whitespace(t) for t in tokens]
    table["context"] = contexts
    named = {"category": labels} if isinstance(labels, xr.DataArray) else dict(labels or {})
    for column, lab in named.items():
        names = flag_names(lab)
        codes = _model_values(lab, m, f"labels '{column}'")[order]
        table[column] = [names[c] if c >= 0 else "" for c in codes]
    table["change"] = change[order]
    steps = ds["step"].values[m]
    done = done_checkpoints(ds, m)
    per_ckpt = np.asarray(loss.isel(ckpt=done, **picked).transpose("ckpt", "picked").values, dtype=float)
    for row, c in zip(per_ckpt, done):
        label = f"{steps[c]:.0f}" if steps[c] == round(steps[c]) else f"{steps[c]:g}"
        table[f"loss@{label}"] = row
    table.attrs.update(
        model=str(ds["model"].values[m]),
        between=(float(steps[a]), float(steps[b])),
        by=by if isinstance(by, str) else str(by.name),
    )
    return table.reset_index(drop=True)
