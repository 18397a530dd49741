"""`python -m tokendyn.pipelines.warm` (run by scripts/setup) compiles what the studies need, on both loss dtypes."""

from __future__ import annotations

import numba

from tokendyn.analysis import clusters, curves, trajectories, trends
from tokendyn.pipelines.analyze import run_studies
from tokendyn.pipelines.warm import DTYPES, warm
from tokendyn.studies import STUDIES

# The studies that read only the loss and its coordinates; each runs a compiled kernel.
LOSS_STUDIES = {
    "perplexity",
    "trend_categories",
    "subset_curves",
    "double_descent",
    "agreement",
    "clusters",
    "curve_measures",
    "token_view",
}


def compiled() -> dict[str, tuple]:
    """Every compiled kernel's signatures so far in this process."""
    return {
        f"{module.__name__}.{name}": tuple(value.signatures)
        for module in (clusters, curves, trajectories, trends)
        for name, value in vars(module).items()
        if isinstance(value, numba.core.registry.CPUDispatcher)
    }


def test_after_the_warm_up_the_studies_compile_nothing_new(planted_store):
    ran = warm()
    assert set(ran) == set(DTYPES)
    for dtype, studies in ran.items():
        assert set(studies) >= LOSS_STUDIES, (dtype, LOSS_STUDIES - set(studies))
    before = compiled()
    ds, _ = planted_store
    assert ds["loss"].dtype == "float32"
    outcomes = list(run_studies(ds, list(STUDIES), progress=False))
    assert {o.name for o in outcomes if o.result is not None} >= LOSS_STUDIES
    assert compiled() == before
