"""Reading the per-token metrics' chunk files without zarr (`tokendyn.store.chunks`): the values zarr
reads, with chunks that have no file and edge chunks; other layouts are left to zarr."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

import tokendyn
from planted_stores import write_store
from tokendyn.store.chunks import chunk_files


def test_open_store_reads_what_zarr_reads(tmp_path):
    loss = np.random.default_rng(0).uniform(0, 9, (2, 3, 5, 9))
    steps = np.array([[0, 10, np.nan], [0, 10, 20]])  # model 0's last checkpoint was never scored
    path = tmp_path / "s.zarr"
    write_store(path, loss, steps, seq_chunk=3)  # 40 tokens in chunks of 24: an edge chunk
    ds = tokendyn.open_store(path)
    assert ds["loss"].data.name.startswith("chunk-files")  # read without zarr
    assert not (path / "loss" / "c" / "0" / "2" / "0").exists()  # an all-NaN chunk has no file
    stored = zarr.open_array(path / "loss", mode="r")[...]
    np.testing.assert_array_equal(ds["loss"].values, stored)
    assert np.isnan(ds["loss"].values[0, 2]).all() and np.isfinite(ds["loss"].values[1]).all()
    block = ds["loss"].data.blocks[1, 1, 1].compute()
    assert block.shape == (1, 1, 16) and block.flags.writeable


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("compressors", [(ZstdCodec(level=3),), None])
def test_chunk_files_equal_zarr(tmp_path, dtype, compressors):
    values = np.random.default_rng(1).normal(size=(2, 3, 70)).astype(dtype)
    values[1, 2] = np.nan
    array = zarr.create_array(
        tmp_path / "a", shape=values.shape, chunks=(1, 2, 32), dtype=dtype, fill_value=np.nan, compressors=compressors
    )
    array[...] = values
    read = chunk_files(tmp_path / "a")
    assert read is not None and read.chunks == ((1, 1), (2, 1), (32, 32, 6))
    np.testing.assert_array_equal(read.compute(), array[...])


@pytest.mark.parametrize(
    "options",
    [
        {"compressors": (BloscCodec(cname="lz4"),)},  # a codec this reader does not decode
        {"shards": (1, 2, 64)},  # chunks inside shard files
        {"dtype": "int32", "fill_value": 0},  # not a metric's float
    ],
)
def test_other_layouts_are_left_to_zarr(tmp_path, options):
    options = {"dtype": "float32", "fill_value": np.nan, **options}
    zarr.create_array(tmp_path / "a", shape=(2, 3, 70), chunks=(1, 2, 32), **options)
    assert chunk_files(tmp_path / "a") is None


def test_a_folder_without_array_metadata_is_left_to_zarr(tmp_path):
    assert chunk_files(tmp_path / "not-an-array") is None
