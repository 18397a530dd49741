"""The studies of `analyses/` on the planted three-size store: their tables (as the report on that
store wrote them) against independent computations (numpy and scipy on the raw losses, the planted
truth), their findings' logic on hand-made inputs, and skipping when the store lacks data."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import xarray as xr

import tokendyn
from planted_stores import KIND_TOKENS, KINDS, planted_report, vocabulary
from tokendyn.analysis.sequences import turning_points
from tokendyn.analysis.tokens import show_whitespace
from tokendyn.analysis.trends import STARTS
from tokendyn.pipelines.analyze import main_one
from tokendyn.studies import (
    downstream,
    pair_preference,
    perplexity,
    sequence_perplexity,
    subset_curves,
    trend_categories,
)
from tokendyn.studies.findings import direction, size_pairs, size_trend, verdict
from tokendyn.studies.study import Skip

Planted = namedtuple("Planted", "ds truth loss steps report")
OPT_SIZES = [125e6, 1.3e9, 6.7e9, 13e9, 30e9, 175e9]  # parameter counts of trend_categories.PAPER_MODELS


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Planted:
    """The planted store, its truth, raw losses (model, ckpt, token) in float64, steps (model, ckpt)
    and the folder of the report written on it."""
    folder = planted_report(tmp_path_factory)
    ds = tokendyn.open_store(folder / "p.zarr")
    truth = dict(np.load(folder / "truth.npz"))
    return Planted(ds, truth, ds["loss"].values.astype(np.float64), ds["step"].values, folder / "report")


def _table(planted: Planted, study: str, name: str) -> pd.DataFrame:
    return pd.read_csv(planted.report / study / f"{name}.csv", keep_default_na=False, na_values=[""])


def _findings(planted: Planted, study: str) -> list[str]:
    return (planted.report / study / "findings.txt").read_text().splitlines()


def _valid(truth) -> np.ndarray:
    return truth["kind"] >= 0


def _linregress_category(loss: np.ndarray, steps: np.ndarray, start: float, alpha=0.05, band=0.05) -> np.ndarray:
    """Trend category codes (token,) of one model's loss (ckpt, token), token by token with
    scipy.stats.linregress on x = log(step) (stagnated 0, upward 1, downward 2, uncategorised 3, -1 none)."""
    keep = np.isfinite(steps) & (steps > 0)
    loss, steps = loss[keep], steps[keep]
    j = int(np.searchsorted(steps, start * steps[-1]))
    x = np.log(steps[j:])
    codes = np.full(loss.shape[1:], -1)
    for t in np.flatnonzero(np.isfinite(loss[j:]).all(axis=0)):
        ppl = np.exp(loss[j:, t])
        fit = scipy.stats.linregress(x, ppl / ppl[0])
        geo = np.exp(np.log(ppl).mean())
        if fit.pvalue < alpha:
            codes[t] = 1 if fit.slope > 0 else 2
        elif abs(ppl[0] / geo - 1) <= band and abs(ppl[-1] / geo - 1) <= band:
            codes[t] = 0
        else:
            codes[t] = 3
    return codes


def test_perplexity_table_has_every_done_checkpoint_with_its_axes(planted):
    ds, _, loss, steps, _ = planted
    every = _table(planted, "perplexity", "checkpoints")
    assert len(every) == steps.size and every["done"].sum() == int(np.isfinite(steps).sum())
    table = every[every["done"]]  # 16 + 20 + 24 done checkpoints
    for row in table.itertuples():
        m = list(ds["model"].values).index(row.model)
        assert row.step == steps[m, row.ckpt]
        assert row.val_ppl == pytest.approx(np.exp(np.nanmean(loss[m, row.ckpt])), rel=1e-6)
        assert row.flops == pytest.approx(6 * float(ds["n_params"].values[m]) * row.tokens_seen)
    assert any("Larger models end lower" in line for line in _findings(planted, "perplexity"))
    assert [ax.get_xlabel() for ax in perplexity.run(ds).figure.axes][:3] == [
        "training step (log scale)",
        "tokens seen (log scale)",
        "training compute in FLOPs (6 N D) (log scale)",
    ]


def test_trend_shares_match_a_per_token_linregress(planted):
    ds, truth, loss, steps, _ = planted
    shares = _table(planted, "trend_categories", "trend_shares").set_index(["model", "start", "category"])["percent"]
    valid = _valid(truth)
    for m, model in enumerate(ds["model"].values):
        for start in STARTS:
            codes = _linregress_category(loss[m], steps[m], start)
            for code, category in enumerate(("stagnated", "upward", "downward", "uncategorised")):
                expected = 100 * (codes[valid] == code).mean()
                assert shares[(model, start, category)] == pytest.approx(expected, abs=1e-9)
            # every planted upward token rises in every model and window
            assert shares[(model, start, "upward")] >= 100 * (truth["kind"][valid] == KINDS.index("upward")).mean()


def test_trend_reference_is_the_papers_table_and_its_shape_passes_the_papers_checks():
    reference = trend_categories.paper_reference()
    assert len(reference) == 4 * 3 * 6  # uncategorised too, as 100 - the other three
    at = reference.set_index(["model", "start", "category"])["percent"]
    assert at[("OPT-125M", 0.1, "uncategorised")] == pytest.approx(100 - 5.2 - 12.5 - 38.3)
    assert at[("OPT-175B", 0.7, "stagnated")] == 29.6
    assert at[("OPT-125M", 0.1, "upward")] == 12.5
    assert at[("OPT-13B", 0.4, "downward")] == 14.7
    models = list(trend_categories.PAPER_MODELS)
    starts = sorted(reference["start"].unique())
    windows = pd.DataFrame([starts] * len(models), index=models, columns=starts)  # every start its own window
    claims = trend_categories._claims(reference, windows, models, OPT_SIZES)
    assert all("; this reproduces" in line for line in claims), claims
    flipped = reference.assign(percent=-reference["percent"])
    assert all("does not reproduce" in line for line in trend_categories._claims(flipped, windows, models, OPT_SIZES))
    # the paper's 1.3B and 6.7B with the same parameter count: the remaining sizes still show the trend
    tied = trend_categories._claims(reference, windows, models, [125e6, 1.3e9, 1.3e9, 13e9, 30e9, 175e9])
    assert "with model size; this reproduces" in tied[-1], tied
    same = trend_categories._claims(reference, windows, models, [1.3e9] * 6)
    assert same[-1].endswith(
        "with model size; this is not testable here (no two models of different sizes have a value)."
    ), same


def test_three_checkpoints_are_not_testable_rather_than_not_reproducing(tmp_path):
    from planted_stores import write_store
    from tokendyn.studies import double_descent

    rng = np.random.default_rng(0)
    steps = np.array([[0, 50, 100], [0, 50, 100]], dtype=float)
    ds = write_store(tmp_path / "three.zarr", rng.uniform(1, 4, (2, 3, 4, 8)), steps)
    findings = trend_categories.run(ds).findings
    claims = [line for line in findings if line.startswith("Paper:")]
    assert claims and all("this is not testable here (needs >= " in c and ">= 3 checkpoints in " in c for c in claims)
    assert not any("does not reproduce" in line for line in findings)
    # Trainer-like steps 100, 150, 200: the starts 10%, 20% and 40% select the same window, counted once
    trainer = write_store(tmp_path / "trainer.zarr", rng.uniform(1, 4, (2, 3, 4, 8)), steps + 100)
    cats = trend_categories.trend_categories(trainer)
    np.testing.assert_array_equal(cats["window_step"], [[100, 100, 100, np.nan]] * 2)
    claims = [line for line in trend_categories.run(trainer).findings if line.startswith("Paper:")]
    assert all(
        "this is not testable here (needs >= 3 checkpoints in >= 2 different trend windows" in c for c in claims[:3]
    )
    with pytest.raises(Skip, match="not testable here \\(needs >= 4 done checkpoints"):
        double_descent.run(ds)
    assert verdict([None, True]) == "reproduces" and verdict([None], "x") == "is not testable here (needs x)"


def test_subset_curves_track_the_choosers_upward_tokens_in_every_model(planted):
    ds, truth, loss, steps, _ = planted
    every = _table(planted, "subset_curves", "subset_curves")
    assert set(every["chosen_on"]) == {"small", "medium", "large"}
    table = every[every.chosen_on == "medium"]  # the default chooser: the second-smallest model
    medium = list(ds["model"].values).index("medium")
    upward = _linregress_category(loss[medium], steps[medium], 0.2) == 1
    assert table.loc[table.category == "upward", "subset_percent"].iloc[0] == pytest.approx(
        100 * upward[_valid(truth)].mean()
    )
    for row in table[table.category == "upward"].itertuples():
        m = list(ds["model"].values).index(row.model)
        assert row.subset_ppl == pytest.approx(np.exp(loss[m, row.ckpt][upward].mean()), rel=1e-6)
    # planted upward tokens rise with progress in every model: turned from the start, never down again
    shapes = _table(planted, "subset_curves", "subset_shapes")
    shapes = shapes[shapes.chosen_on == "medium"].set_index(["category", "model"])
    assert shapes.loc["upward", "turns"].all() and not shapes.loc["upward", "descends_again"].any()
    assert "(0 of 1)" in next(line for line in _findings(planted, "subset_curves") if "larger than the chooser" in line)
    assert not shapes.loc["stagnated", "turns"].any()


def test_subset_curves_choose_stagnated_tokens_with_their_band(planted):
    """The study's band reaches the trend categories that choose the stagnated subset (docs/methods.md §1.2)."""
    from tokendyn.studies import subset_curves

    ds = planted[0]
    medium = list(ds["model"].values).index("medium")
    for band in (0.05, 0.5):
        table = subset_curves.run(ds, band=band).tables["subset_curves"]
        share = table.loc[(table.chosen_on == "medium") & (table.category == "stagnated"), "subset_percent"].iloc[0]
        labels = ds.tokendyn.trend_categories(start=0.2, band=band).isel(model=medium, start=0)
        assert share == pytest.approx(100 * float((labels == 0).sum() / (labels >= 0).sum()))


