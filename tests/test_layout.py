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
