"""`ds.tokendyn` methods are the analysis functions: same parameters, same defaults, same docstrings."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import xarray as xr

from planted_stores import write_store
from tokendyn.analysis import clusters, curves, downstream, sequences, tokens, trajectories, trends
from tokendyn.analysis.accessor import TokendynAccessor, TokendynCurveAccessor

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
