"""Spearman correlation and top-k overlap of per-token values between models, exact, with memory
that does not grow with the number of tokens.

The values (each model's per-token loss drops, NaN where a token has none) arrive a window of
tokens at a time and go to per-model files in a temporary folder. A model's average ranks (ties
share the mean of their ranks, as `scipy.stats.rankdata`) are computed by value ranges: the upper
16 bits of order-preserving integer keys split the values into contiguous ranges of at most
`group` values; each range is gathered in one pass over the file, sorted, ranked (offset by the
count of smaller values) and written to a rank file at its tokens' positions. Equal values share a
key, so ties never straddle two ranges. A pair's statistics are then sums over windows of the two
rank files. Memory: one window and one range (about 40 bytes per value of `group`).
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numba
import numpy as np

WINDOW = 2**18  # tokens read or written at once
GROUP = 2**19  # values sorted at once
RANK_THREADS = 2  # models ranked at once (numpy's sorts release the GIL)


@numba.njit(nogil=True, cache=True)
def average_ranks(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """1-based average ranks of values (ties share the mean of their ranks, as `scipy.stats.rankdata`)
    given the order that sorts them: one float64 array, no temporaries."""
    n = len(values)
    ranks = np.empty(n)
    i = 0
    while i < n:
        j = i
        while j + 1 < n and values[order[j + 1]] == values[order[i]]:
            j += 1
        rank = (i + j + 2) / 2
        for t in range(i, j + 1):
            ranks[order[t]] = rank
        i = j + 1
    return ranks


def _buckets(values: np.ndarray) -> np.ndarray:
    """The upper 16 bits of float64 values as keys in the values' order (-0.0 counted as 0.0)."""
    bits = (values + 0.0).view(np.uint64)  # + 0.0 turns -0.0 into 0.0: equal values, one key
    keys = np.where(bits >> np.uint64(63), ~bits, bits | np.uint64(1 << 63))
    return (keys >> np.uint64(48)).astype(np.int64)


class _Files:
    """Per-token columns (float64 values, ranks; uint8 top flags) in files of one folder, read and
    written a window at a time through short-lived memory maps (a map held open would count every
    page it touched as the process's memory)."""

    def __init__(self, folder: Path, n: int, window: int):
        self.folder, self.n, self.window = folder, n, window

    def create(self, name: str, dtype: type, fill: float) -> None:
        with open(self.folder / name, "wb") as f:
            for begin in range(0, self.n, self.window):
                np.full(min(self.window, self.n - begin), fill, dtype).tofile(f)

    def map(self, name: str, dtype: type, begin: int, end: int, mode: str = "r") -> np.memmap:
        itemsize = np.dtype(dtype).itemsize
        return np.memmap(self.folder / name, dtype, mode, offset=begin * itemsize, shape=(end - begin,))

    def windows(self) -> Iterator[tuple[int, int]]:
        for begin in range(0, self.n, self.window):
            yield begin, min(begin + self.window, self.n)


def _rank(files: _Files, model: int, other: int | None, k: int, group: int) -> tuple[str, str]:
    """Rank model's values over the tokens that `other` has too (all of its tokens if None): files
    of average ranks (NaN elsewhere) and of top-k flags (the k largest; among equal values at the
    boundary, the later tokens). Returns the two files' names."""
    name = f"{model}-{'all' if other is None else other}-{k}"
    ranks, top = f"rank-{name}", f"top-{name}"

    def values(begin: int, end: int) -> np.ndarray:
        v = np.array(files.map(f"values-{model}", np.float64, begin, end))
        if other is not None:
            v[np.isnan(files.map(f"values-{other}", np.float64, begin, end))] = np.nan
        return v

    counts = np.zeros(2**16, np.int64)
    for begin, end in files.windows():
        v = values(begin, end)
        counts += np.bincount(_buckets(v[~np.isnan(v)]), minlength=2**16)
    n = int(counts.sum())
    files.create(ranks, np.float64, np.nan)
    files.create(top, np.uint8, 0)
    cumulative = np.concatenate([[0], np.cumsum(counts)])
    first = 0
    while first < 2**16 and cumulative[first] < n:  # one range of buckets per pass
        last = max(first + 1, int(np.searchsorted(cumulative, cumulative[first] + group, side="right")) - 1)
        before = int(cumulative[first])
        parts, positions = [], []
        for begin, end in files.windows():
            v = values(begin, end)
            where = np.flatnonzero(~np.isnan(v))
            bucket = _buckets(v[where])
            where = where[(bucket >= first) & (bucket < last)]
            parts.append(v[where])
            positions.append(where + begin)
        found, position = np.concatenate(parts), np.concatenate(positions)  # positions ascend
        order = np.argsort(found, kind="stable")  # equal values in token order
        rank = average_ranks(found, order) + before
        flag = np.zeros(len(found), np.uint8)
        flag[order] = before + np.arange(len(found)) >= n - k
        for begin, end in files.windows():
            lo, hi = np.searchsorted(position, [begin, end])
            if hi > lo:
                for column, dtype, data in ((ranks, np.float64, rank), (top, np.uint8, flag)):
                    out = files.map(column, dtype, begin, end, "r+")
                    out[position[lo:hi] - begin] = data[lo:hi]
                    out.flush()
                    del out
        first = last
    return ranks, top


