"""Opening a store: as a lazy, dask-backed `xarray.Dataset`, and its attributes. Never writes."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NoReturn

import numpy as np
import xarray as xr
import zarr

from tokendyn.atomic import is_partial
from tokendyn.errors import TokendynError
from tokendyn.store.chunks import chunk_files
from tokendyn.store.integrity import root_document, unreadable_chunk
from tokendyn.store.layout import (
    FORMAT_VERSION,
    MAIN_COORDS,
    METRICS,
    PER_BYTE_COORDS,
    SETS_GROUP,
    TOKEN_DIMS,
    set_path,
)

if TYPE_CHECKING:
    import dask.array as da


def list_sets(path: str | Path) -> list[str]:
    """Names of the named evaluation sets in a store (the main set excluded)."""
    return list(_set_names(str(path), metadata_stamp(path)))


def open_store(path: str | Path, set: str = "main") -> xr.Dataset:
    """Open a store (or one of its named sets) as a lazy, dask-backed `xarray.Dataset`; its variables
    without a token dimension (per checkpoint, per model) are read into memory."""
    stamp = metadata_stamp(path)
    names = _set_names(str(path), stamp)  # checks that path is a store this tokendyn reads
    if set != "main" and set not in names:
        raise TokendynError(f"store {path} has no set '{set}'; it has: {', '.join(['main', *names])}")
    # A copy whose attributes and in-memory arrays (done, step, ...) the caller may edit without
    # changing the cached dataset that later opens return; the lazy arrays are shared.
    ds = _opened(str(path), set, stamp).copy()  # new Variable objects, sharing their data
    for name, variable in ds.variables.items():
        if variable.chunks is None and name not in ds.indexes:
            variable.data = variable.data.copy()
    ds.attrs = copy.deepcopy(ds.attrs)  # lists and dicts (metrics, complete, ...)
    return ds


def within_selection(read: xr.Dataset, source: object) -> xr.Dataset:
    """`read` (another set or group of the store a dataset `source` was opened from) limited to the
    models and checkpoints `source` holds: an analysis of a selection (`ds.isel(model=[0, 2])`) stays
    within it when it reads the store's other sets. A path `source` selects nothing."""
    if not isinstance(source, xr.Dataset):
        return read
    picks = {dim: source[dim].values for dim in ("model", "ckpt") if dim in source.dims and dim in read.dims}
    return read.sel(picks) if picks else read


# Opening parses the store's consolidated metadata (every set and task of it): the studies of one
# report open the same store dozens of times. The parsed result is reused while the root metadata
# file is unchanged (every change to the store's layout rewrites it); data is read lazily either way.


def metadata_stamp(path: str | Path) -> tuple[int, int] | None:
    """The root metadata file's modification time and size (None when there is none). Writers
    rewrite that file whenever they commit a checkpoint (`write.commit_checkpoint`) or change the layout, so
    it keys caches of what was read from the store."""
    try:
        info = (Path(path) / "zarr.json").stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


@functools.lru_cache(maxsize=8)
def _set_names(path: str, stamp: tuple[int, int] | None) -> tuple[str, ...]:
    sets = open_group(path, mode="r").get(SETS_GROUP)
    if not isinstance(sets, zarr.Group):
        return ()
    return tuple(sorted(name for name in sets.group_keys() if not is_partial(name)))  # a set being created is not one


