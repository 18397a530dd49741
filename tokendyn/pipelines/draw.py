"""Draw the studies' figures in a child process while the next study computes.

Drawing a figure (layout, PNG, SVG) is Python that holds the GIL: it took ~40% of the built-in
demo's report. `FigureDrawer` starts one child, `python -m tokendyn.pipelines.draw`, sends it each
figure pickled over its stdin and reads the paths written back over its stdout, in order. A plain
child process rather than `multiprocessing`: spawning would import the caller's main script again
in the child (running a script without a `__main__` guard twice), and forking a process that runs
torch and dask threads can deadlock. The pickles travel between this process and its own child only.
A figure that does not pickle, or a child that fails, is drawn in this process instead.
"""

from __future__ import annotations

import os
import pickle
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from matplotlib.figure import Figure

import tokendyn
from tokendyn.studies.study import save_figure

Drawn = Callable[[], dict[str, Path]]  # waits for a figure to be drawn; returns its {format: path}


class FigureDrawer:
    """Draws figures with `save_figure` in a child process; `draw` returns at once, its result waits.

    Use as a context manager; leaving it waits for the child to finish every figure sent.
    """

    def __init__(self) -> None:
        path = [str(Path(tokendyn.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}  # this tokendyn, installed or not
        self.child = subprocess.Popen(
            [sys.executable, "-m", "tokendyn.pipelines.draw"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self.outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        # A thread writes to the child: a pickle larger than the pipe's buffer would otherwise block
        # this process until the child has drawn the figure before.
        self.writer = threading.Thread(target=self._write, daemon=True)
        self.writer.start()
        self.sent = 0
        self.replies: list[dict[str, Path] | str | None] = []

    def draw(self, figure: Figure, folder: Path) -> Drawn:
        """Start drawing `figure` into `folder`; the returned function waits for it and returns the paths."""
        try:
            message = pickle.dumps((figure, folder))
        except Exception:  # noqa: BLE001  (a figure holding, e.g., a lambda: drawn here instead)
            paths = save_figure(figure, folder)
            return lambda: paths
        index = self.sent
        self.sent += 1
        self.outbox.put(message)

        def paths() -> dict[str, Path]:
            reply = self._reply(index)
            # A failed drawing is redone here, so that its error is raised in this process.
            return reply if isinstance(reply, dict) else save_figure(figure, folder)

        return paths

    def _reply(self, index: int) -> dict[str, Path] | str | None:
        while len(self.replies) <= index:
            try:
                self.replies.append(pickle.load(self.child.stdout))
            except (EOFError, pickle.UnpicklingError):  # the child died: the rest are drawn here
                self.replies += [None] * (self.sent - len(self.replies))
        return self.replies[index]

    def _write(self) -> None:
        try:
            while (message := self.outbox.get()) is not None:
                self.child.stdin.write(message)
                self.child.stdin.flush()
        except OSError:  # the child died; its missing replies say so
            pass
        finally:
            self.child.stdin.close()

    def __enter__(self) -> FigureDrawer:
        return self

    def __exit__(self, *exc) -> None:
        self.outbox.put(None)
        self.writer.join()
        if exc[0] is not None:
            self.child.kill()
        self.child.wait()


def draw_here(figure: Figure, folder: Path) -> Drawn:
    """`FigureDrawer.draw` in this process (one figure, or a single core: no child worth starting)."""
    paths = save_figure(figure, folder)
    return lambda: paths


def serve() -> None:
    """The child: draw each (figure, folder) read from stdin; write back its paths or the error's text."""
    while True:
        try:
            figure, folder = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        try:
            reply: dict[str, Path] | str = save_figure(figure, folder)
        except Exception as err:  # noqa: BLE001  (the parent draws it again and raises)
            reply = repr(err)
        pickle.dump(reply, sys.stdout.buffer)
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    serve()
