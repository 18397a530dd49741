"""`ds.tokendyn` methods are the analysis functions: same parameters, same defaults, same docstrings."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import xarray as xr

import tokendyn
from planted_stores import write_store
from tokendyn.analysis import clusters, curves, downstream, sequences, tokens, trajectories, trends
from tokendyn.analysis.accessor import TokendynAccessor, TokendynCurveAccessor
from tokendyn.analysis.labels import MISSING

DATASET_METHODS = {
    "x_axis": trajectories.x_axis,
    "at_perplexity": trajectories.at_perplexity,
    "at_axis": trajectories.at_axis,
    "double_descent": trajectories.double_descent,
    "subset_curve": trajectories.subset_curve,
    "agreement": trajectories.agreement,
    "trend_categories": trends.trend_categories,
    "cluster": clusters.cluster,
    "curve_measures": curves.curve_measures,
    "rho1_classes": curves.rho1_classes,
    "cartography": curves.cartography,
    "sequence_ppl": sequences.sequence_ppl,
    "pair_preference": sequences.pair_preference,
    "pair_margin": sequences.pair_margin,
    "pair_scores": sequences.pair_scores,
    "task_scores": downstream.task_scores,
    "emergence_threshold": downstream.emergence,
    "pass_until": downstream.pass_until,
    "task_scaling_fit": downstream.task_scaling_fit,
    "skill_curves": downstream.skill_curves,
    "by_step": tokens.by_step,
    "sel_step": tokens.sel_step,
    "top_tokens": tokens.top_tokens,
}
CURVE_METHODS = {"at_perplexity": sequences.curve_at_perplexity, "turning_points": sequences.turning_points}


def _without_first(func) -> inspect.Signature:
    signature = inspect.signature(func)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    loss = np.random.default_rng(0).uniform(1, 3, (1, 4, 2, 5))
    return write_store(tmp_path_factory.mktemp("accessor") / "s.zarr", loss, np.array([[0, 10, 20, 30]], float))


def test_every_analysis_method_is_listed():
    methods = {name for name, value in vars(TokendynAccessor).items() if not name.startswith("_")}
    assert methods - {"token_text", "context"} == set(DATASET_METHODS)
    assert {n for n in vars(TokendynCurveAccessor) if not n.startswith("_")} == set(CURVE_METHODS)


@pytest.mark.parametrize("name", DATASET_METHODS)
def test_dataset_methods_have_the_functions_signature_and_doc(ds, name):
    func, method = DATASET_METHODS[name], getattr(ds.tokendyn, name)
    assert inspect.signature(method) == _without_first(func)
    assert method.__doc__ == func.__doc__ and method.__doc__
    unbound = inspect.signature(getattr(TokendynAccessor, name))
    assert list(unbound.parameters)[0] == "self"
    assert list(unbound.parameters.values())[1:] == list(inspect.signature(func).parameters.values())[1:]


@pytest.mark.parametrize("name", CURVE_METHODS)
def test_curve_methods_have_the_functions_signature(ds, name):
    curve = ds["loss"].mean("token")
    assert inspect.signature(getattr(curve.tokendyn, name)) == _without_first(CURVE_METHODS[name])


def test_methods_call_the_function_with_the_dataset(ds):
    xr.testing.assert_identical(ds.tokendyn.x_axis("tokens_seen"), trajectories.x_axis(ds, "tokens_seen"))
    xr.testing.assert_identical(ds.tokendyn.double_descent(tol=0.2), trajectories.double_descent(ds, 0.2))
    curve = ds["loss"].mean("token").compute()
    xr.testing.assert_identical(curve.tokendyn.turning_points(tol=0.01), sequences.turning_points(curve, 0.01))


def test_open_store_returns_independent_in_memory_arrays(ds):
    """Editing one opened dataset's done flags or steps reaches neither the store nor later opens."""
    path = ds.encoding["source"]
    first = tokendyn.open_store(path)
    first["done"][:, 2:] = False
    first["step"].values[0, 1] = 999
    first.attrs.setdefault("complete", {})["m0"] = []
    again = tokendyn.open_store(path)
    assert again["done"].values.all() and again["step"].values[0, 1] == 10
    assert again.attrs.get("complete", {}).get("m0") != []


def test_single_model_without_its_dimension_is_a_one_line_error(ds):
    one = ds.sel(model="m0")
    with pytest.raises(tokendyn.TokendynError, match=r"keep the dimension: \.sel\(model=\['m0'\]\)"):
        one.tokendyn.double_descent()
    assert ds.sel(model=["m0"]).tokendyn.double_descent().sizes["model"] == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda d: d.double_descent(window=0),
        lambda d: d.curve_measures(window=0),
        lambda d: d.double_descent(tol=0),
        lambda d: d.double_descent(min_fall=-1),
    ],
)
def test_smoothing_window_and_tolerances_are_checked(ds, call):
    with pytest.raises(tokendyn.TokendynError, match="window = 0|tol = 0|min_fall = -1"):
        call(ds.tokendyn)


def test_rho1_classes_leave_a_model_with_one_trained_checkpoint_unlabelled(ds):
    with pytest.warns(UserWarning, match="m0 left unlabelled"):
        classes = ds.isel(ckpt=[0, 3]).tokendyn.rho1_classes()  # step 0 and one trained checkpoint
    assert (classes.values == MISSING).all()


def test_top_tokens_asks_for_one_start_of_trend_labels(ds):
    labels = ds.tokendyn.trend_categories(start=[0.0, 0.25], x="index")
    with pytest.raises(
        tokendyn.TokendynError, match=r"dims \['start'\] besides the tokens; pick one, e\.g\. \.sel\(start=0\.0\)"
    ):
        ds.tokendyn.top_tokens(labels=labels)
    assert len(ds.tokendyn.top_tokens(labels=labels.sel(start=0.0), k=3)) == 3
