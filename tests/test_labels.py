"""Per-token labels are plain xarray: int8 codes with CF flag attributes, and derived arrays carry their own."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from xarray.plot.utils import label_from_attrs

from planted_stores import planted_suite
from tokendyn.analysis.curves import RHO1_CLASSES, rho1_classes
from tokendyn.analysis.labels import MISSING, flag_array, flag_code, flag_names, label_mask, label_share, label_text
from tokendyn.analysis.trajectories import token_share
from tokendyn.analysis.trends import CATEGORIES, trend_categories
from tokendyn.errors import TokendynError


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_suite(tmp_path_factory.mktemp("labels") / "planted.zarr", n_seq=8)


def _check_flags(labels: xr.DataArray, names) -> None:
    assert labels.dtype == np.int8
    assert list(labels.attrs["flag_values"]) == list(range(len(names)))
    assert labels.attrs["flag_meanings"].split() == [n.replace(" ", "_") for n in names]
    assert flag_names(labels) == tuple(names)
    assert "units" not in labels.attrs  # codes are not nats, even though the loss they come from is
    assert labels.attrs["long_name"]


def test_analyses_return_cf_flag_arrays(planted):
    ds, _ = planted
    cats = trend_categories(ds, start=[0.2, 0.4])
    _check_flags(cats, CATEGORIES)
    assert cats.name == "trend" and cats.dims == ("model", "start", "token")
    rho = rho1_classes(ds)
    _check_flags(rho, RHO1_CLASSES)
    assert rho.attrs["threshold_units"] == "nats"
    result = ds.tokendyn.cluster(3)
    _check_flags(result.labels, result.names)


def test_labels_survive_a_zarr_round_trip(planted, tmp_path):
    ds, _ = planted
    cats = trend_categories(ds, start=0.2).compute()
    cats.to_dataset().to_zarr(tmp_path / "labels.zarr", zarr_format=3, consolidated=False)
    back = xr.open_zarr(tmp_path / "labels.zarr", consolidated=False)["trend"]
    _check_flags(back, CATEGORIES)
    np.testing.assert_array_equal(back.values, cats.values)
    assert label_share(back).equals(label_share(cats))


def test_share_text_and_mask_against_a_plain_count():
    codes = xr.DataArray(
        np.array([[0, 1, 1, MISSING, 2, 2, 2, 0]], dtype=np.int64),
        dims=("model", "token"),
        attrs={"units": "nats", "long_name": "loss"},
    )
    labels = flag_array(codes, ["low", "high loss", "mid"], "kind", "kind of token")
    assert labels.attrs == {
        "long_name": "kind of token",
        "flag_values": labels.attrs["flag_values"],
        "flag_meanings": "low high_loss mid",
        "comment": "-1: no label",
    }
    assert flag_names(labels) == ("low", "high loss", "mid") and flag_code(labels, "mid") == 2
    share = label_share(labels)
    assert share.dims == ("model", "category") and list(share["category"].values) == ["low", "high loss", "mid"]
    np.testing.assert_allclose(share.values[0], [100 * 2 / 7, 100 * 2 / 7, 100 * 3 / 7])
    assert share.attrs["units"] == "%"
    assert label_from_attrs(share).replace("\n", " ") == "share of labelled tokens (kind of token) [%]"
    assert label_text(labels).values.tolist() == [["low", "high loss", "high loss", "", "mid", "mid", "mid", "low"]]
    mask = label_mask(labels, "high loss")
    assert mask.dtype == bool and int(mask.sum()) == 2 and "units" not in mask.attrs
    with pytest.raises(TokendynError, match="unknown label 'none'; the labels are low, high loss, mid"):
        label_mask(labels, "none")
    with pytest.raises(TokendynError, match="no flag_meanings"):
        flag_names(codes)


def test_derived_arrays_describe_themselves(planted):
    ds, _ = planted
    ds = ds.copy()
    ds["loss"].attrs.update(units="nats", long_name="negative log-likelihood of the token")
    measures = ds.tokendyn.curve_measures()
    expected_units = {
        "final_loss": "nats",
        "final_variability": "nats",
        "forgettability": "nats",
        "age_of_acquisition": None,
        "confidence": None,
        "variability": None,
    }
    derived = {
        **{name: measures[name] for name in expected_units},
        "double_descent": ds.tokendyn.double_descent(),
        "subset_curve": ds.tokendyn.subset_curve(ds.token_id >= 0),
        "at_perplexity": ds.tokendyn.at_perplexity(n_levels=3),
        "token_share": token_share(ds, ds.tokendyn.double_descent()),
    }
    expected_units.update(double_descent=None, subset_curve=None, at_perplexity="nats", token_share="%")
    for name, da in derived.items():
        assert da.attrs.get("units") == expected_units[name], name
        assert da.attrs["long_name"] != ds["loss"].attrs["long_name"], name