def test_subset_shapes_find_a_planted_second_descent():
    """A curve that falls, rises to a peak and falls again is found, at the right perplexities."""
    y = np.array([[50, 30, 20, 28, 35, 25, 22], [50, 40, 30, 25, 20, 18, 17]], dtype=float)
    val_ppl = np.tile(np.geomspace(100, 10, 7), (2, 1))
    curve = xr.DataArray(
        y[None],
        dims=("category", "model", "ckpt"),
        coords={
            "category": ["upward"],
            "model": ["a", "b"],
            "ckpt": np.arange(7),
            "step": (("model", "ckpt"), np.tile(np.arange(7.0), (2, 1))),
            "val_ppl": (("model", "ckpt"), val_ppl),
        },
    )
    shapes = subset_curves.curve_shapes(curve, tol=0.05).set_index("model")
    assert shapes.loc["a", "turns"] and shapes.loc["a", "descends_again"]
    assert shapes.loc["a", "turn_val_ppl"] == pytest.approx(val_ppl[0, 2])
    assert shapes.loc["a", "peak_val_ppl"] == pytest.approx(val_ppl[0, 4])
    assert shapes.loc["a", "again_val_ppl"] == pytest.approx(val_ppl[0, 5])
    assert not shapes.loc["b", "turns"]


