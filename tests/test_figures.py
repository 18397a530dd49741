"""Figures against validation perplexity: drawn on the running-minimum envelope (no zig-zag where
validation perplexity rises again, and a finding says so), zoomed to where the curves differ (the
shared fall from random initialisation cut off), with legible tick labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from planted_stores import KIND_TOKENS, KINDS, planted_loss, write_store
from tokendyn.analysis.trajectories import envelope
from tokendyn.studies import clusters, double_descent, subset_curves
from tokendyn.studies.style import on_envelope, perplexity_axis, perplexity_ticks, zoom_perplexity, zoom_start

STEPS = np.arange(0, 1300, 100.0)  # 13 checkpoints
SHARED = 4  # the first checkpoints, where every model has the same loss (the shared fall from init)
RISE = 0.4  # nats every token of the large model gains at its last checkpoint


def _progress(h_max: float) -> np.ndarray:
    """Training progress per checkpoint: the same for every model over the SHARED checkpoints (the
    fall from random init), then larger models get further."""
    shared = np.linspace(0, 0.2, SHARED)
    later = 0.2 + (h_max - 0.2) * np.linspace(0, 1, len(STEPS) - SHARED + 1)[1:]
    return np.concatenate([shared, later])


@pytest.fixture(scope="module")
def bumpy(tmp_path_factory):
    """Two models with planted token kinds; every token starts from the same high loss, the models
    part after SHARED checkpoints, and the large model's validation perplexity rises at its end."""
    rng = np.random.default_rng(1)
    kind = rng.choice(len(KINDS), size=(16, 24), p=(0.2, 0.6, 0.1, 0.1))
    base = rng.uniform(1, 3, kind.shape)
    amp = rng.uniform(1.5, 2.5, kind.shape)
    token_id = np.zeros(kind.shape, np.int64)
    for k, name in enumerate(KINDS):
        token_id[kind == k] = rng.choice(KIND_TOKENS[name], size=int((kind == k).sum()))
    loss = np.zeros((2, len(STEPS), *kind.shape))
    for m, h_max in enumerate((0.6, 1.0)):
        h = _progress(h_max)[:, None, None]
        for k, name in enumerate(KINDS):
            loss[m] = np.where(kind[None] == k, planted_loss(name, base[None], amp[None], h), loss[m])
        loss[m] += 6.0 * np.exp(-np.arange(len(STEPS)) / 0.7)[:, None, None]  # the early fall, shared
    loss[1, -1] += RISE
    loss += rng.normal(0, 0.003, loss.shape)
    steps = np.tile(STEPS, (2, 1))
    return write_store(
        tmp_path_factory.mktemp("bumpy") / "b.zarr",
        loss,
        steps,
        models=["small", "large"],
        token_id=token_id,
        vocab=[f" w{i}" for i in range(64)],
    )


def _ppl_axes(fig: Figure) -> list[Axes]:
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_xscale() == "log" and ax.xaxis_inverted()]


def _drawn_x(ax: Axes) -> list[np.ndarray]:
    """x data of the curves drawn in data coordinates (not axhline/axvline), with 2+ points."""
    lines = [line for line in ax.get_lines() if line.get_transform() == ax.transData]
    return [np.asarray(line.get_xdata(), float) for line in lines if len(line.get_xdata()) >= 2]


def test_the_store_has_a_late_rise(bumpy):
    ppl = bumpy["val_ppl"].values
    assert ppl[1, -1] > ppl[1, -2] and np.all(np.diff(ppl[0]) < 0)


@pytest.mark.parametrize("study", [subset_curves, double_descent])
def test_curves_are_drawn_on_the_envelope_and_the_finding_says_so(bumpy, study):
    result = study.run(bumpy)
    axes = _ppl_axes(result.figure)
    assert axes
    curves = [x for ax in axes for x in _drawn_x(ax)]
    assert curves and all(np.all(np.diff(x) < 0) for x in curves)  # perplexity falls along every line
    high = bumpy["val_ppl"].values[1, -1]  # the large model's last checkpoint, off its envelope
    assert not any(np.isclose(x, high).any() for x in curves)
    bumpy_lines = [f for f in result.findings if "does not fall monotonically" in f]
    assert len(bumpy_lines) == 1 and "large" in bumpy_lines[0] and "small" not in bumpy_lines[0]


def test_a_missing_checkpoint_is_off_the_envelope_and_does_not_end_it():
    ppl = np.array([100.0, 80.0, np.nan, 90.0, 70.0, 75.0, 60.0])
    assert envelope(ppl).tolist() == [True, True, False, False, True, False, True]
    rows = pd.DataFrame({"step": 100 * np.arange(len(ppl)), "val_ppl": ppl}).iloc[::-1]
    assert on_envelope(rows)["step"].tolist() == [0, 100, 400, 600]  # in step order, drawn past the gap
    # without NaN: the running-minimum rule of matched perplexity (strictly lower than every earlier point)
    walk = np.exp(np.cumsum(np.random.default_rng(0).normal(-0.05, 0.1, 200)))
    walk[50] = walk[49]  # a tie is not a new minimum
    np.testing.assert_array_equal(envelope(walk), walk < np.minimum.accumulate(np.r_[np.inf, walk[:-1]]))


def test_without_a_rise_nothing_is_said(bumpy):
    result = subset_curves.run(bumpy.isel(model=[0]))
    assert not any("does not fall monotonically" in f for f in result.findings)


