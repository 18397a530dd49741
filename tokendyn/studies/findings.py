"""Small helpers that turn numbers into the sentences of a study's findings."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import scipy.stats


def direction(values: Sequence[float], threshold: float = 0.5, x: Sequence[float] | None = None) -> int:
    """+1 if the values rise along their order, -1 if they fall, 0 if neither (or too few).

    By the sign of Spearman's rank correlation with position (or with `x`, one per value; tied x
    share a rank), when |rho| >= threshold; NaNs are dropped; two values compare directly.
    """
    y = np.asarray(values, dtype=float)
    x = np.arange(len(y)) if x is None else np.asarray(x, dtype=float)
    x, y = x[np.isfinite(y)], y[np.isfinite(y)]
    if len(y) < 2 or np.all(y == y[0]) or np.all(x == x[0]):
        return 0
    rho = scipy.stats.spearmanr(x, y).statistic
    return int(np.sign(rho)) if abs(rho) >= threshold else 0


WORDS = {1: "rises", -1: "falls", 0: "shows no clear trend"}

# Why a size-order finding is not testable: the models with a value all have one parameter count.
SAME_SIZE = "no two models of different sizes have a value"


def size_pairs(sizes: Sequence[float]) -> list[tuple[int, int]]:
    """Index pairs (smaller, larger) of models at neighbouring sizes: every model of one size with every
    model of the next larger size. Models of the same size are never paired: a size-order finding
    compares different sizes only, and ties in the parameter count are no order."""
    sizes = np.asarray(sizes, dtype=float)
    levels = np.unique(sizes[np.isfinite(sizes)])
    return [
        (int(i), int(j))
        for small, large in zip(levels, levels[1:])
        for i in np.flatnonzero(sizes == small)
        for j in np.flatnonzero(sizes == large)
    ]


def size_trend(values: Sequence[float], sizes: Sequence[float], threshold: float = 0.5) -> int | None:
    """`direction` of the values (one per model) with model size `sizes` (models of the same size share
    a rank); None when the models with a value do not differ in size (not testable)."""
    values, sizes = np.asarray(values, dtype=float), np.asarray(sizes, dtype=float)
    if not size_pairs(sizes[np.isfinite(values)]):
        return None
    return direction(values, threshold, x=sizes)


def listing(pairs: Iterable[tuple[str, float]], fmt: str = "{:.3g}") -> str:
    """ "a 1.5, b 2" from (name, value) pairs; NaN shown as "n/a"."""
    return ", ".join(f"{name} {'n/a' if not np.isfinite(value) else fmt.format(value)}" for name, value in pairs)


def verdict(holds: Sequence[bool | None], need: str | None = None) -> str:
    """ "reproduces" (every testable case holds), "does not reproduce" (none), "partly reproduces", or
    "is not testable here (needs ...)" when no case can be tested.

    holds: one entry per case; None marks a case the data cannot test (too few checkpoints, levels
    not reached, ...), which counts neither way. need: what a case needs to be testable, stated in
    the verdict (e.g. ">= 3 checkpoints in the trend window").
    """
    testable = [bool(h) for h in holds if h is not None]
    k, n = sum(testable), len(testable)
    if n == 0:
        return f"is not testable here (needs {need})" if need else "is not testable here"
    if k == n:
        return "reproduces"
    if k == 0:
        return "does not reproduce"
    return "partly reproduces"


def counted(holds: Sequence[bool | None]) -> str:
    """ "k of n" over the testable cases (None entries left out), plus how many could not be tested."""
    testable = [bool(h) for h in holds if h is not None]
    untested = len(holds) - len(testable)
    return f"{sum(testable)} of {len(testable)}" + (f"; {untested} not testable" if untested else "")