def test_double_descent_share_is_the_planted_share_and_examples_show_their_text(planted):
    truth = planted.truth
    share = _table(planted, "double_descent", "double_descent_share").set_index("model")["percent"]
    planted_share = 100 * (truth["kind"][_valid(truth)] == KINDS.index("double_descent")).mean()
    # the small model stops at progress 0.55, before the second fall; the others go past it
    assert share["small"] == 0
    assert share["medium"] == pytest.approx(planted_share) and share["large"] == pytest.approx(planted_share)
    examples = _table(planted, "double_descent", "double_descent_examples")
    assert len(examples) == 6 and set(examples["model"]) == {"large"}
    assert set(examples["token_id"]) <= set(KIND_TOKENS["double_descent"])
    vocab = vocabulary()
    for row in examples.itertuples():
        assert row.token == vocab[row.token_id] and row.context.endswith(f"[[{vocab[row.token_id]}]]")
        assert row.rise_nats > 1.0  # amp >= 1.5 times a 0.75 rise, less the 0.005 noise
    assert "grows with model size" in _findings(planted, "double_descent")[1]


def test_agreement_is_near_perfect_at_matched_perplexity_only(planted):
    table = _table(planted, "agreement", "agreement")
    by_axis = table.groupby("axis")["spearman"].min()
    assert by_axis["val_ppl"] > 0.99  # planted: every size has the same loss at the same perplexity
    assert by_axis["step"] < by_axis["val_ppl"] - 0.05
    assert (table[table.axis == "val_ppl"]["jaccard"] > 0.8).all()