@functools.lru_cache(maxsize=64)
def _opened(path: str, set: str, stamp: tuple[int, int] | None) -> xr.Dataset:
    ds = xr.open_zarr(path, group=set_path(set) or None)
    # Per-checkpoint variables (done, step, val_ppl, ...) are tiny but stored a (1, 1) chunk per
    # checkpoint: read through dask, every computation touching them re-read every chunk (in the
    # built-in demo's report, most of the time spent reading its small sets). They are read once
    # here, without dask (one read per variable), for as long as the store's metadata is unchanged.
    small = [name for name, variable in ds.variables.items() if not any(d in TOKEN_DIMS for d in variable.dims)]
    try:
        ds.update(xr.open_zarr(path, group=set_path(set) or None, chunks=None)[small].load())
    except Exception as err:  # codecs raise assorted exception types on a damaged chunk: name the file
        _raise_unreadable(Path(path) / set_path(set), small, err)
    # The per-token metrics (loss, ...) are most of every read: their chunk files are read directly
    # (`tokendyn.store.chunks`), without zarr's per-chunk overhead, where the layout allows.
    for name in METRICS:
        array = _chunk_files(Path(path) / set_path(set) / name) if name in ds.data_vars else None
        if array is not None and array.chunks == ds[name].data.chunks and array.dtype == ds[name].dtype:
            ds[name] = ds[name].copy(data=array)
    if set == "main":  # written just before the done flag: a killed run can leave them for an unfinished checkpoint
        for name in ("val_ppl", *PER_BYTE_COORDS):
            if name in ds.variables:
                ds[name] = ds[name].where(ds["done"])
    else:
        main = _opened(path, "main", stamp)
        ds = ds.assign_coords({name: main[name] for name in MAIN_COORDS if name in main.variables})
    # A killed (or --force) run leaves the chunks it wrote of a checkpoint it did not finish; a model's
    # padding (no step) has no chunks, so a store of unequal models keeps its plain chunk reads.
    if (~ds["done"] & ds["step"].notnull()).any():
        for name in METRICS:
            if name in ds.data_vars:
                ds[name] = ds[name].where(ds["done"])
    ds.attrs["tokendyn_set"] = set
    return ds


def _chunk_files(folder: Path) -> da.Array | None:
    """`chunk_files`, or None (zarr's reader, from the consolidated metadata) when the array's own
    zarr.json is unreadable: `tokendyn verify` reports it and a writer restores it."""
    try:
        return chunk_files(folder)
    except (OSError, ValueError):
        return None


def _raise_unreadable(group: Path, names: Iterable[str], err: Exception) -> NoReturn:
    """A one-line error naming the first unreadable chunk of the arrays `names` of `group`, else `err` again."""
    for name in names:
        bad = unreadable_chunk(group / name)
        if bad is not None:
            raise TokendynError(
                f"store file {bad[0]} is unreadable ({bad[1]}); `tokendyn verify` lists every damaged file "
                "and rerunning the extract command repairs the store"
            ) from err
    raise err


def read_attrs(path: str | Path) -> dict:
    """The root attributes of a tokendyn store."""
    return dict(open_group(path, mode="r").attrs)


def open_group(path: str | Path, mode: Literal["r", "r+"]) -> zarr.Group:
    """The root group of a tokendyn store; a one-line error for anything else."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise TokendynError(f"{path} is not a tokendyn store (no zarr.json); create it with `tokendyn extract`")
    root_document(path)  # a one-line error if it is unreadable
    root = zarr.open_group(path, mode=mode)
    if "tokendyn_version" not in root.attrs:
        raise TokendynError(f"{path} is a Zarr store but not a tokendyn store; pass a store made by `tokendyn extract`")
    version = root.attrs.get("format_version", 1)
    if version != FORMAT_VERSION:
        raise TokendynError(
            f"store {path} has format {version}, this tokendyn reads format {FORMAT_VERSION}; "
            "rescore with `tokendyn extract SUITE --out NEW.zarr`"
        )
    return root


def store_path(ds: xr.Dataset) -> Path | None:
    """The store a dataset was opened from (None for a dataset built in memory)."""
    source = ds.encoding.get("source")
    return Path(source) if source else None


def read_checkpoint(
    root: zarr.Group, set_name: str, model: int, ckpt: int, names: Iterable[str]
) -> dict[str, np.ndarray]:
    """The stored values of one checkpoint of one set, per variable name (arrays with dims model, ckpt, ...)."""
    group = root[set_path(set_name)] if set_name != "main" else root
    return {
        name: np.asarray(zarr.open_array(group.store, path=f"{group.path}/{name}".lstrip("/"), mode="r")[model, ckpt])
        for name in names
    }
