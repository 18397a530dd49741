"""The store's names are defined once (tokendyn.store.layout) and fields cannot take them."""

from __future__ import annotations

import json
import warnings

import pytest

from tokendyn.data.tasks import read_task
from tokendyn.errors import TokendynError
from tokendyn.store import CHECKPOINT_COORDS, MAIN_COORDS, METRICS, SET_NAMES, TOKEN_DIMS, check_field_names
from tokendyn.store import passuntil as runs_store


def test_set_names_cover_the_layout():
    assert {*TOKEN_DIMS, *CHECKPOINT_COORDS, *MAIN_COORDS, *METRICS, "model", "ckpt", "token_id"} <= SET_NAMES
    # PassUntil runs attach these from the main set: each is a coordinate of the main set.
    assert set(runs_store.ATTACHED_COORDS) <= SET_NAMES


def test_fields_named_like_the_store_are_refused():
    check_field_names(["skills", "difficulty"], "task 'x'")
    with pytest.raises(TokendynError, match=r"^task 'x': field 'loss', 'val_ppl' is a name the store uses; rename it$"):
        check_field_names(["val_ppl", "skills", "loss"], "task 'x'")


def test_task_items_cannot_replace_generated_fields(tmp_path):
    path = tmp_path / "t.jsonl"
    line = {"question": "2+2?", "choices": ["4", "5"], "answer": 0}
    path.write_text(json.dumps({**line, "loss": 1}) + "\n")
    assert read_task(path).items[0].fields == {"loss": 1}  # refused when scored, by the store's check
    path.write_text(json.dumps({**line, "n_options": 3}) + "\n")
    with pytest.raises(TokendynError, match="field 'n_options', which tokendyn sets itself"):
        read_task(path)


def test_open_store_reuses_the_parsed_store_until_it_changes(tmp_path):
    """A reopened store is the parsed one while its metadata is unchanged, never the same object
    (callers' attribute changes stay theirs), and a change to the store is seen at once."""
    import zarr

    import tokendyn
    from planted_stores import planted_suite

    path = tmp_path / "p.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's note that consolidated metadata is not in the v3 spec
        planted_suite(path)
    first = tokendyn.open_store(path)
    first.attrs["mine"] = True
    again = tokendyn.open_store(path)
    assert again is not first and "mine" not in again.attrs and again["loss"].data.name == first["loss"].data.name
    root = zarr.open_group(path, mode="r+")
    root.attrs["note"] = "changed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(path)
    assert tokendyn.open_store(path).attrs["note"] == "changed"


@pytest.mark.parametrize("store_dtype", ["float32", "float16"])
def test_template_has_the_metadata_xarray_writes(tmp_path, store_dtype):
    """The metric arrays are created with zarr (no dask); every node's metadata equals xarray's own
    writing of the same layout with the metrics as lazy dask arrays."""
    import dask.array as da
    import numpy as np
    import xarray as xr

    from tokendyn.data.corpus import ScoredSet
    from tokendyn.store import Layout, token_chunk, write

    n = 37
    packed = ScoredSet(
        name="main",
        token_id=np.arange(n),
        doc=np.repeat([0, 1], [20, 17]),
        offset=np.r_[np.arange(20), np.arange(17)],
        n_context=np.arange(n),
        token_fields={"label": np.array(["a", "b"] * 18 + ["a"], dtype=object)},
        windows=[],
        targets=[],
        params={"seq_len": 8},
        n_documents=2,
        n_bytes=100,
        n_words=20,
    )
    coords = {
        "model": np.array(["m1", "m2"], dtype=object),
        "step": np.array([[0.0, 10, 20], [0, 10, np.nan]]),
        "tokens_seen": np.full((2, 3), np.nan),
        "source": np.full((2, 3), "x", dtype=object),
        "n_params": np.array([10, 20]),
        "n_params_nonembed": np.array([5, 10]),
    }
    layout = Layout(suite={"models": []}, tokenizer_fingerprint="f", metrics=METRICS, store_dtype=store_dtype)
    vocab = np.array(["a", " b", "c"], dtype=object)
    template = write._set_template("main", packed, layout, coords, vocab, "0.0")
    write._write_template(tmp_path / "ours", template, packed, layout)

    chunks = (1, 1, token_chunk(n))
    metrics = {
        m: xr.Variable(
            write.METRIC_DIMS, da.full((2, 3, n), np.nan, dtype=store_dtype, chunks=chunks), write.METRIC_ATTRS[m]
        )
        for m in METRICS
    }
    encoding = {**write._encoding(template, packed), **{m: {"chunks": chunks} for m in METRICS}}
    template.assign(metrics).to_zarr(
        tmp_path / "xarray", mode="w-", compute=False, consolidated=False, encoding=encoding, zarr_format=3
    )
    ours = {p.relative_to(tmp_path / "ours"): json.loads(p.read_text()) for p in (tmp_path / "ours").rglob("zarr.json")}
    ref = {
        p.relative_to(tmp_path / "xarray"): json.loads(p.read_text()) for p in (tmp_path / "xarray").rglob("zarr.json")
    }
    assert set(ours) == set(ref) and len(ours) > len(METRICS) + 1
    for path in ref:
        assert ours[path] == ref[path], path
    assert xr.open_zarr(tmp_path / "ours", consolidated=False).identical(
        xr.open_zarr(tmp_path / "xarray", consolidated=False)
    )
