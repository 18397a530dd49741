"""Analysis steps for sequence-level patterns (methods.md §1.4): the perplexity of every evaluation set
of the store over training, at matched validation perplexity, where each curve turns, and the
true/false pair preference. Both steps span the store's sets, so they run when the main set is
analysed. Options read from `out.options`: levels, n_levels, turn_tol (default 0.05) and
sequence_by (default "mixture": a generated set gives one curve per mixture).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from tokendyn.analysis import sequences
from tokendyn.pipelines.analyze import Output, Skip, require
from tokendyn.errors import TokendynError
from tokendyn.store import list_sets

DEFAULTS = {"levels": None, "n_levels": 20, "turn_tol": 0.05, "sequence_by": "mixture"}


def _option(out: Output, name: str):
    value = out.options.get(name)
    return DEFAULTS[name] if value is None else value


def _named_sets(ds: xr.Dataset) -> list[str]:
    """The store's named sets; Skip unless ds is the main set of a store that has some."""
    require(ds, "loss", "step", "val_ppl")
    path = sequences.store_path(ds)
    if path is None or sequences.set_params(ds)["name"] != "main":
        raise Skip("spans the store's sets; runs when the main set of a store on disk is analysed")
    names = list_sets(path)
    if not names:
        raise Skip("the store has no named evaluation sets (add some with tokendyn extract --set / --pairs)")
    return names


def _table(data: xr.DataArray | xr.Dataset, columns: list[str]) -> pd.DataFrame:
    frame = data.to_dataframe().reset_index()
    return frame[[c for c in columns if c in frame.columns]]


def sequence_ppl_step(ds: xr.Dataset, out: Output) -> list[str]:
    """Perplexity of every set per model and checkpoint (sequence_ppl.csv), at matched validation
    perplexity (sequence_ppl_matched.csv) and each curve's turning point (sequence_turns.csv)."""
    _named_sets(ds)
    curve = sequences.sequence_ppl(ds, by=_option(out, "sequence_by") or None)
    columns = ["set", "source_set", "group", "kind", "corrupt", "model", "ckpt", "step", "val_ppl", "sequence_ppl"]
    table = _table(curve, columns).dropna(subset=["sequence_ppl"])
    out.write_table("sequence_ppl", table)
    turns = sequences.turning_points(curve, _option(out, "turn_tol"))
    out.write_table("sequence_turns", _table(turns, ["set", "model", "turns", "turn_ckpt", "turn_step",
                                                     "turn_val_ppl", "turn_value", "fall", "rise"]))
    lines = []
    try:
        levels = _option(out, "levels")
        matched = sequences.curve_at_perplexity(curve, levels, _option(out, "n_levels"))
        out.write_table("sequence_ppl_matched", _table(matched, ["set", "model", "val_ppl", "step", "sequence_ppl"]))
    except TokendynError as err:
        lines.append(f"no matched-perplexity table ({err})")
    flat = []
    for name in curve["set"].values:
        t = turns.sel(set=name)
        turned = [f"{m} at step {s:g} (val_ppl {v:.4g})" for m, s, v, ok in
                  zip(t["model"].values, t["turn_step"].values, t["turn_val_ppl"].values, t["turns"].values) if ok]
        if turned:
            lines.append(f"set {name}: perplexity turns (minimum, then +{_option(out, 'turn_tol'):g} in log) "
                         f"in {', '.join(turned)}")
        else:
            flat.append(str(name))
    if flat:
        lines.append(f"no turn in any model: {', '.join(flat)}")
    return lines


def pairs_step(ds: xr.Dataset, out: Output) -> list[str]:
    """Pair preference (share of pairs where the true text has the lower total loss) and margin
    (false - true loss on the differing tokens) per pairs set, model and checkpoint (pair_preference.csv)."""
    _named_sets(ds)
    try:
        preference = sequences.pair_preference(ds)
    except TokendynError as err:
        raise Skip(str(err)) from err
    margin = sequences.pair_margin(ds)
    table = xr.Dataset({"pair_preference": preference, "pair_margin": margin})
    table = _table(table, ["set", "model", "ckpt", "step", "val_ppl", "n_pairs", "pair_preference", "pair_margin"])
    out.write_table("pair_preference", table.dropna(subset=["pair_preference"]))
    lines = []
    for name in preference["set"].values:
        final = []
        for model in preference["model"].values:
            values = preference.sel(set=name, model=model).values
            done = np.flatnonzero(np.isfinite(values))
            if len(done):
                final.append(f"{model} {values[done[-1]]:.2f}")
        lines.append(f"set {name}: pair preference at the last checkpoint: {', '.join(final) or 'none done'}")
    return lines


STEPS = [sequence_ppl_step, pairs_step]
