"""`tokendyn analyze`: every step's outputs on a planted store and on a real extracted store, skipped
steps, step selection, and steps added by another module."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import tokendyn.pipelines.steps
from conftest import write_suite
from planted_stores import KINDS, planted_suite, write_store
from tokendyn.cli import main

TABLES = {"checkpoints", "perplexity_levels", "trend_shares", "subset_curves", "double_descent", "agreement",
          "curve_summary", "clusters", "cluster_centroids", "cluster_tokens"}
GROUPS = {"matched_perplexity", "trends", "double_descent", "curves", "rho1", "clusters"}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    ds, truth = planted_suite(root / "planted.zarr", n_seq=16)
    assert main(["analyze", str(root / "planted.zarr"), "--quiet", "--n-clusters", "4"]) == 0
    return ds, truth, root / "planted.analysis"


def test_writes_every_table_and_label_group(analysed):
    ds, truth, folder = analysed
    assert {p.stem for p in folder.glob("*.csv")} == TABLES
    for group in GROUPS:
        labels = xr.open_zarr(folder / "labels.zarr", group=group, consolidated=False)
        assert labels.sizes["token"] == ds.sizes["token"]
    trends = xr.open_zarr(folder / "labels.zarr", group="trends", consolidated=False)["trend"]
    assert trends.dims == ("model", "start", "token") and trends.attrs["categories"][0] == "stagnated"


def test_tables_hold_what_was_planted(analysed):
    ds, truth, folder = analysed
    kind = truth["kind"]
    shares = pd.read_csv(folder / "trend_shares.csv")
    # The small model stops while its double-descent tokens are rising: upward at every start.
    planted_up = 100 * np.mean(np.isin(kind[kind >= 0], [KINDS.index("upward"), KINDS.index("double_descent")]))
    small = shares[(shares["model"] == "small") & (shares["category"] == "upward")]
    assert small["percent"].to_numpy() == pytest.approx(planted_up, abs=3)
    dd = pd.read_csv(folder / "double_descent.csv").set_index("model")["percent"]
    planted_dd = 100 * np.mean(kind[kind >= 0] == KINDS.index("double_descent"))
    assert dd["small"] == 0 and dd["large"] == pytest.approx(planted_dd)
    agreement = pd.read_csv(folder / "agreement.csv")
    means = agreement.groupby("axis")["spearman"].mean()
    assert means["val_ppl"] > 0.95 and means["val_ppl"] > means["step"] + 0.1
    clusters = pd.read_csv(folder / "clusters.csv")
    assert set(clusters["category"]) == {"stagnating", "rising", "late-falling", "falling then rising"}
    subsets = pd.read_csv(folder / "subset_curves.csv")
    assert set(subsets["chosen_on"]) == {"small", "medium", "large"}


def test_summary_is_printed_and_missing_data_is_skipped(tmp_path, capsys):
    rng = np.random.default_rng(0)
    steps = np.array([[100, 200, 300, 400, 500.0]])
    write_store(tmp_path / "one.zarr", rng.uniform(1, 3, (1, 5, 4, 8)), steps)
    assert main(["analyze", str(tmp_path / "one.zarr"), "--quiet", "--steps", "trends,agreement"]) == 0
    out = capsys.readouterr().out
    assert "agreement: skipped (needs at least two models)" in out
    assert "warning: model m0: fewer than 3 checkpoints from 70% of the final step" in out
    assert "trends: % stagnated/upward/downward/uncategorised at start 20%" in out
    assert {p.stem for p in (tmp_path / "one.analysis").glob("*.csv")} == {"trend_shares", "subset_curves"}
    assert main(["analyze", str(tmp_path / "one.zarr"), "--steps", "nonsense"]) == 2
    assert "unknown analysis step(s) nonsense" in capsys.readouterr().err


def test_another_module_adds_a_step(tmp_path, monkeypatch, capsys):
    extra = tmp_path / "steps"
    extra.mkdir()
    (extra / "zz_extra.py").write_text(
        "def tokens_step(ds, out):\n"
        "    out.write_table('tokens', __import__('pandas').DataFrame({'n': [ds.sizes['token']]}))\n"
        "    return ['counted']\n"
        "STEPS = [tokens_step]\n")
    monkeypatch.setattr(tokendyn.pipelines.steps, "__path__", [*tokendyn.pipelines.steps.__path__, str(extra)])
    write_store(tmp_path / "s.zarr", np.ones((1, 4, 3, 5)), np.array([[1, 2, 3, 4.0]]))
    assert main(["analyze", str(tmp_path / "s.zarr"), "--quiet", "--steps", "tokens"]) == 0
    assert "tokens: counted" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "s.analysis" / "tokens.csv")["n"].tolist() == [3 * 4]  # 3 rows of 4 scored


def test_analyze_a_real_extracted_store(tmp_path, capsys):
    suite = write_suite(tmp_path, families=("opt", "gpt_neox"), steps=(0, 10, 20, 30, 40, 50, 60, 70))
    store = tmp_path / "real.zarr"
    assert main(["extract", str(suite), "--out", str(store)]) == 0
    assert main(["analyze", str(store), "--quiet", "--n-clusters", "3"]) == 0
    out = capsys.readouterr().out
    for step in ("perplexity", "trends", "double_descent", "agreement", "curves", "clusters"):
        assert f"\n{step}: " in "\n" + out
    folder = tmp_path / "real.analysis"
    ds = tokendyn.open_store(store)
    shares = pd.read_csv(folder / "trend_shares.csv")
    assert shares.groupby(["model", "start"])["percent"].sum().to_numpy() == pytest.approx(100)
    tokens = pd.read_csv(folder / "cluster_tokens.csv", keep_default_na=False)
    vocab = ds["vocab_text"].values
    assert all(text == vocab[i] for i, text in zip(tokens["token_id"], tokens["text"]))
    trends = xr.open_zarr(folder / "labels.zarr", group="trends", consolidated=False)["trend"]
    assert trends.sizes["token"] == ds.sizes["token"]
