"""The `ds.tokendyn` accessor: domain methods on a tokendyn dataset, delegating to the analysis modules.

Each analysis method is the analysis function itself with the dataset as its first argument: its
signature (parameters and their defaults, defined once, in the function) and its docstring are the
function's, so `help(ds.tokendyn.trend_categories)` documents every parameter. The analysis module
is imported on first use: clustering pulls in scikit-learn, which `import tokendyn` should not pay for.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import xarray as xr

from tokendyn.data.corpus import PAD
from tokendyn.errors import TokendynError


def context_ids(ds: xr.Dataset, token: int, width: int) -> list[int]:
    """Ids of up to `width` stored tokens of the same document before `token`, then the token's own id."""
    around = ds[["token_id", "doc"]].isel(token=slice(max(0, token - width), token + 1))  # not the whole arrays
    ids, docs = around["token_id"].values, around["doc"].values
    return [int(i) for i in ids[docs == docs[-1]]]


class Delegate:
    """An accessor method that calls `tokendyn.analysis.<module>.<function>(obj, ...)`.

    Read on the class, it is a function with the analysis function's signature (first parameter
    renamed `self`); read on an accessor, a callable bound to the accessor's object, with the
    function's signature minus its first parameter and the function's docstring.
    """

    def __init__(self, module: str, function: str | None = None) -> None:
        self.module = module
        self.function = function

    def __set_name__(self, owner: type, name: str) -> None:
        self.function = self.function or name

    def target(self) -> Callable[..., Any]:
        """The analysis function (imports its module)."""
        return getattr(importlib.import_module(f"tokendyn.analysis.{self.module}"), str(self.function))

    def __get__(self, accessor: Any, owner: type | None = None) -> Callable[..., Any]:
        func = self.target()
        signature = inspect.signature(func)
        params = list(signature.parameters.values())
        if accessor is None:
            unbound: Any = functools.wraps(func)(lambda self, *args, **kwargs: func(self._obj, *args, **kwargs))
            unbound.__signature__ = signature.replace(parameters=[params[0].replace(name="self"), *params[1:]])
            return unbound
        obj = accessor._obj

        def call(*args: Any, **kwargs: Any) -> Any:
            if "model" in obj.coords and "model" not in obj.dims:  # the analyses work per model along the dim
                model = obj["model"].item()
                raise TokendynError(
                    f"this data holds model {model!r} without its dimension (.sel(model={model!r})); "
                    f"keep the dimension: .sel(model=[{model!r}])"
                )
            return func(obj, *args, **kwargs)

        bound: Any = functools.wraps(func)(call)
        bound.__signature__ = signature.replace(parameters=params[1:])
        return bound


@xr.register_dataset_accessor("tokendyn")
class TokendynAccessor:
    """`ds.tokendyn`: the analyses of `tokendyn.analysis` as methods of a dataset from `tokendyn.open_store`."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._obj = ds

    def token_text(self, token_id: xr.DataArray | np.ndarray | None = None) -> xr.DataArray:
        """Decoded text of tokens (default: every token of the store, dims (token,); "" for -1)."""
        ids = self._obj.token_id if token_id is None else token_id
        ids = ids if isinstance(ids, xr.DataArray) else xr.DataArray(np.asarray(ids))
        vocab = self._obj.vocab_text.values
        return xr.apply_ufunc(
            lambda i: np.where(i == PAD, "", vocab[np.clip(i, 0, None)]), ids.load(), output_dtypes=[object]
        )

    def context(self, token: int, width: int = 20, mark: tuple[str, str] = ("[[", "]]")) -> str:
        """The text of up to `width` tokens of its document before `token` (an index along the token
        dim), with the token itself between `mark`. Unscored tokens (none in a rolling set) are left out."""
        vocab = self._obj.vocab_text.values
        ids = [vocab[i] for i in context_ids(self._obj, token, width)]
        return f"{''.join(ids[:-1])}{mark[0]}{ids[-1]}{mark[1]}"

    # --- looking at tokens: tokendyn.analysis.tokens ---
    by_step = Delegate("tokens")
    sel_step = Delegate("tokens")
    top_tokens = Delegate("tokens")

    # --- token trajectories: tokendyn.analysis.trajectories, trends, curves, clusters ---
    x_axis = Delegate("trajectories")
    at_perplexity = Delegate("trajectories")
    at_axis = Delegate("trajectories")
    double_descent = Delegate("trajectories")
    subset_curve = Delegate("trajectories")
    agreement = Delegate("trajectories")
    trend_categories = Delegate("trends")
    cluster = Delegate("clusters")
    curve_measures = Delegate("curves")
    rho1_classes = Delegate("curves")
    cartography = Delegate("curves")

    # --- sequence level: tokendyn.analysis.sequences (sets other than this one are read from the store) ---
    sequence_ppl = Delegate("sequences")
    pair_preference = Delegate("sequences")
    pair_margin = Delegate("sequences")
    pair_scores = Delegate("sequences")

    # --- downstream ability against loss: tokendyn.analysis.downstream (tasks and PassUntil runs of the store) ---
    task_scores = Delegate("downstream")
    emergence_threshold = Delegate("downstream", "emergence")
    pass_until = Delegate("downstream")
    task_scaling_fit = Delegate("downstream")
    skill_curves = Delegate("downstream")


@xr.register_dataarray_accessor("tokendyn")
class TokendynCurveAccessor:
    """`curve.tokendyn`: methods on a per-checkpoint curve (..., model, ckpt) with `step` and `val_ppl`."""

    def __init__(self, curve: xr.DataArray) -> None:
        self._obj = curve

    at_perplexity = Delegate("sequences", "curve_at_perplexity")
    turning_points = Delegate("sequences")
