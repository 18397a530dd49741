"""`tokendyn demo`: the ETA's cost model, and a second run on the quick preset recomputes nothing."""

from __future__ import annotations

import pytest

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
    costs = demo.estimate_costs("default", workers=2)
    assert costs["build"] == pytest.approx(max(seconds["L"], seconds["M"] + seconds["S"]))
    assert demo.estimate_costs("default", workers=1)["build"] == pytest.approx(sum(seconds.values()))


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


def test_phase_finished_without_start_is_an_error():
    steps = demo.Progress({"a": 1.0}, show=False)
    with pytest.raises(RuntimeError):
        steps.finish("a")


@pytest.mark.slow
def test_second_quick_demo_recomputes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENDYN_CACHE", str(tmp_path))
    first = demo.run_demo(preset="quick", progress=False)
    assert set(first["phases"].values()) == {"ran"} and list(first["phases"]) == list(demo.PHASES)
    store_files = {p: p.stat().st_mtime_ns for p in first["store"].rglob("*") if p.is_file()}
    second = demo.run_demo(preset="quick", progress=False)
    assert second["phases"] == {phase: "skipped" for phase in demo.PHASES}
    assert {p: p.stat().st_mtime_ns for p in first["store"].rglob("*") if p.is_file()} == store_files
    assert second["findings"] == first["findings"] and second["analysis_lines"] == first["analysis_lines"]
    assert second["findings"] and second["analysis_lines"]
