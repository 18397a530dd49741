"""Reading a per-token array's chunk files straight into dask, for the arrays tokendyn writes.

zarr's reader costs about 1.7 ms of CPU per chunk above reading and decompressing the file (its
asyncio machinery and codec pipeline; measured with zarr 3.1 on this project's machine): about 1 s per
pass over a 1M-token x 50-checkpoint x 3-model store of 600 chunks, and the studies make several
passes. For an array in the layout tokendyn writes (a regular chunk grid, default chunk keys, the
`bytes` codec then optionally `zstd`, no sharding) each dask task here reads one chunk file and
decompresses it with numcodecs, the library zarr's own zstd codec uses. Any other layout returns None,
and the caller keeps zarr's reader.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numcodecs
import numpy as np

from tokendyn.errors import TokendynError

if TYPE_CHECKING:
    import dask.array as da

CODECS = (["bytes"], ["bytes", "zstd"])  # the codec chains read here; anything else goes through zarr
ZSTD = numcodecs.Zstd()


def chunk_files(folder: Path) -> da.Array | None:
    """The zarr v3 array at `folder` as a dask array of one task per stored chunk, or None when its
    layout is not one this reader handles (or it is not in a local folder: a store opened by URL keeps
    zarr's reader). Chunks without a file hold the fill value, as in zarr."""
    import dask.array as da  # here, not at the top: `import tokendyn` and `tokendyn --help` need not load dask (0.3 s)

    if not (folder / "zarr.json").is_file():
        return None
    meta = json.loads((folder / "zarr.json").read_text())
    layout = _layout(meta)
    if layout is None:
        return None
    dtype, chunk, separator, fill, zstd = layout
    shape = tuple(meta["shape"])
    grid = [range(math.ceil(size / width)) for size, width in zip(shape, chunk)]
    name = f"chunk-files-{folder}-{(folder / 'zarr.json').stat().st_mtime_ns}"
    graph = {}
    for index in itertools.product(*grid):
        # zarr stores edge chunks whole: the part inside the array is a slice of the decoded chunk
        part = tuple(slice(0, min(width, size - i * width)) for i, width, size in zip(index, chunk, shape))
        key = "c" + "".join(f"{separator}{i}" for i in index)
        graph[(name, *index)] = (_read_chunk, folder / key, chunk, dtype, fill, zstd, part)
    chunks = tuple(tuple(min(width, size - i * width) for i in axis) for axis, width, size in zip(grid, chunk, shape))
    return da.Array(graph, name, chunks, dtype=dtype)


def _layout(meta: dict) -> tuple[np.dtype, tuple[int, ...], str, float, bool] | None:
    """(dtype, chunk shape, key separator, fill value, zstd-compressed) of an array this reader
    handles, else None."""
    codecs = meta.get("codecs", [])
    names = [codec["name"] for codec in codecs]
    if (
        meta.get("node_type") != "array"
        or meta.get("storage_transformers")
        or meta.get("chunk_grid", {}).get("name") != "regular"
        or meta.get("chunk_key_encoding", {}).get("name") != "default"
        or names not in CODECS
        or codecs[0].get("configuration", {}).get("endian", "little") != "little"
        or meta.get("data_type") not in ("float16", "float32", "float64")
    ):
        return None
    fill = meta.get("fill_value")
    if fill is None or (isinstance(fill, str) and fill not in ("NaN", "Infinity", "-Infinity")):
        return None  # no fill value, or one given as raw bits: left to zarr
    separator = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
    chunk = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    return np.dtype(meta["data_type"]).newbyteorder("<"), chunk, separator, float(fill), "zstd" in names


def _read_chunk(
    path: Path, chunk: tuple[int, ...], dtype: np.dtype, fill: float, zstd: bool, part: tuple[slice, ...]
) -> np.ndarray:
    """One stored chunk (its `part` inside the array), decoded into a new writable array; the fill
    value where there is no file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return np.full(tuple(s.stop for s in part), fill, dtype)
    values = np.empty(chunk, dtype)
    try:
        if zstd:
            ZSTD.decode(raw, out=values)
        else:
            values.reshape(-1)[:] = np.frombuffer(raw, dtype)
    except Exception as err:  # noqa: BLE001  (codecs raise assorted types for a damaged file)
        store = min((p for p in path.parents if (p / "zarr.json").is_file()), key=lambda p: len(p.parts))
        raise TokendynError(
            f"chunk file {path} is unreadable ({str(err).splitlines()[0][:80] or type(err).__name__}); "
            f"run `tokendyn verify {store}`, then rerun extract to recompute it"
        ) from None
    return values[part]