def test_clusters_recover_the_planted_kinds(planted):
    truth = planted.truth
    shares = _table(planted, "clusters", "clusters")
    stagnating = shares[shares.cluster == "stagnating"]
    planted_share = 100 * (truth["kind"][_valid(truth)] == KINDS.index("stagnating")).mean()
    # atol 2: the stagnating name uses the trend categories' 5% band, and the noise puts an end of 5-10%
    # of the planted flat tokens outside it (the trend categories do not call those stagnated either).
    assert len(stagnating) == 3 and np.allclose(stagnating["percent"], planted_share, atol=2.0)
    assert np.allclose(shares.groupby("model")["percent"].sum(), 100)
    tokens = _table(planted, "clusters", "cluster_tokens")
    top = tokens[tokens.name == "stagnating"]
    assert set(top["token_id"]) == set(KIND_TOKENS["stagnating"])
    assert set(top["text"]) == {show_whitespace(vocabulary()[i]) for i in KIND_TOKENS["stagnating"]}  # ␣ for spaces


def test_curve_measure_medians_and_histograms_match_numpy(planted):
    ds, truth, loss, steps, _ = planted
    summary = _table(planted, "curve_measures", "curve_summary").set_index(["measure", "model"])
    hist = _table(planted, "curve_measures", "curve_histograms")
    valid = _valid(truth)
    for m, model in enumerate(ds["model"].values):
        last = np.flatnonzero(np.isfinite(steps[m]))[-5:]
        final = loss[m, last].mean(axis=0)[valid]
        assert summary.loc[("final_loss", model), "median"] == pytest.approx(np.median(final), rel=1e-5)
        counts = hist[(hist.measure == "final_loss") & (hist.model == model)]["count"]
        assert counts.sum() == valid.sum()
    rho = _table(planted, "curve_measures", "rho1")
    assert np.allclose(rho.groupby("model")["percent"].sum(), 100)


def test_studies_of_named_sets_and_tasks_skip_on_a_store_without_them(planted):
    for study, words in (
        (sequence_perplexity, "named evaluation sets"),
        (pair_preference, "pairs"),
        (downstream, "tasks"),
    ):
        with pytest.raises(Skip, match=words):
            study.run(planted.ds)


