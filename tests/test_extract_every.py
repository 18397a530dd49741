"""`extract(every=...)`: a named set scored at every k-th checkpoint (and the last) stays not done at the
others, the main set keeps every checkpoint, and a later run without `every` fills the gaps."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_suite
from tokendyn import store
from tokendyn.config.suite import EvalSet, load_suite
from tokendyn.errors import TokendynError
from tokendyn.models.extract import extract, scored_at
from tokendyn.store.read import open_group


def test_scored_at_keeps_every_kth_checkpoint_and_the_last():
    assert [c for c in range(6) if scored_at(c, 6, 2)] == [0, 2, 4, 5]
    assert [c for c in range(7) if scored_at(c, 7, 3)] == [0, 3, 6]
    assert [c for c in range(3) if scored_at(c, 3, 1)] == [0, 1, 2]


def _done(out, name: str) -> np.ndarray:
    root = open_group(out, mode="r")
    return np.asarray((root if name == "main" else root[store.set_path(name)])["done"][...])


def test_a_sparse_set_is_done_at_its_checkpoints_only_until_a_full_run(tmp_path):
    suite_path = write_suite(tmp_path, steps=(0, 10, 20, 30, 40))
    suite = load_suite(suite_path)
    noisy = EvalSet(name="noisy", files=suite.eval.files, seq_len=suite.eval.seq_len, corrupt=0.5, seed=0)
    out = tmp_path / "s.zarr"
    extract(suite, out, extra_sets=[noisy], every={"noisy": 2}, progress=False)
    assert _done(out, "main").tolist() == [[True] * 5]
    assert _done(out, "noisy").tolist() == [[True, False, True, False, True]]
    sparse = store.open_store(out, set="noisy")["loss"].where(store.open_store(out, set="noisy")["done"])
    assert np.isnan(sparse.isel(ckpt=1).values).all() and np.isfinite(sparse.isel(ckpt=2).values).any()
    first = store.read_checkpoint(open_group(out, mode="r"), "noisy", 0, 2, ("loss",))["loss"]

    extract(suite, out, extra_sets=[noisy], progress=False)  # without `every`: the gaps are filled
    assert _done(out, "noisy").all()
    again = store.read_checkpoint(open_group(out, mode="r"), "noisy", 0, 2, ("loss",))["loss"]
    np.testing.assert_array_equal(again, first)  # what was done is kept, not rescored differently


@pytest.mark.parametrize(("every", "message"), [({"main": 2}, "not a named"), ({"noisy": 0}, "at least 1")])
def test_every_refuses_unknown_sets_and_counts_below_one(tmp_path, every, message):
    suite = load_suite(write_suite(tmp_path, steps=(0, 10)))
    noisy = EvalSet(name="noisy", files=suite.eval.files, seq_len=suite.eval.seq_len, corrupt=0.5, seed=0)
    with pytest.raises(TokendynError, match=message):
        extract(suite, tmp_path / "s.zarr", extra_sets=[noisy], every=every, progress=False)
    assert not (tmp_path / "s.zarr").exists()
