"""PassUntil on real tiny models: estimates against the exact pass probability from the model's own
logits, censoring at the cap, resume, user checkers, the CLI and the accessor methods."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from transformers import AutoModelForCausalLM

import tokendyn
from conftest import build_tokenizer, write_suite
from tokendyn.analysis import downstream
from tokendyn.analysis.passuntil import ScalingFit
from tokendyn.cli import main
from tokendyn.config.suite import load_suite
from tokendyn.errors import TokendynError
from tokendyn.models.sampling import cut_at_stop, read_generation_task, run_pass_until
from tokendyn.store.passuntil import read_runs

# Prompts and answers of one token in the tiny BPE vocabulary (" the", " and", " in", " a"); a random
# tiny model passes with probability about 2/300 (the answer with and without its leading space).
INSTANCES = [
    ("The quick brown fox jumps over", "the"),
    ("Alice was born in 1970", "and"),
    ("Alice was born", "in"),
    ("A cat sat on", "a"),
]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return write_suite(tmp_path_factory.mktemp("pu"), families=("opt", "llama"), steps=(0, 10))


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "recall.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": p, "answer": a, "skills": ["s1", "s2"], "level": i}) + "\n"
            for i, (p, a) in enumerate(INSTANCES)
        )
    )
    return path


@pytest.fixture(scope="module")
def store(suite, task_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s.zarr"
    run_pass_until(suite, out, task_file, passes=8, max_samples=20_000, batch_size=1024, seed=1, progress=False)
    return out


def _pass_probability(model_dir, prompt: str, answer: str) -> float:
    """Exact probability that one sampled token decodes to the answer (up to surrounding whitespace)."""
    tokenizer = build_tokenizer()
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits[0, -1, : len(tokenizer)].double(), -1).numpy()
    matches = [t for t in range(len(tokenizer)) if tokenizer.decode([t]).strip() == answer]
    return float(probs[matches].sum())


def test_estimates_match_the_models_pass_probability(store, suite):
    runs = read_runs(store, "recall")
    assert runs["done"].values.all() and (runs["new_tokens"].values == 1).all()
    passes, samples, drawn = (runs[k].values for k in ("passes", "samples", "drawn"))
    assert (passes == 8).all()  # p ~ 1/150 reaches 8 passes well within the cap
    assert ((samples <= drawn) & (drawn - samples < 1024)).all()  # K counts up to the 8th pass; the batch finishes
    rates = downstream.pass_until(store, "recall")
    np.testing.assert_allclose(rates["rate"].values, 7 / (samples - 1))
    spec = load_suite(suite)
    truth = np.array(
        [
            [[_pass_probability(ckpt.path, p, a) for p, a in INSTANCES] for ckpt in model.checkpoints]
            for model in spec.models
        ]
    )
    assert 1 / 600 < truth.mean() < 1 / 50
    # (r - 1) / (K - 1) is unbiased with relative sd <= 1 / sqrt(r - 2) per run: over 16 runs the mean
    # ratio lies within +-0.3 of 1 (3 standard errors); the seed makes the run reproducible
    assert np.mean(rates["rate"].values / truth) == pytest.approx(1.0, abs=0.3)


def test_cap_censors_and_reports_upper_bounds(store, suite, task_file):
    run_pass_until(
        suite, store, read_generation_task(task_file, "capped"), passes=2, max_samples=50, batch_size=32, progress=False
    )
    result = downstream.pass_until(store, "capped")
    passes, samples, drawn = (result[k].values for k in ("passes", "samples", "drawn"))
    capped = passes < 2
    assert capped.sum() >= 10  # p ~ 1/150: two passes in 50 samples are rare
    assert (samples[capped] == 50).all() and (drawn == np.where(capped, 50, drawn)).all()
    assert np.isnan(result["rate"].values[capped]).all() and result["censored"].values[capped].all()
    upper = result["upper"].values[capped & (passes == 0)]
    np.testing.assert_allclose(upper, 1 - 0.05 ** (1 / 50))  # one-sided 95% Clopper-Pearson bound, r = 0
    assert ((result["task_upper"] >= result["task_estimate"]) | result["task_estimate"].isnull()).all()
    assert result["task_drawn"].dims == ("model", "ckpt") and float(result["task_seconds"].sum()) > 0


def test_resume_gives_the_uninterrupted_result(store, suite, task_file):
    before = read_runs(store, "recall")
    group = zarr.open_group(store, mode="r+")["passuntil/recall"]
    group["done"][1, 1] = False  # as if killed during this checkpoint after its second instance
    group["samples"][1, 1, 2:] = -1
    group["passes"][1, 1, 2:] = 0
    run_pass_until(suite, store, task_file, passes=8, max_samples=20_000, batch_size=1024, seed=1, progress=False)
    after = read_runs(store, "recall")
    for name in ("passes", "samples", "drawn", "batches", "done"):
        np.testing.assert_array_equal(after[name].values, before[name].values)
    with pytest.raises(TokendynError, match=r"passes = 8 \(now 3\).*--force"):
        run_pass_until(suite, store, task_file, passes=3, max_samples=20_000, batch_size=1024, seed=1, progress=False)


def test_user_checker_by_dotted_name(store, suite, task_file, tmp_path, monkeypatch):
    (tmp_path / "lenient.py").write_text(
        "def anything(completion, instance):\n"
        "    assert instance['level'] in (0, 1, 2, 3)\n"
        "    return bool(completion)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    run_pass_until(
        suite,
        store,
        read_generation_task(task_file, "lenient"),
        passes=2,
        max_samples=100,
        batch_size=8,
        checker="lenient:anything",
        progress=False,
    )
    runs = read_runs(store, "lenient")
    assert runs.attrs["params"]["checker"] == "lenient:anything"
    assert (runs["passes"] == 2).all() and (runs["samples"] <= 3).all()  # almost every completion passes
    with pytest.raises(TokendynError, match="cannot import checker"):
        run_pass_until(suite, store, task_file, checker="lenient:missing", progress=False)
    assert cut_at_stop("Paris\nand more", ["\n"]) == "Paris" and cut_at_stop("a;b.c", [".", ";"]) == "a"


def test_accessor_methods_return_the_right_dims(store):
    ds = tokendyn.open_store(store)
    one = ds.tokendyn.pass_until("recall")
    assert one["rate"].dims == ("model", "ckpt", "instance") and one["task_estimate"].dims == ("model", "ckpt")
    assert list(one["skills"].values) == ["s1|s2"] * 4 and list(one["level"].values) == [0, 1, 2, 3]
    every = ds.tokendyn.pass_until()
    assert "task" in every.dims and "recall" in every["task"].values
    fit = ds.tokendyn.task_scaling_fit("recall")
    assert isinstance(fit, ScalingFit) and fit.n_points == 2 and np.isfinite(fit.slope)
    assert fit.instances.slope.shape == (len(INSTANCES),)
    by_loss = ds.tokendyn.task_scaling_fit("recall", x="excess_loss", irreducible=0.0)
    assert isinstance(by_loss, ScalingFit) and np.isfinite(by_loss.slope)
    with pytest.raises(TokendynError, match="name the PassUntil task"):
        ds.tokendyn.task_scaling_fit()


def test_analyze_writes_passuntil_tables(store, tmp_path):
    from tokendyn.pipelines.analyze import analyze

    lines = analyze(tokendyn.open_store(store), tmp_path / "a", only=["tasks", "passuntil"], progress=False)
    table = pd.read_csv(tmp_path / "a" / "passuntil.csv")
    assert set(table["task"]) >= {"recall", "capped"} and (table.groupby("task").size() == 4).all()
    assert {"task_estimate", "task_ci_low", "task_upper", "task_drawn"} <= set(table.columns)
    assert any(line.startswith("downstream: skipped") for line in lines)  # "tasks" stands for the downstream study
    assert any("passuntil: Task recall: 0 of 4 checkpoints with no instance passing" in line for line in lines)


def test_passuntil_cli(suite, task_file, tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    args = [
        "passuntil",
        str(suite),
        "--task",
        str(task_file),
        "--passes",
        "2",
        "--max-samples",
        "64",
        "--batch-size",
        "64",
        "--top-p",
        "0.9",
        "--stop",
        "\\n",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    assert "4 instances x 4 checkpoints" in capsys.readouterr().out
    runs = read_runs(out, "recall")
    assert runs.attrs["params"]["top_p"] == 0.9 and runs.attrs["params"]["stop"] == ["\n"]
    with pytest.raises(SystemExit) as exit:
        main([*args[:4], "--passes", "1", *args[6:]])
    assert exit.value.code == 2 and "argument --passes: expected a whole number >= 2" in capsys.readouterr().err


# --every: a suite of four checkpoints per model, so every=2 leaves one out (c = 0, 2 and the last, 3).
EVERY_OPTIONS = dict(passes=2, max_samples=64, batch_size=64, seed=1, progress=False)


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    return write_suite(tmp_path_factory.mktemp("pu4"), families=("opt", "llama"), steps=(0, 10, 20, 30))


@pytest.fixture(scope="module")
def sparse_store(four_steps, task_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse") / "s.zarr"
    run_pass_until(four_steps, out, task_file, every=2, **EVERY_OPTIONS)
    return out


def test_every_runs_only_the_checkpoints_extract_scores_a_set_at(sparse_store):
    runs = read_runs(sparse_store, "recall")
    expected = np.array([[True, False, True, True]] * 2)  # written out, not from scored_at
    np.testing.assert_array_equal(runs["done"].values, expected)
    assert (runs["samples"].values[expected] > 0).all() and (runs["samples"].values[~expected] == -1).all()
    assert np.isnan(runs["seconds"].values[~expected]).all()
    assert "every" not in runs.attrs["params"]  # so a rerun with another every adds to the same group


def test_a_rerun_at_every_checkpoint_fills_in_the_rest_and_keeps_the_first(
    sparse_store, four_steps, task_file, tmp_path
):
    import shutil

    out = shutil.copytree(sparse_store, tmp_path / "s.zarr")
    before = read_runs(out, "recall")
    run_pass_until(four_steps, out, task_file, **EVERY_OPTIONS)
    after = read_runs(out, "recall")
    assert after["done"].values.all()
    kept = before["done"].values
    # Wall-clock seconds differ on any redo: equal ones mean the first run's checkpoints were not sampled again.
    np.testing.assert_array_equal(after["seconds"].values[kept], before["seconds"].values[kept])
    # The filled-in store holds what one run at every checkpoint gives (each checkpoint has its own seed).
    whole = tmp_path / "whole.zarr"
    run_pass_until(four_steps, whole, task_file, **EVERY_OPTIONS)
    for name in ("passes", "samples", "drawn", "batches", "done"):
        np.testing.assert_array_equal(after[name].values, read_runs(whole, "recall")[name].values, err_msg=name)


def test_passuntil_study_on_a_store_run_at_every_second_checkpoint(sparse_store):
    from tokendyn.studies import passuntil as study

    result = study.run(tokendyn.open_store(sparse_store))
    table = result.tables["passuntil"]
    runs = read_runs(sparse_store, "recall")
    steps = runs["step"].where(runs["done"]).to_series().dropna()
    done = {(model, int(step)) for (model, _), step in steps.items()}
    assert len(done) == 6 and {(m, int(s)) for m, s in zip(table["model"], table["step"])} == done  # those run
    assert table["task_estimate"].notna().all()
    lines = [line for ax in result.figure.axes for line in ax.lines if len(line.get_xdata())]
    assert lines and all(np.isfinite(np.asarray(line.get_ydata(), dtype=float)).all() for line in lines)
    assert all(np.isfinite(np.asarray(line.get_xdata(), dtype=float)).all() for line in lines)
    censored = int((table["task_censored"] > 0).sum())
    assert f"Task recall: {censored} of 6 checkpoints with no instance passing (run at 6 of the 8 checkpoints)" in (
        " ".join(result.findings)
    )


@pytest.mark.parametrize("every", [0, -2, 1.5, True, "2"])
def test_bad_every_is_a_one_line_error_before_any_work(every, four_steps, task_file, tmp_path):
    with pytest.raises(TokendynError, match=r"^--every .* is not a whole number of checkpoints >= 1; give") as err:
        run_pass_until(four_steps, tmp_path / "s.zarr", task_file, every=every, **EVERY_OPTIONS)
    assert "\n" not in str(err.value) and not (tmp_path / "s.zarr").exists()


def test_passuntil_cli_every(four_steps, task_file, tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    args = ["passuntil", str(four_steps), "--task", str(task_file), "--max-samples", "32", "--batch-size", "32"]
    assert main([*args, "--out", str(out), "--every", "0", "--no-progress"]) == 2
    assert "--every 0 is not a whole number" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--out", str(out), "--every", "3", "--no-progress"]) == 0
    assert "4 instances x 4 checkpoints" in capsys.readouterr().out  # c = 0 and the last, 3, of each model
    np.testing.assert_array_equal(read_runs(out, "recall")["done"].values, [[True, False, False, True]] * 2)
