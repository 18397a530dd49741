"""The `ds.tokendyn` accessor: domain methods on a tokendyn dataset, delegating to the analysis modules."""

from __future__ import annotations

import numpy as np
import xarray as xr

from tokendyn.data.corpus import PAD


def context_ids(ds: xr.Dataset, token: int, width: int) -> list[int]:
    """Ids of up to `width` stored tokens of the same document before `token`, then the token's own id."""
    lo = max(0, token - width)
    ids = ds["token_id"].values[lo: token + 1]
    docs = ds["doc"].values[lo: token + 1]
    return [int(i) for i in ids[docs == docs[-1]]]


@xr.register_dataset_accessor("tokendyn")
class TokendynAccessor:
    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def token_text(self, token_id: xr.DataArray | np.ndarray | None = None) -> xr.DataArray:
        """Decoded text of tokens (default: every token of the store, dims (token,); "" for -1)."""
        ids = self._ds.token_id if token_id is None else token_id
        ids = ids if isinstance(ids, xr.DataArray) else xr.DataArray(np.asarray(ids))
        vocab = self._ds.vocab_text.values
        return xr.apply_ufunc(lambda i: np.where(i == PAD, "", vocab[np.clip(i, 0, None)]), ids.load(),
                              output_dtypes=[object])

    def context(self, token: int, width: int = 20, mark: tuple[str, str] = ("[[", "]]")) -> str:
        """The text of up to `width` tokens of its document before `token` (an index along the token
        dim), with the token itself between `mark`. Unscored tokens (none in a rolling set) are left out."""
        vocab = self._ds.vocab_text.values
        ids = [vocab[i] for i in context_ids(self._ds, token, width)]
        return f"{''.join(ids[:-1])}{mark[0]}{ids[-1]}{mark[1]}"

    # --- token trajectories: thin wrappers over tokendyn.analysis.trajectories, trends, curves, clusters ---
    # (imported on use: clustering pulls in scikit-learn, which `import tokendyn` should not pay for)

    def x_axis(self, axis: str = "step", params: str = "n_params") -> xr.DataArray:
        """Step, tokens_seen, flops (6 N D) or val_ppl per (model, ckpt); see `trajectories.x_axis`."""
        from tokendyn.analysis import trajectories
        return trajectories.x_axis(self._ds, axis, params)

    def at_perplexity(self, levels=None, n_levels: int = 20) -> xr.DataArray:
        """Loss at matched validation perplexity (model, val_ppl, token); see `trajectories.at_perplexity`."""
        from tokendyn.analysis import trajectories
        return trajectories.at_perplexity(self._ds, levels, n_levels)

    def at_axis(self, axis: str, levels) -> xr.DataArray:
        """Loss at levels of step, tokens_seen, flops or val_ppl; see `trajectories.at_axis`."""
        from tokendyn.analysis import trajectories
        return trajectories.at_axis(self._ds, axis, levels)

    def trend_categories(self, start=None, **options):
        """Stagnated/upward/downward/uncategorised per (model, start, token); see `trends.trend_categories`."""
        from tokendyn.analysis import trends
        return trends.trend_categories(self._ds, trends.STARTS if start is None else start, **options)

    def double_descent(self, tol: float = 0.5, window: int = 3) -> xr.DataArray:
        """Per-token double descent (model, token); see `trajectories.double_descent`."""
        from tokendyn.analysis import trajectories
        return trajectories.double_descent(self._ds, tol, window)

    def subset_curve(self, mask: xr.DataArray) -> xr.DataArray:
        """Perplexity of a token subset in every model and checkpoint; see `trajectories.subset_curve`."""
        from tokendyn.analysis import trajectories
        return trajectories.subset_curve(self._ds, mask)

    def agreement(self, levels=None, top: float = 0.1, **options):
        """Cross-size agreement of loss drops at matched perplexity vs step; see `trajectories.agreement`."""
        from tokendyn.analysis import trajectories
        return trajectories.agreement(self._ds, levels, top, **options)

    def cluster(self, n_clusters="auto", **options):
        """Named clusters of token trajectories; see `clusters.cluster` (token text from the store's vocabulary)."""
        from tokendyn.analysis import clusters
        if "vocab_text" in self._ds.variables:
            options.setdefault("token_text", lambda ids: self.token_text(np.asarray(ids)).values)
        return clusters.cluster(self._ds, n_clusters, **options)

    def curve_measures(self, **options) -> xr.Dataset:
        """Final loss, variability, age of acquisition, forgettability, confidence; see `curves.curve_measures`."""
        from tokendyn.analysis import curves
        return curves.curve_measures(self._ds, **options)

    def rho1_classes(self, first: int = 0, last: int = -1, threshold: float | None = None):
        """Rho-1 classes H->H, L->H, H->L, L->L between two checkpoints; see `curves.rho1_classes`."""
        from tokendyn.analysis import curves
        return curves.rho1_classes(self._ds, first, last, threshold)

    def cartography(self) -> xr.Dataset:
        """Confidence and variability of the true token's probability; see `curves.cartography`."""
        from tokendyn.analysis import curves
        return curves.cartography(self._ds)

    # --- sequence level: tokendyn.analysis.sequences (sets other than this one are read from the store) ---

    def sequence_ppl(self, sets=None, by: str | None = None) -> xr.DataArray:
        """Perplexity of every evaluation set of the store (set, model, ckpt); see `sequences.sequence_ppl`."""
        from tokendyn.analysis import sequences
        return sequences.sequence_ppl(self._ds, sets, by)

    def pair_preference(self, sets=None, reduce: str = "sum") -> xr.DataArray:
        """Share of true/false pairs where the true text has the lower loss (set, model, ckpt);
        see `sequences.pair_preference`."""
        from tokendyn.analysis import sequences
        return sequences.pair_preference(self._ds, sets, reduce)

    def pair_margin(self, sets=None) -> xr.DataArray:
        """Mean loss difference false - true on the tokens where a pair differs; see `sequences.pair_margin`."""
        from tokendyn.analysis import sequences
        return sequences.pair_margin(self._ds, sets)

    def pair_scores(self) -> xr.Dataset:
        """Per-pair loss sums of this pairs set (model, ckpt, pair, side); see `sequences.pair_scores`."""
        from tokendyn.analysis import sequences
        return sequences.pair_scores(self._ds)

    # --- downstream ability against loss: tokendyn.analysis.downstream (tasks and PassUntil runs of the store) ---

    def task_scores(self, tasks=None, prob_per_token: bool = False) -> xr.Dataset:
        """Accuracy, correct-choice probability, Brier score and baselines per (task, model, ckpt);
        see `downstream.task_scores`."""
        from tokendyn.analysis import downstream
        return downstream.task_scores(self._ds, tasks, prob_per_token=prob_per_token)

    def emergence_threshold(self, task: str, metric: str = "accuracy", **options):
        """The loss threshold eta of a task with its bootstrap interval, Spearman's rho with loss and
        the collapse score; see `downstream.emergence`."""
        from tokendyn.analysis import downstream
        return downstream.emergence(self._ds, task, metric, **options)

    def pass_until(self, task: str | None = None, **options) -> xr.Dataset:
        """Per-instance and per-task PassUntil rates with censoring; see `downstream.pass_until`."""
        from tokendyn.analysis import downstream
        return downstream.pass_until(self._ds, task, **options)

    def task_scaling_fit(self, task: str | None = None, x: str = "n_params", **options):
        """F = log(-log PU) against log N or log excess loss: slope, curvature, class, held-out error;
        see `downstream.task_scaling_fit`."""
        from tokendyn.analysis import downstream
        return downstream.task_scaling_fit(self._ds, task, x=x, **options)

    def skill_curves(self, k=(1, 2, 3), tasks=None, **options) -> xr.Dataset:
        """Measured k-tuple competence vs the slingshot prediction and Theorem 8's bound (model, ckpt, k);
        see `downstream.skill_curves`."""
        from tokendyn.analysis import downstream
        return downstream.skill_curves(self._ds, k, tasks, **options)


@xr.register_dataarray_accessor("tokendyn")
class TokendynCurveAccessor:
    """`curve.tokendyn`: methods on a per-checkpoint curve (..., model, ckpt) with `step` and `val_ppl`."""

    def __init__(self, curve: xr.DataArray) -> None:
        self._curve = curve

    def at_perplexity(self, levels=None, n_levels: int = 20) -> xr.DataArray:
        """The curve at matched validation perplexity (..., model, val_ppl); see `sequences.curve_at_perplexity`."""
        from tokendyn.analysis import sequences
        return sequences.curve_at_perplexity(self._curve, levels, n_levels)

    def turning_points(self, tol: float = 0.05) -> xr.Dataset:
        """Where each model's curve has a minimum followed by a rise; see `sequences.turning_points`."""
        from tokendyn.analysis import sequences
        return sequences.turning_points(self._curve, tol)
