"""Figures drawn in a child process (`tokendyn.pipelines.draw`): the same files as drawing them here,
in order; a figure that does not pickle, a failed drawing or a dead child fall back to this process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from planted_stores import planted_folder
from tokendyn.pipelines.draw import FigureDrawer
from tokendyn.studies.study import save_figure


def _figure(seed: int) -> Figure:
    fig = Figure(figsize=(3, 2))
    ax = fig.subplots()
    ax.plot(np.random.default_rng(seed).normal(size=20), "o-")
    ax.set_title(f"figure {seed}")
    return fig


def test_the_child_draws_the_same_files_in_order(tmp_path):
    with FigureDrawer() as drawer:
        pending = [drawer.draw(_figure(i), tmp_path / "child" / str(i)) for i in range(3)]
        drawn = [paths() for paths in pending]
    assert all(isinstance(reply, dict) for reply in drawer.replies)  # drawn by the child, not here
    for i, paths in enumerate(drawn):
        here = save_figure(_figure(i), tmp_path / "here" / str(i))
        assert set(paths) == {"png", "svg"}
        assert paths["svg"].read_bytes() == here["svg"].read_bytes()
        assert paths["png"].read_bytes() == here["png"].read_bytes()


def test_a_figure_that_does_not_pickle_is_drawn_here(tmp_path):
    fig = _figure(0)
    fig.axes[0].xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    with FigureDrawer() as drawer:
        paths = drawer.draw(fig, tmp_path / "f")()
    assert drawer.sent == 0 and paths["png"].is_file()


def test_a_failed_drawing_raises_here(tmp_path):
    (tmp_path / "taken").write_text("a file where the figure's folder should be")
    with FigureDrawer() as drawer:
        paths = drawer.draw(_figure(0), tmp_path / "taken")
        with pytest.raises(FileExistsError):
            paths()
    assert isinstance(drawer.replies[0], str)  # the child failed first, then this process


def test_a_dead_child_leaves_the_figures_to_this_process(tmp_path):
    with FigureDrawer() as drawer:
        drawer.child.kill()
        drawer.child.wait()
        drawn = [drawer.draw(_figure(i), tmp_path / str(i)) for i in range(2)]
        assert all(paths()["svg"].is_file() for paths in drawn)
    assert drawer.replies == [None, None]


def test_a_script_without_a_main_guard_runs_once(tmp_path, tmp_path_factory):
    """The child is not the caller's script again (as a spawned multiprocessing worker would be)."""
    store = planted_folder(tmp_path_factory) / "p.zarr"
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from tokendyn.pipelines.report import write_report
            print("script ran")
            write_report({str(store)!r}, {str(tmp_path / "r")!r}, studies=["perplexity", "trends"],
                         progress=False)
            """
        )
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("script ran") == 1
    assert (tmp_path / "r" / "perplexity" / "figure.png").is_file()
