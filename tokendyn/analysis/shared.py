"""Per-token results that several studies use, computed once per `tokendyn analyze` run.

The trend categories are used by the trend, subset and cluster studies, the double-descent flags by
the double-descent and cluster studies; each computation reads the whole store. Inside `sharing()`
(which `tokendyn analyze` and `tokendyn report` hold while they run the studies) `computed` keeps
each result it computes, keyed by the function, the dataset and the parameters, and hands a copy to
every later caller that asks for the same; outside `sharing()` it just computes. Only small results
are shared this way (int8 or boolean per token and model). They are kept on disk, in a temporary
folder that `sharing()` removes (under TMPDIR), not in memory: held between studies, they would
add their bytes per token to the peak of every later study. `alongside` computes such results in
the same pass over the store as another computation that reads every chunk (the subset curves read
the chunks the double-descent flags need).
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr


@dataclass
class _Kept:
    """A shared result on disk: its values in `path` (.npy), the rest (coordinates, attributes) in
    `shell`, whose data is a zero-stride view of one value; the loss array it was computed from is
    held so that a key made from that array's id() cannot pass to another array."""

    wanted: np.ndarray | None
    shell: xr.DataArray
    path: Path
    loss: Any

    def load(self) -> xr.DataArray:
        return self.shell.copy(data=np.load(self.path))


@dataclass
class _Shared:
    folder: Path
    results: dict[tuple, list[_Kept]] = field(default_factory=dict)


_RESULTS: ContextVar[_Shared | None] = ContextVar("tokendyn_shared_results", default=None)


@contextmanager
def sharing() -> Iterator[None]:
    """While held, `computed` keeps its results (in a temporary folder) and serves repeated requests from them."""
    with tempfile.TemporaryDirectory(prefix="tokendyn-shared-") as folder:
        token = _RESULTS.set(_Shared(Path(folder)))
        try:
            yield
        finally:
            _RESULTS.reset(token)


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a parameter value (lists and arrays become tuples)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(_frozen(v) for v in np.asarray(value, dtype=object).ravel())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _dataset_key(ds: xr.Dataset) -> tuple:
    """What identifies a dataset's per-token results: its loss array (the dask graph's name, which
    shallow copies of the dataset share) and the checkpoints' done flags and steps."""
    loss = ds["loss"].data
    small = tuple(np.asarray(ds[name].values).tobytes() for name in ("done", "step") if name in ds.variables)
    return (getattr(loss, "name", None) or id(loss), ds.sizes["model"], small)


def _key(function: Callable[..., xr.DataArray], ds: xr.Dataset, along: str | None, params: dict) -> tuple:
    """(the key of function's result on ds with params, the requested values of `along` or None)."""
    bound = inspect.signature(function).bind(ds, **params)
    bound.apply_defaults()
    arguments = dict(list(bound.arguments.items())[1:])
    wanted = np.atleast_1d(arguments.pop(along)) if along else None
    key = (
        function.__module__,
        function.__qualname__,
        _dataset_key(ds),
        tuple((name, _frozen(value)) for name, value in sorted(arguments.items())),
    )
    return key, wanted


def _keep(shared: _Shared, key: tuple, wanted, result: xr.DataArray, ds: xr.Dataset) -> None:
    path = shared.folder / f"{sum(len(kept) for kept in shared.results.values())}.npy"
    np.save(path, result.values)
    shell = result.copy(data=np.broadcast_to(np.zeros((), result.dtype), result.shape))
    shared.results.setdefault(key, []).append(_Kept(wanted, shell, path, ds["loss"].data))


def computed(
    function: Callable[..., xr.DataArray], ds: xr.Dataset, along: str | None = None, **params: Any
) -> xr.DataArray:
    """`function(ds, **params)` computed into memory; inside `sharing()`, computed once per dataset
    and parameters.

    along: a parameter of `function` that lists values of the result's dimension of the same name
    (the trend categories' `start`): a result kept for more values serves a request for some of
    them (by `.sel`).
    """
    shared = _RESULTS.get()
    if shared is None:
        return _in_memory(function(ds, **params))
    key, wanted = _key(function, ds, along, params)
    for kept in shared.results.get(key, []):
        if wanted is None:
            return kept.load()
        if np.isin(wanted, kept.wanted).all():
            return kept.load().sel({along: wanted})
    result = _in_memory(function(ds, **params))
    _keep(shared, key, wanted, result, ds)
    return result


def _in_memory(result: xr.DataArray, data: Any = None) -> xr.DataArray:
    """`result` with its values (`data`, else computed) in memory and its coordinates as they were:
    computing it whole would also load its lazy per-token coordinates (token_id, doc, offset, ...:
    8 bytes per token each, more than an int8 result itself)."""
    return result.copy(data=dask.compute(result.data)[0] if data is None else data)


def alongside(ds: xr.Dataset, lazy: Any, requests: Sequence[tuple[Callable[..., xr.DataArray], dict]]) -> Any:
    """`lazy` (a dask collection over ds's loss) computed in one pass with the shared results
    `requests` ((function, params) pairs, as `computed` takes them) that are not held yet, which
    are then kept for the studies that ask for them: the store's chunks both read are read once.
    Outside `sharing()` only `lazy` is computed."""
    shared = _RESULTS.get()
    pending = []
    for function, params in requests if shared is not None else ():
        key, _ = _key(function, ds, None, params)
        if key not in shared.results:
            pending.append((key, function(ds, **params)))
    value, *extra = dask.compute(lazy, *(result.data for _, result in pending))
    for (key, result), data in zip(pending, extra):
        _keep(shared, key, None, _in_memory(result, data), ds)
    return value