def _pair_sums(files: _Files, a: tuple[str, str], b: tuple[str, str], n: int) -> tuple[float, int]:
    """(Pearson's correlation of the two rank files, as `np.corrcoef`, clipped to [-1, 1]; the
    number of tokens flagged in both top files). Ranks 1..n average (n + 1) / 2 exactly."""
    mean = (n + 1) / 2
    ab = aa = bb = 0.0
    both = 0
    for begin, end in files.windows():
        ra = np.array(files.map(a[0], np.float64, begin, end))
        rb = np.array(files.map(b[0], np.float64, begin, end))
        kept = ~np.isnan(ra)
        da, db = ra[kept] - mean, rb[kept] - mean
        ab, aa, bb = ab + da @ db, aa + da @ da, bb + db @ db
        both += int((files.map(a[1], np.uint8, begin, end) & files.map(b[1], np.uint8, begin, end)).sum())
    return float(np.clip(ab / np.sqrt(aa) / np.sqrt(bb), -1, 1)), both


def pair_statistics(
    blocks: Iterable[np.ndarray],
    models: Sequence[str],
    top: float,
    window: int = WINDOW,
    group: int = GROUP,
) -> list[dict]:
    """Spearman's rho and the top-k Jaccard overlap of per-token values for every pair of models.

    blocks: (model, token) float64 values of consecutive token ranges, in order (NaN: no value).
    The files live in a temporary folder (`tempfile`'s: set TMPDIR to place them): 8 bytes per
    token and model, and 9 per ranking. Each pair is compared on the tokens both models have;
    k = round(top * n) (at least 1) if top < 1, else top. window, group: tokens per read and values
    per sort (they set the memory, not the results).
    Returns one dict per pair: model_a, model_b, n_tokens, top_k, spearman, jaccard, jaccard_chance.
    """
    with tempfile.TemporaryDirectory(prefix="tokendyn-ranks-") as folder:
        n_models, n_tokens = len(models), 0
        with ExitStack() as stack:
            outputs = [stack.enter_context(open(Path(folder) / f"values-{m}", "wb")) for m in range(n_models)]
            for block in blocks:
                for m, out in enumerate(outputs):
                    np.ascontiguousarray(block[m], dtype=np.float64).tofile(out)
                n_tokens += block.shape[1]
        files = _Files(Path(folder), n_tokens, window)
        finite, both = np.zeros(n_models, np.int64), {}
        pairs = list(itertools.combinations(range(n_models), 2))
        for begin, end in files.windows():
            have = [~np.isnan(files.map(f"values-{m}", np.float64, begin, end)) for m in range(n_models)]
            finite += [h.sum() for h in have]
            for a, b in pairs:
                both[a, b] = both.get((a, b), 0) + int((have[a] & have[b]).sum())

        plans = []
        for a, b in pairs:
            n = both[a, b]
            k = max(1, round(top * n)) if top < 1 else int(top)
            # a model's ranks over all its tokens serve every pair that has all of them (n equal to its count)
            keys = [(m, None if n == finite[m] else o, k) for m, o in ((a, b), (b, a))]
            plans.append((a, b, n, k, keys if n >= 3 and k <= n else []))
        with ThreadPoolExecutor(RANK_THREADS) as pool:
            wanted = dict.fromkeys(key for *_, keys in plans for key in keys)  # each ranking once: they share files
            futures = {key: pool.submit(_rank, files, *key, group) for key in wanted}
            ranked = {key: future.result() for key, future in futures.items()}
        rows = []
        for a, b, n, k, keys in plans:
            row = {
                "model_a": models[a],
                "model_b": models[b],
                "n_tokens": n,
                "top_k": k,
                "spearman": np.nan,
                "jaccard": np.nan,
                "jaccard_chance": k / (2 * n - k) if n >= k else np.nan,
            }
            if keys:
                row["spearman"], inter = _pair_sums(files, ranked[keys[0]], ranked[keys[1]], n)
                row["jaccard"] = inter / (2 * k - inter)
            rows.append(row)
        return rows
