"""Checks of a suite's checkpoints from what the store holds (methods.md §6).

Public suites have served the same weights under several steps, and final weights under early step
names. The store keeps a hash of every checkpoint's weight files (`weights_hash`) and its validation
perplexity (`val_ppl`), which are enough to notice both: equal hashes, and a checkpoint whose
validation loss lies below that of every checkpoint saved after it (within a window), which its
step cannot explain.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from tokendyn.analysis.trajectories import default_of, done_checkpoints, trained_checkpoints


def identical_weights(ds: xr.Dataset) -> pd.DataFrame:
    """One row per model and group of its done checkpoints with equal weight hashes: model, steps
    (the group's steps, ascending). Empty when the store has no hashes."""
    rows = []
    if "weights_hash" in ds.variables:
        for m, model in enumerate(ds["model"].values):
            idx = done_checkpoints(ds, m)
            hashes = np.array([str(h) for h in ds["weights_hash"].values[m, idx]], dtype=object)
            for digest in dict.fromkeys(h for h in hashes if h):
                group = idx[hashes == digest]
                if len(group) > 1:
                    rows.append({"model": str(model), "steps": [int(s) for s in ds["step"].values[m, group]]})
    return pd.DataFrame(rows, columns=["model", "steps"])


def out_of_order(ds: xr.Dataset, window: int = 3, margin: float = 0.02) -> pd.DataFrame:
    """Trained checkpoints whose validation loss, log(val_ppl) in nats per token, is lower by more
    than `margin` than that of each of the next `window` done checkpoints of their model, while a
    later checkpoint comes back down to it (within `margin`): their weights are likely from later
    in training.

    Training loss is noisy but falls; a checkpoint beaten by none of the `window` checkpoints after
    it, by a clear margin, is out of place when training does reach its level later. A model that
    overfits (its loss rises after its best checkpoint and never returns) is not flagged; a spike
    lasting `window` checkpoints still would be, so the result is a warning, not a verdict. The last
    `window` checkpoints have too few after them to be checked. Rows: model, step, loss, later (the
    lowest loss of the next `window` checkpoints).
    """
    rows = []
    for m, model in enumerate(ds["model"].values):
        idx = trained_checkpoints(ds, m)
        loss = np.log(np.asarray(ds["val_ppl"].values[m, idx], dtype=float))
        for i in range(len(idx) - window):
            later = loss[i + 1 : i + 1 + window]
            beaten_by_none = np.all(np.isfinite(later)) and loss[i] < later.min() - margin
            # and training gets there, only later (checked last: then loss[i + 1 :] has finite values)
            if beaten_by_none and np.nanmin(loss[i + 1 :]) <= loss[i] + margin:
                rows.append(
                    {
                        "model": str(model),
                        "step": int(ds["step"].values[m, idx[i]]),
                        "loss": loss[i],
                        "later": later.min(),
                    }
                )
    return pd.DataFrame(rows, columns=["model", "step", "loss", "later"])


def mislabelled(ds: xr.Dataset) -> list[str]:
    """One sentence per group of identical checkpoints and per out-of-order checkpoint, with the defaults
    of `identical_weights` and `out_of_order` (the perplexity study's findings and `tokendyn info`)."""
    lines = [
        f"Checkpoints of {row.model} at steps {', '.join(map(str, row.steps))} have identical weights "
        "(a known defect of some public suites): check those revisions."
        for row in identical_weights(ds).itertuples()
    ]
    window = default_of(out_of_order, "window")
    lines += [
        f"The checkpoint of {row.model} at step {row.step} has a validation loss {row.loss:.3f} nats, below "
        f"each of the next {window} checkpoints (lowest {row.later:.3f}): its weights may come from later in training."
        for row in out_of_order(ds).itertuples()
    ]
    return lines
