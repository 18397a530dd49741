"""`tokendyn demo`: the ETA's cost model, and a second run on the quick preset recomputes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from tokendyn import store
from tokendyn.models import extract
from tokendyn.pipelines import demo
from tokendyn.toy import build


def test_training_cost_follows_model_flops_and_the_parallel_makespan():
    shapes, steps = demo.preset_shapes("default")
    batch = build.PRESETS["default"].train.batch_size * build.PRESETS["default"].seq_len
    seconds = {name: demo.training_seconds(shape, steps, batch) for name, shape in shapes.items()}
    # forward + backward = 3 forwards of 2 FLOPs per weight per token, written out independently here
    for name, shape in shapes.items():
        weights = 12 * shape.hidden**2 * shape.layers + shape.vocab * shape.hidden
        attention = 4 * shape.layers * shape.seq_len * shape.hidden
        flops = steps * 3 * batch * (2 * weights + attention)
        overhead = steps * demo.STEP_OVERHEAD * shape.layers
        assert seconds[name] == pytest.approx(flops / demo.FLOPS_PER_SECOND + overhead)
    assert seconds["L"] > 3 * seconds["M"] > 3 * seconds["S"]  # not equal costs per step
    # two processes: toy-L on one, toy-S then toy-M on the other; toy-L takes both cores from its switch step
    share = build.PRESETS["default"].sizes["L"].more_threads_from
    alone = max(share * seconds["L"], seconds["M"] + seconds["S"])
    costs = demo.estimate_costs("default", workers=2)
    assert costs["build"] == pytest.approx(alone + (1 - share) * seconds["L"] / demo.TRAIN_THREADS_SPEEDUP)
    assert demo.estimate_costs("default", workers=1)["build"] == pytest.approx(sum(seconds.values()))


def test_scoring_cost_follows_tokens_checkpoints_model_size_and_sparse_sets():
    small = demo.ModelShape(hidden=24, layers=2, vocab=1000, seq_len=128, checkpoints=25)
    large = demo.ModelShape(hidden=128, layers=4, vocab=1000, seq_len=128, checkpoints=25)
    doubled = demo.ModelShape(hidden=24, layers=2, vocab=1000, seq_len=128, checkpoints=50)

    def cost(shape, tokens, every=1):
        return demo.scoring_seconds({"m": shape}, {"set": (tokens, every)})

    loads = 25 * demo.LOAD_SECONDS
    # per scored checkpoint: forward FLOPs at the scoring rate + the log-softmax over the vocabulary, written out here
    per_token = (2 * (12 * 24**2 * 2 + 1000 * 24) + 4 * 2 * 128 * 24) / demo.SCORING_FLOPS_PER_SECOND
    per_token += 1000 * demo.LOGIT_SECONDS
    assert cost(small, 1e4) == pytest.approx(25 * (1e4 * per_token + demo.SET_SECONDS) + loads)
    assert cost(small, 2e4) - cost(small, 1e4) == pytest.approx(25 * 1e4 * per_token)  # linear in tokens
    assert cost(doubled, 1e4) == pytest.approx(2 * cost(small, 1e4))  # linear in checkpoints
    # the default preset's largest size measured 5.5x the smallest's seconds per scored token
    assert 4 < (cost(large, 2e4) - cost(large, 1e4)) / (cost(small, 2e4) - cost(small, 1e4)) < 7
    # a set scored at every second checkpoint: 13 of 25 (0, 2, ..., 24), as extract schedules it
    assert demo.scored_checkpoints(25, 2) == 13 and demo.scored_checkpoints(26, 2) == 14
    assert cost(small, 1e4, every=2) - loads == pytest.approx(13 / 25 * (cost(small, 1e4) - loads))


def test_the_estimate_follows_the_presets_and_every_phase_has_one():
    quick, default = demo.estimate_costs("quick", workers=1), demo.estimate_costs("default", workers=1)
    assert list(quick) == ["build", "generate", "extract", "passuntil", "analyze", "findings"] == list(default)
    assert all(default[p] > quick[p] for p in ("build", "extract", "passuntil"))
    sets = demo.demo_sets("default")
    assert sets.pop("main")[1] == 1 and all(every == demo.SPARSE_EVERY for _, every in sets.values())
    # two cores: torch's threads, at the speed-up measured on the default preset
    parallel = demo.estimate_costs("default", workers=2)["extract"]
    assert parallel == pytest.approx(default["extract"] / demo.THREADED_SPEEDUP)


def test_figures_are_drawn_beside_the_studies_on_a_second_core():
    n = len(demo.STUDIES)
    one = demo.estimate_costs("default", workers=1)["analyze"]
    two = demo.estimate_costs("default", workers=2)["analyze"]
    assert one - two == pytest.approx(min(two, demo.FIGURE_SECONDS * n))
    assert demo.analyze_seconds(10.0, 20, workers=2) == pytest.approx(max(10.0, 20 * demo.FIGURE_SECONDS))
    assert demo.analyze_seconds(10.0, 20, workers=1) == pytest.approx(10.0 + 20 * demo.FIGURE_SECONDS)


def test_makespan_puts_the_longest_jobs_first():
    assert demo.makespan([5, 3, 3, 1], 2) == 6  # 5+1 | 3+3
    assert demo.makespan([5, 3, 3, 1], 1) == 12
    assert demo.makespan([7], 4) == 7


def test_eta_scales_the_remaining_estimates_by_the_measured_rate():
    now = [0.0]
    steps = demo.Progress({"a": 10.0, "b": 30.0, "c": 60.0}, show=False, clock=lambda: now[0])
    assert steps.eta() == 100.0  # nothing measured yet: the estimates as they are
    steps.start("a")
    now[0] = 20.0  # phase a took twice its estimate
    steps.finish("a")
    assert steps.eta() == pytest.approx(2 * 90.0)
    steps.skip("b")  # a skipped phase costs nothing and does not change the rate
    assert steps.eta() == pytest.approx(2 * 60.0)
    assert steps.status == {"a": "ran", "b": "skipped"}
    short = demo.Progress({"imports": 1.0, "rest": 300.0}, show=False, clock=lambda: now[0])
    now[0] = 0.0
    short.start("imports")
    now[0] = 40.0  # a short phase taking 40x its estimate (the first torch import on a busy machine)
    short.finish("imports")
    assert short.eta() == 300.0  # does not scale the long phases


def test_phase_finished_without_start_is_an_error():
    steps = demo.Progress({"a": 1.0}, show=False)
    with pytest.raises(RuntimeError):
        steps.finish("a")


@pytest.mark.slow
def test_second_quick_demo_recomputes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOKENDYN_CACHE", str(tmp_path))
    phases = list(demo.estimate_costs("quick"))
    first = demo.run_demo(preset="quick", progress=False)
    assert set(first["phases"].values()) == {"ran"} and list(first["phases"]) == phases
    printed = capsys.readouterr().out  # without progress bars the phase lines still say where the demo is
    assert all(f"[demo {i}/{len(phases)}] {phase} (ETA" in printed for i, phase in enumerate(phases, 1))
    store_files = {p: p.stat().st_mtime_ns for p in first["store"].rglob("*") if p.is_file()}
    second = demo.run_demo(preset="quick", progress=False)
    assert second["phases"] == {phase: "skipped" for phase in phases}
    assert {p: p.stat().st_mtime_ns for p in first["store"].rglob("*") if p.is_file()} == store_files
    assert second["findings"] == first["findings"] and second["analysis_lines"] == first["analysis_lines"]
    assert second["findings"] and second["analysis_lines"]
    monkeypatch.setattr(demo, "_code_stamp", lambda *packages: "changed analysis code")
    third = demo.run_demo(preset="quick", progress=False)  # a new commit of tokendyn keeps its version number
    assert {p: s for p, s in third["phases"].items() if s == "ran"} == {"analyze": "ran", "findings": "ran"}
    assert (first["report"].parent / "perplexity" / "figure.png").is_file()  # one run of the studies wrote both
    assert (first["analysis"] / "perplexity_levels.csv").is_file()
    # The cost model's set sizes track the store's within a factor; the named sets and tasks are done
    # exactly at the checkpoints extract schedules for every SPARSE_EVERY-th.
    root = zarr.open_group(first["store"], mode="r")
    estimated = demo.demo_sets("quick")
    assert sorted(["main", *store.list_sets(first["store"])]) == sorted(estimated)
    for name, (tokens, every) in estimated.items():
        group = root if name == "main" else root[store.set_path(name)]
        assert 1 / 3 < group["loss"].shape[-1] / tokens < 3, name  # generated text may stop early at EOS
        done = np.asarray(group["done"][...])
        n = done.shape[1]
        assert done.tolist() == [[extract.scored_at(c, n, every) for c in range(n)]] * done.shape[0], name
    # PassUntil too: its recall questions are sampled at the same checkpoints.
    done = np.asarray(root["passuntil/toy_recall/done"][...])
    n = done.shape[1]
    assert done.tolist() == [[extract.scored_at(c, n, demo.SPARSE_EVERY) for c in range(n)]] * done.shape[0]
