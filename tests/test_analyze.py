"""`tokendyn analyze`: every study's outputs on a planted store and on a real extracted store, skipped
studies, study selection (and the former step names), the registry's order, and the same tables as
the report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import tokendyn
import tokendyn.studies
from conftest import write_suite
from planted_stores import KINDS, planted_report, write_store
from tokendyn.analysis.labels import flag_names
from tokendyn.analysis.tokens import show_whitespace
from tokendyn.analysis.trajectories import at_perplexity
from tokendyn.cli import main

TABLES = {
    "checkpoints",
    "perplexity_levels",
    "trend_shares",
    "paper_reference",
    "subset_curves",
    "subset_shapes",
    "double_descent_share",
    "double_descent_examples",
    "agreement",
    "curve_histograms",
    "curve_summary",
    "rho1",
    "clusters",
    "cluster_centroids",
    "cluster_tokens",
    "cluster_agreement",
    "token_view",
}
GROUPS = {"matched_perplexity", "trends", "double_descent", "curves", "rho1", "clusters"}


@pytest.fixture(scope="module")
def analysed(planted_store, tmp_path_factory):
    ds, truth = planted_store  # the shared planted store (conftest.py)
    out = tmp_path_factory.mktemp("analyze") / "planted.analysis"
    assert main(["analyze", ds.encoding["source"], "--out", str(out), "--quiet", "--n-clusters", "shapes"]) == 0
    return ds, truth, out


def test_writes_every_table_and_label_group(analysed):
    ds, truth, folder = analysed
    assert {p.stem for p in folder.glob("*.csv")} == TABLES
    assert (folder / "findings.txt").read_text().startswith("perplexity: ")
    for group in GROUPS:
        labels = xr.open_zarr(folder / "labels.zarr", group=group, consolidated=False)
        assert labels.sizes["token"] == ds.sizes["token"]
    trends = xr.open_zarr(folder / "labels.zarr", group="trends", consolidated=False)["trend"]
    assert trends.dims == ("model", "start", "token") and flag_names(trends)[0] == "stagnated"
    # float labels are written with their own codec (spill.FLOAT_CODEC): read back bit for bit
    matched = xr.open_zarr(folder / "labels.zarr", group="matched_perplexity", consolidated=False)
    np.testing.assert_array_equal(matched["loss"].values, at_perplexity(ds).astype(np.float32).values)


def test_analyze_writes_the_tables_the_report_shows(analysed, tmp_path_factory):
    _, _, folder = analysed
    report = planted_report(tmp_path_factory) / "report"  # the same options: --n-clusters shapes
    shown = sorted(report.glob("*/*.csv"))
    assert {p.stem for p in shown} == TABLES
    for path in shown:
        pd.testing.assert_frame_equal(pd.read_csv(folder / path.name), pd.read_csv(path))


def test_tables_hold_what_was_planted(analysed):
    ds, truth, folder = analysed
    kind = truth["kind"]
    shares = pd.read_csv(folder / "trend_shares.csv")
    # The small model stops while its double-descent tokens are rising: upward at every start.
    planted_up = 100 * np.mean(np.isin(kind[kind >= 0], [KINDS.index("upward"), KINDS.index("double_descent")]))
    small = shares[(shares["model"] == "small") & (shares["category"] == "upward")]
    assert small["percent"].to_numpy() == pytest.approx(planted_up, abs=3)
    dd = pd.read_csv(folder / "double_descent_share.csv").set_index("model")["percent"]
    planted_dd = 100 * np.mean(kind[kind >= 0] == KINDS.index("double_descent"))
    assert dd["small"] == 0 and dd["large"] == pytest.approx(planted_dd)
    agreement = pd.read_csv(folder / "agreement.csv")
    means = agreement.groupby("axis")["spearman"].mean()
    assert means["val_ppl"] > 0.95 and means["val_ppl"] > means["step"] + 0.1
    clusters = pd.read_csv(folder / "clusters.csv")
    # Each model over its own checkpoints; the names use the detectors' statistics, so the planted double
    # descent is "double descent" in medium and large (counted from step 0, as the detector does) and
    # not where small stops at its peak. Each name is one cluster.
    names = {"stagnating", "rising", "steadily falling", "double descent"}
    assert names <= set(clusters["cluster"])
    assert clusters.groupby("model")["cluster"].apply(lambda c: c.is_unique).all()
    subsets = pd.read_csv(folder / "subset_curves.csv")
    assert set(subsets["chosen_on"]) == {"small", "medium", "large"}


def test_summary_is_printed_and_missing_data_is_skipped(tmp_path, capsys):
    rng = np.random.default_rng(0)
    steps = np.array([[100, 200, 300, 400, 500.0]])
    write_store(tmp_path / "one.zarr", rng.uniform(1, 3, (1, 5, 4, 8)), steps)
    # "trends", a former step name, stands for the trend_categories and subset_curves studies
    assert main(["analyze", str(tmp_path / "one.zarr"), "--quiet", "--steps", "trends,agreement"]) == 0
    out = capsys.readouterr().out
    assert "agreement: skipped (needs at least two models)" in out
    assert "trend_categories: No categories at start 70% in m0: fewer than 3 checkpoints in the window" in out
    assert "trend_categories: At start 20%, % stagnated / upward / downward / uncategorised: m0 " in out
    assert {p.stem for p in (tmp_path / "one.analysis").glob("*.csv")} == {
        "trend_shares",
        "paper_reference",
        "subset_curves",
        "subset_shapes",
    }
    assert main(["analyze", str(tmp_path / "one.zarr"), "--studies", "nonsense"]) == 2
    assert "unknown study nonsense" in capsys.readouterr().err


def test_a_run_where_every_study_is_skipped_keeps_the_earlier_results(tmp_path, capsys):
    rng = np.random.default_rng(0)
    write_store(tmp_path / "one.zarr", rng.uniform(1, 3, (1, 5, 4, 8)), np.array([[100, 200, 300, 400, 500.0]]))
    store, folder = str(tmp_path / "one.zarr"), tmp_path / "one.analysis"
    assert main(["analyze", store, "--quiet", "--studies", "perplexity"]) == 0
    before = sorted(p.name for p in folder.iterdir())
    assert "checkpoints.csv" in before
    assert main(["analyze", store, "--quiet", "--studies", "agreement"]) == 2
    err = capsys.readouterr().err
    assert "no result to write, agreement: skipped (needs at least two models)" in err and "left as it was" in err
    assert sorted(p.name for p in folder.iterdir()) == before
    assert main(["report", store, "--quiet", "--studies", "agreement"]) == 2
    assert "nothing to report" in capsys.readouterr().err
    assert not (tmp_path / "one.report").exists()


@pytest.mark.parametrize(
    "option",
    [["--start", "1.5"], ["--levels", "-3"], ["--levels", "nan"], ["--dd-tol", "-1"], ["--turn-tol", "inf"]],
)
def test_out_of_range_study_options_are_refused_before_anything_runs(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exit:
        main(["analyze", str(tmp_path / "absent.zarr"), *option])
    assert exit.value.code == 2
    assert f"argument {option[0]}: expected" in capsys.readouterr().err


def test_trend_x_reaches_the_token_view_too(tmp_path):
    from tokendyn.studies.token_view import token_table

    rng = np.random.default_rng(3)
    steps = np.array([[1, 2, 4, 8, 100, 1000, 2000, 3000.0]])
    loss = rng.uniform(1, 3, (1, 8, 4, 8)) + np.linspace(0, 1, 8)[None, :, None, None] * rng.normal(size=(1, 1, 4, 8))
    write_store(tmp_path / "s.zarr", loss, steps)
    assert main(["analyze", str(tmp_path / "s.zarr"), "--quiet", "--studies", "token_view", "--trend-x", "index"]) == 0
    shown = pd.read_csv(tmp_path / "s.analysis" / "token_view.csv")["category"].tolist()
    ds = tokendyn.open_store(tmp_path / "s.zarr")
    assert shown == token_table(ds, x="index")["category"].tolist()
    assert shown != token_table(ds, x="log_step")["category"].tolist()  # the option changes what is shown


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_help_lists_the_studies(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert ", ".join(tokendyn.studies.STUDIES) in text


def test_levels_below_one_are_refused_by_the_analysis_too(tmp_path):
    rng = np.random.default_rng(0)
    write_store(tmp_path / "one.zarr", rng.uniform(1, 3, (1, 5, 4, 8)), np.array([[100, 200, 300, 400, 500.0]]))
    with pytest.raises(tokendyn.TokendynError, match="perplexity levels must be finite numbers >= 1"):
        at_perplexity(tokendyn.open_store(tmp_path / "one.zarr"), levels=[-3.0])


def test_the_registry_is_explicit_and_a_study_added_to_it_runs(tmp_path, monkeypatch, capsys):
    assert list(tokendyn.studies.STUDIES)[:3] == ["perplexity", "trend_categories", "subset_curves"]
    assert len(set(tokendyn.studies.STUDIES)) == len(tokendyn.studies.STUDIES) == 13

    def tokens(source):
        from matplotlib.figure import Figure

        from tokendyn.studies.study import Result

        return Result("tokens", {"tokens": pd.DataFrame({"n": [source.sizes["ckpt"]]})}, Figure(), ["counted"])

    monkeypatch.setitem(tokendyn.studies.STUDIES, "tokens", tokens)
    write_store(tmp_path / "s.zarr", np.ones((1, 4, 3, 5)), np.array([[1, 2, 3, 4.0]]))
    assert main(["analyze", str(tmp_path / "s.zarr"), "--quiet", "--studies", "tokens"]) == 0
    assert "tokens: counted" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "s.analysis" / "tokens.csv")["n"].tolist() == [4]


def test_analyze_a_real_extracted_store(tmp_path, capsys):
    suite = write_suite(tmp_path, families=("opt", "gpt_neox"), steps=(0, 10, 20, 30, 40, 50, 60, 70))
    store = tmp_path / "real.zarr"
    assert main(["extract", str(suite), "--out", str(store)]) == 0
    assert main(["analyze", str(store), "--quiet", "--n-clusters", "3"]) == 0
    out = capsys.readouterr().out
    for study in (
        "perplexity",
        "trend_categories",
        "subset_curves",
        "double_descent",
        "agreement",
        "curve_measures",
        "clusters",
    ):
        assert f"\n{study}: " in "\n" + out
    folder = tmp_path / "real.analysis"
    ds = tokendyn.open_store(store)
    shares = pd.read_csv(folder / "trend_shares.csv")
    assert shares.groupby(["model", "start"])["percent"].sum().to_numpy() == pytest.approx(100)
    # Random tiny models may share no validation-perplexity range: clustering runs on each model's own
    # checkpoints all the same.
    assert "clusters: skipped" not in out
    tokens = pd.read_csv(folder / "cluster_tokens.csv", keep_default_na=False)
    vocab = ds["vocab_text"].values
    assert all(text == show_whitespace(vocab[i]) for i, text in zip(tokens["token_id"], tokens["text"]))
    trends = xr.open_zarr(folder / "labels.zarr", group="trends", consolidated=False)["trend"]
    assert trends.sizes["token"] == ds.sizes["token"]
