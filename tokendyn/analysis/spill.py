"""Per-token results that memory never holds whole: written to Zarr a window of tokens at a time, and
summarised (exact medians, means, histograms) by passes over them a window at a time.

Computed whole, a lazy per-token result makes dask run many token chunks' tasks before it writes
any, and a computed one sits in memory until it is written: either way memory grows with the
number of tokens. `write_by_windows` computes and writes one window of token chunks at a time;
`spill` does that into a temporary store and hands the result back lazily (read from disk), so a
study can summarise it and return it as labels without holding it; `Summary` makes those summaries
in two passes, exactly (the median by a radix selection on the float32 bits, not an estimate).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import xarray as xr
from dask.system import CPU_COUNT
from zarr.codecs import BloscCodec

from tokendyn.store.layout import TOKEN_DIMS

# Per-token floats are noise to a compressor: LZ4 after a byte shuffle writes them in 0.3x the CPU
# time of Zarr's default Zstandard, in files 2% larger (measured on 240 MB of matched losses).
FLOAT_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
# Blocks computed per token range: twice dask's threads keeps them busy to the end of each range.
WINDOW_TASKS = 2 * CPU_COUNT
SPILLED = "tokendyn_spilled"  # encoding key of a spilled dataset: (its temporary store, group)


def prepared(data: xr.Dataset | xr.DataArray, name: str) -> xr.Dataset:
    """`data` as it is written: a Dataset without the token coordinates (they stay in the store the
    results line up with), in equal chunks per dim (Zarr needs them), floats LZ4-compressed."""
    if isinstance(data, xr.DataArray):
        data = data.to_dataset(name=data.name or name)
    data = data.drop_vars([n for n, c in data.coords.items() if n not in data.dims and set(c.dims) & set(TOKEN_DIMS)])
    data = data.map(
        lambda v: v.chunk({d: max(c) for d, c in zip(v.dims, v.chunks)}) if v.chunks else v, keep_attrs=True
    )
    for variable in data.variables.values():
        for key in ("chunks", "preferred_chunks", "compressors", "filters", "serializer"):
            variable.encoding.pop(key, None)  # chunks come from dask, not from a source store
        if variable.dtype.kind == "f":
            variable.encoding["compressors"] = (FLOAT_CODEC,)
    return data


def _windows(variable: xr.DataArray) -> Iterator[dict[str, slice]]:
    """Token ranges of whole token chunks of `variable` (its largest; Zarr's chunk after `prepared`),
    enough of them that each range has WINDOW_TASKS blocks: with fewer, dask's threads idle at the
    end of every range (3 models' blocks on 2 threads take 2 rounds, 6 take 3)."""
    axis = variable.dims.index("token")
    per_chunk = math.prod(len(c) for i, c in enumerate(variable.chunks) if i != axis)
    size = max(variable.chunks[axis]) * max(1, math.ceil(WINDOW_TASKS / per_chunk))
    for begin in range(0, variable.sizes["token"], size):
        yield {"token": slice(begin, min(begin + size, variable.sizes["token"]))}


def write_by_windows(data: xr.Dataset, store: Path, group: str, mode: str = "w") -> None:
    """Write a `prepared` dataset as `group` of `store`: its lazy per-token variables computed and
    written one token window at a time (all variables of a window together: they share its reads)."""
    lazy = [v for v in data.data_vars.values() if v.chunks is not None and "token" in v.dims]
    if not lazy:
        data.to_zarr(store, group=group, mode=mode, consolidated=False)
        return
    data.to_zarr(store, group=group, mode=mode, consolidated=False, compute=False)  # metadata, in-memory variables
    per_token = data.drop_vars([n for n, v in data.variables.items() if "token" not in v.dims])
    for where in _windows(lazy[0]):
        per_token.isel(where).to_zarr(store, group=group, region=where, consolidated=False)


def spill(data: xr.Dataset) -> xr.Dataset:
    """`data` computed into a temporary Zarr store window by window, opened back lazily.

    The temporary folder is removed when the returned dataset is garbage-collected (or at exit);
    `encoding[SPILLED]` names it, so a writer can copy the written group instead of re-encoding it.
    """
    folder = Path(tempfile.mkdtemp(prefix="tokendyn-spill-"))
    write_by_windows(prepared(data, "spilled"), folder / "spill.zarr", "data")
    opened = xr.open_zarr(folder / "spill.zarr", group="data", consolidated=False)
    opened = opened[list(data.data_vars)]  # in the order computed (Zarr lists them by name)
    opened.encoding[SPILLED] = (folder / "spill.zarr", "data")
    weakref.finalize(opened, shutil.rmtree, folder, True)
    return opened


def filled(lazy: xr.DataArray) -> xr.DataArray:
    """`lazy` computed into one array a token window at a time (its token coordinates left lazy).

    Computed whole, dask holds every chunk's result and then their concatenation, and may read
    ahead many chunks of what the result is computed from."""
    if lazy.chunks is None or "token" not in lazy.dims:
        return lazy.compute()
    out = np.empty(lazy.shape, lazy.dtype)
    axis = lazy.dims.index("token")
    for where in _windows(lazy):
        index = (slice(None),) * axis + (where["token"],)
        out[index] = lazy.isel(where).values
    return lazy.copy(data=out)


def token_windows(data: xr.Dataset) -> Iterator[xr.Dataset]:
    """`data` one token window (of its chunks) at a time, in memory."""
    variable = next(v for v in data.data_vars.values() if "token" in v.dims)
    if variable.chunks is None:
        yield data
        return
    for where in _windows(variable):
        yield data.isel(where).load()


def _keys(values: np.ndarray) -> np.ndarray:
    """float32 values as uint32 keys in the same order (negative numbers reversed below positives)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return np.where(bits & 0x80000000, ~bits, bits | 0x80000000)


def _value(key: int) -> np.float32:
    """The float32 value of a key of `_keys`."""
    bits = np.uint32(key & 0x7FFFFFFF) if key & 0x80000000 else ~np.uint32(key)
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


class Summary:
    """Median, mean, count, range and histogram of float32 values seen in parts (NaN left out, as
    numpy's nan-functions do), exactly as numpy computes them on the values whole.

    Pass 1 (`add`): counts of the keys' upper 16 bits, count and float64 sum, min and max of the
    finite values. Pass 2 (`refine`, given the histogram edges): histogram counts and the counts of the
    lower 16 bits of the values in the upper bins that hold the middle ranks, which fixes the
    median's one or two middle values exactly. Memory: two arrays of 65,536 counts.
    """

    def __init__(self) -> None:
        self.upper = np.zeros(2**16, np.int64)
        self.n = self.n_finite = 0
        self.total = 0.0
        self.low, self.high = np.float32(np.inf), np.float32(-np.inf)
        self.edges: np.ndarray | None = None
        self.counts: np.ndarray | None = None
        self.lower: dict[int, np.ndarray] = {}

    def add(self, values: np.ndarray) -> None:
        values = values[~np.isnan(values)]
        self.upper += np.bincount(_keys(values) >> 16, minlength=2**16)
        self.n += len(values)
        self.total += float(values.sum(dtype=np.float64))
        finite = values[np.isfinite(values)]
        self.n_finite += len(finite)
        if len(finite):
            self.low, self.high = min(self.low, finite.min()), max(self.high, finite.max())

    def _middle(self) -> tuple[int, ...]:
        """The ranks numpy's median averages: one for an odd count, two for an even one."""
        return tuple(sorted({(self.n - 1) // 2, self.n // 2}))

    def _bin(self, rank: int) -> int:
        return int(np.searchsorted(np.cumsum(self.upper), rank, side="right"))

    def refine(self, values: np.ndarray, edges: np.ndarray | None = None) -> None:
        values = values[~np.isnan(values)]
        if edges is not None:
            self.edges = edges
            finite = values[np.isfinite(values)]
            counts = np.histogram(finite, edges)[0]
            self.counts = counts if self.counts is None else self.counts + counts
        if not self.n:
            return
        keys = _keys(values)
        for upper in {self._bin(rank) for rank in self._middle()}:
            lower = np.bincount(keys[(keys >> 16) == upper] & 0xFFFF, minlength=2**16)
            self.lower[upper] = self.lower.get(upper, 0) + lower

    def median(self) -> float:
        """numpy's nanmedian of every value added, as a float32 (NaN without any)."""
        if not self.n:
            return np.float32(np.nan)
        middle = []
        for rank in self._middle():
            upper = self._bin(rank)
            before = int(np.cumsum(self.upper)[upper - 1]) if upper else 0
            lower = int(np.searchsorted(np.cumsum(self.lower[upper]), rank - before, side="right"))
            middle.append(_value((upper << 16) | lower))
        return np.mean(np.array(middle, dtype=np.float32))

    def mean(self) -> float:
        """numpy's nanmean of every value added (NaN if none is finite), summed in float64."""
        return np.float32(self.total / self.n) if self.n_finite else np.nan


def nanmedian(values: xr.DataArray) -> float:
    """numpy's nanmedian of a lazy float16 or float32 array (of the same dtype), read a token window
    at a time twice (`Summary`); an array in memory, or of wider floats, is passed to numpy whole."""
    if values.chunks is None or values.dtype.itemsize > 4 or "token" not in values.dims:
        return np.nanmedian(values.values)
    summary = Summary()
    windows = list(_windows(values))
    for where in windows:
        summary.add(values.isel(where).values.ravel().astype(np.float32))
    for where in windows:
        summary.refine(values.isel(where).values.ravel().astype(np.float32))
    return summary.median().astype(values.dtype)
