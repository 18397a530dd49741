"""Small helpers that turn numbers into the sentences of a study's findings."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import scipy.stats


def direction(values: Sequence[float], threshold: float = 0.5) -> int:
    """+1 if the values rise along their order, -1 if they fall, 0 if neither (or too few).

    By the sign of Spearman's rank correlation with position, when |rho| >= threshold; NaNs are
    dropped; two values compare directly.
    """
    y = np.asarray(values, dtype=float)
    y = y[np.isfinite(y)]
    if len(y) < 2 or np.all(y == y[0]):
        return 0
    rho = scipy.stats.spearmanr(np.arange(len(y)), y).statistic
    return int(np.sign(rho)) if abs(rho) >= threshold else 0


WORDS = {1: "rises", -1: "falls", 0: "shows no clear trend"}


def listing(pairs: Iterable[tuple[str, float]], fmt: str = "{:.3g}") -> str:
    """"a 1.5, b 2" from (name, value) pairs; NaN shown as "n/a"."""
    return ", ".join(f"{name} {'n/a' if not np.isfinite(value) else fmt.format(value)}" for name, value in pairs)


def verdict(holds: Sequence[bool]) -> str:
    """"reproduces" (every case holds), "does not reproduce" (none), or "partly reproduces"."""
    k, n = int(sum(bool(h) for h in holds)), len(holds)
    if n == 0:
        return "cannot be checked here"
    if k == n:
        return "reproduces"
    if k == 0:
        return "does not reproduce"
    return "partly reproduces"