@pytest.mark.parametrize("study", [subset_curves, double_descent])
def test_the_x_axis_starts_where_the_curves_differ(bumpy, study):
    result = study.run(bumpy)
    ppl = bumpy["val_ppl"].values
    shared_end = ppl[0, SHARED - 1]  # the models share every loss down to here
    for ax in _ppl_axes(result.figure):
        left, right = ax.get_xlim()
        assert left < ppl[:, 0].min() / 3  # random init is far off the axis
        assert left < 1.5 * shared_end and right < ppl[:, -1].min()  # the shared fall is cut, the end kept
    assert any("starts where the models' curves begin to differ" in f for f in result.findings)


def test_zoom_start_against_a_hand_made_case():
    x = np.geomspace(1000, 2, 40)
    same = np.log(x)
    apart = np.where(x < 50, np.log(x) + 1.0, np.log(x))  # parts from `same` below 50
    start = zoom_start([(x, same), (x, apart)])
    assert 50 < start < 80  # a little before the parting point, nowhere near 1000
    # the same curve, but one model trained further: what differs is the part only it reaches
    assert 10 < zoom_start([(x[x > 9], same[x > 9]), (x, same)]) < 16
    assert zoom_start([(x, same), (x, same + 1.0)]) is None  # they differ from the start
    assert zoom_start([(x, same)]) is None  # nothing to compare with
    fig = Figure()
    ax = fig.subplots()
    ax.plot(x, same)
    ax.plot(x, apart)
    perplexity_axis(ax)
    assert zoom_perplexity(ax, [(x, same), (x, apart)])
    assert ax.get_xlim()[0] == pytest.approx(start)


def _points_out_of_view(ax: Axes) -> int:
    """Points of the drawn curves inside the x range but outside the y range."""
    (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
    out = 0
    for line in ax.get_lines():
        x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        in_x = (x >= x0) & (x <= x1)
        out += int((in_x & ((y < y0) | (y > y1))).sum())
    return out


@pytest.mark.parametrize("log_y", [False, True])
def test_the_zoomed_y_range_holds_every_point_in_view(log_y):
    """Perplexities in the hundreds on a log y axis: the y range is set in the curves' own units."""
    x = np.geomspace(1000, 2, 30)
    same = 200 + 50 * np.log(x)
    apart = np.where(x < 20, same * (1 + 0.5 * np.log(20 / x)), same)
    fig = Figure()
    ax = fig.subplots()
    ax.plot(x, same)
    ax.plot(x, apart)
    perplexity_axis(ax)
    assert zoom_perplexity(ax, [(x, same), (x, apart)], log_y=log_y)
    if log_y:
        ax.set_yscale("log")
    assert _points_out_of_view(ax) == 0
    lo, hi = ax.get_ylim()
    assert lo > 0.5 * min(same[x <= 20].min(), apart[x <= 20].min()) and hi < 2 * apart.max()


@pytest.mark.parametrize("study", [subset_curves, double_descent])
def test_zoomed_study_panels_show_every_point_in_view(bumpy, study):
    result = study.run(bumpy)
    assert all(_points_out_of_view(ax) == 0 for ax in _ppl_axes(result.figure))


def _tick_labels(fig: Figure, ax: Axes) -> list:
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.get_xticklabels(which="both") if t.get_visible() and t.get_text()]
    lo, hi = sorted(ax.get_xlim())
    labels = [t for t in labels if lo <= t.get_position()[0] <= hi]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in labels]


def _overlap(boxes) -> bool:
    boxes = sorted(boxes, key=lambda b: b.x0)
    return any(a.x1 > b.x0 for a, b in zip(boxes, boxes[1:]))


@pytest.mark.parametrize("span", [(2.0, 6.0), (1.3, 1.9), (3.0, 900.0), (30.4, 39.9)])
def test_perplexity_ticks_are_few_round_and_apart(span):
    fig = Figure(figsize=(3.6, 2.9))
    ax = fig.subplots()
    ax.plot(np.geomspace(*span, 10), np.arange(10))
    perplexity_axis(ax)
    perplexity_ticks(ax)
    labels = _tick_labels(fig, ax)
    assert 3 <= len(labels) <= 6
    values = [float(text) for text, _ in labels]
    assert all((v * 10).is_integer() and (v < 10 or v.is_integer()) for v in values)  # 1.5, 32, never 1.57 or 34.8
    assert not _overlap([box for _, box in labels])


def test_cluster_centroid_axis_is_legible(planted_store):
    result = clusters.run(planted_store[0], n_clusters=4)  # matched perplexity from about 14 to 2
    centroid_axis = result.figure.axes[0]
    labels = _tick_labels(result.figure, centroid_axis)
    assert len(labels) >= 2 and not _overlap([box for _, box in labels])


def test_names_with_dollars_and_invisible_characters_are_drawn_as_written(tmp_path):
    """A `$` in a model name is no mathtext (unbalanced, it failed the drawing); control characters,
    which SVG cannot hold, are shown by code point."""
    import xml.etree.ElementTree as ElementTree

    from tokendyn.studies.study import save_figure
    from tokendyn.studies.style import plain

    fig = Figure()
    ax = fig.subplots()
    ax.plot([0, 1], [1, 0], label="lr $1e-3^$")
    ax.set_yticks([0, 1], ["$x_1$", plain("a\u0001b\u202e")])
    ax.legend()
    paths = save_figure(fig, tmp_path)
    svg = paths["svg"].read_text()
    ElementTree.parse(paths["svg"])  # well-formed
    assert "lr $1e-3^$" in svg and "$x_1$" in svg and "a⟨U+0001⟩b⟨U+202E⟩" in svg