def _sequence_curve(values: dict[str, list[list[float]]], groups: dict[str, str], corrupt: dict[str, float]):
    """A sequence_ppl-like curve (set, model, ckpt) for three models."""
    names = list(values)
    data = np.array([values[n] for n in names], dtype=float)
    n_ckpt = data.shape[-1]
    return xr.DataArray(
        data,
        dims=("set", "model", "ckpt"),
        coords={
            "set": names,
            "model": ["s", "m", "l"],
            "ckpt": np.arange(n_ckpt),
            "group": ("set", [groups[n] for n in names]),
            "corrupt": ("set", [corrupt[n] for n in names]),
            "step": (("model", "ckpt"), np.tile(np.arange(n_ckpt, dtype=float), (3, 1))),
            "val_ppl": (("model", "ckpt"), np.tile(np.geomspace(100, 10, n_ckpt), (3, 1))),
        },
    )


def test_sequence_findings_check_the_papers_patterns():
    """The paper's hallucinated-text pattern (smallest keeps falling, larger ones turn, inverse scaling
    at the end) and corrupted text that still falls with size pass; the reverse fails."""
    paper_like = _sequence_curve(
        {
            "gen:1,-1": [[90, 70, 50, 40], [90, 60, 80, 95], [90, 80, 120, 150]],
            "noisy-0.4": [[300, 200, 150, 120], [300, 150, 100, 80], [300, 120, 80, 60]],
        },
        {"gen:1,-1": "1,-1", "noisy-0.4": ""},
        {"gen:1,-1": np.nan, "noisy-0.4": 0.4},
    )
    models = ["s", "m", "l"]
    lines = sequence_perplexity._paper_claims(paper_like, turning_points(paper_like), models, np.array([1e6, 1e7, 1e8]))
    assert len(lines) == 4 and all("reproduces (" in l or l.endswith("this reproduces.") for l in lines), lines
    opposite = _sequence_curve(
        {
            "gen:1,-1": [[90, 80, 120, 150], [90, 70, 50, 40], [90, 60, 40, 30]],
            "noisy-0.4": [[300, 120, 80, 60], [300, 150, 100, 80], [300, 200, 150, 120]],
        },
        {"gen:1,-1": "1,-1", "noisy-0.4": ""},
        {"gen:1,-1": np.nan, "noisy-0.4": 0.4},
    )
    lines = sequence_perplexity._paper_claims(opposite, turning_points(opposite), models, np.array([1e6, 1e7, 1e8]))
    assert all("does not reproduce" in l for l in lines), lines
    same = sequence_perplexity._paper_claims(paper_like, turning_points(paper_like), models, np.array([1e6] * 3))
    assert "not testable here (0 of 0 corrupted sets that can be compared by size)" in same[-1], same  # was: a crash


def test_findings_helpers():
    assert direction([1, 2, 3]) == 1 and direction([3, 2, 1]) == -1 and direction([2, 2, 2]) == 0
    assert direction([1, np.nan, 3]) == 1 and direction([5]) == 0
    assert verdict([True, True]) == "reproduces" and verdict([False]) == "does not reproduce"
    assert verdict([True, False]) == "partly reproduces" and verdict([]) == "is not testable here"
    # models of the same size are never compared by size: only neighbouring different sizes pair up
    assert size_pairs([1, 1, 2, 3]) == [(0, 2), (1, 2), (2, 3)] and size_pairs([5, 5]) == []
    assert size_trend([1, 2, 3], [1, 1, 2]) == 1 and size_trend([1, 2, np.nan], [1, 1, 2]) is None
    # along position 3, 1, 2 falls; by size the tied 3 and 1 are no order, and the larger model is between them
    assert direction([3, 1, 2]) == -1 and size_trend([3, 1, 2], [1, 1, 2]) == 0


def test_a_study_runs_alone_from_the_command_line(planted, capsys, tmp_path):
    assert main_one("perplexity", [planted.ds.encoding["source"], "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "Validation perplexity at each model's last done checkpoint" in out
    assert (tmp_path / "out" / "figure.png").is_file() and (tmp_path / "out" / "checkpoints.csv").is_file()
