"""Perplexity of each named evaluation set (generated, corrupted, other text) over training in every
model, at matched validation perplexity, where it turns, and how its final value scales with size
(methods.md §1.4). The main set is left out (its curve is the validation perplexity itself), and so
are task sets (the downstream study reads those)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from tokendyn.analysis.sequences import curve_at_perplexity, sequence_ppl, turning_points
from tokendyn.errors import TokendynError
from tokendyn.store import TASK_SET_PREFIX, list_sets
from tokendyn.studies.findings import SAME_SIZE, size_trend, verdict
from tokendyn.studies.study import (
    Result,
    Skip,
    Source,
    default_of,
    main_set_path,
    model_sizes,
    models_by_size,
    open_source,
    require,
)
from tokendyn.studies.style import (
    ZOOM_FINDING,
    envelope_findings,
    log_scale,
    model_colors,
    model_legend,
    new_figure,
    on_envelope,
    perplexity_axis,
    zoom_perplexity,
)

TITLE = "Perplexity of the evaluation sets over training"
INVERSE_MIXTURE = "1,-1"  # text decoded from p_small - p_large (methods.md §1.4)


def named_sets(ds: xr.Dataset) -> list[str]:
    """The store's named sets other than task sets (the downstream study reads those); Skip if none."""
    path = main_set_path(ds, "evaluation sets")
    names = [n for n in list_sets(path) if not n.startswith(TASK_SET_PREFIX)]
    if not names:
        raise Skip("the store has no named evaluation sets (add some with tokendyn extract --set / --pairs)")
    return names


def values_at(curve: xr.DataArray, models: list[str], at: int = -1) -> list[float]:
    """Each model's value at its last (at=-1) or first (at=0) checkpoint with a value; NaN if none has one."""
    out = []
    for model in models:
        values = curve.sel(model=model).values
        done = np.flatnonzero(np.isfinite(values))
        out.append(float(values[done[at]]) if len(done) else np.nan)
    return out


def _set_sentence(name: str, turns: xr.Dataset, final: list[float], models: list[str], sizes: np.ndarray) -> str:
    turned = [
        f"{m} (at validation perplexity {float(turns.sel(model=m)['turn_val_ppl']):.3g})"
        for m in models
        if bool(turns.sel(model=m)["turns"])
    ]
    size = {
        1: "rises with model size: inverse scaling",
        -1: "falls with model size",
        0: "shows no order by size",
        None: f"not comparable by size: {SAME_SIZE}",
    }
    text = f"Set {name}: final perplexity " + ", ".join(f"{m} {v:.3g}" for m, v in zip(models, final))
    if len(models) > 1:
        text += f" ({size[size_trend(final, sizes, 0.9)]})"
    return (
        text
        + (
            "; it turns (minimum, then rises) in " + ", ".join(turned)
            if turned
            else "; it never turns up over training"
        )
        + "."
    )


def _by_size(values: list[float], sizes: np.ndarray, expected: int) -> bool | None:
    """Whether the values follow model size in the `expected` direction (None: the sizes do not differ)."""
    trend = size_trend(values, sizes, 0.9)
    return None if trend is None else trend == expected


def _paper_claims(curve: xr.DataArray, turns: xr.Dataset, models: list[str], sizes: np.ndarray) -> list[str]:
    lines = []
    inverse = [str(s) for s in curve["set"].values if str(curve["group"].sel(set=s).values) == INVERSE_MIXTURE]
    for name in inverse:
        final = values_at(curve.sel(set=name), models)
        lines.append(
            f"Paper: text decoded from p_small - p_large is scored worse by larger final models; for {name} "
            f"this {verdict([_by_size(final, sizes, 1)])}."
        )
        smallest_falls = not bool(turns.sel(set=name, model=models[0])["turns"])
        lines.append(
            f"Paper: the smallest model keeps lowering its perplexity on it; here ({models[0]}) this "
            f"{verdict([smallest_falls])}."
        )
        if len(models) > 2:
            larger_rise = [bool(turns.sel(set=name, model=m)["turns"]) for m in models[1:]]
            lines.append(
                f"Paper: mid-size and larger models raise it again over training; here this "
                f"{verdict(larger_rise)} ({sum(larger_rise)} of {len(larger_rise)})."
            )
    corrupted = [str(s) for s in curve["set"].values if np.isfinite(float(curve["corrupt"].sel(set=s)))]
    if corrupted and len(models) > 1:
        holds = [_by_size(values_at(curve.sel(set=s), models), sizes, -1) for s in corrupted]
        lines.append(
            f"Paper: on text with randomly replaced tokens perplexity still falls with size; here this "
            f"{verdict(holds)} ({sum(h is True for h in holds)} of {sum(h is not None for h in holds)} corrupted "
            "sets that can be compared by size)."
        )
    return lines


def run(
    source: Source,
    by: str | None = "mixture",
    tol: float = default_of(turning_points, "tol"),
    levels: Sequence[float] | None = None,
    n_levels: int = default_of(curve_at_perplexity, "n_levels"),
    max_panels: int = 12,
) -> Result:
    """Perplexity of every named set (split by the per-sequence coordinate `by`
    where a set has it; None keeps sets whole) in every model and checkpoint against validation
    perplexity; read at matched validation perplexities (see
    `tokendyn.analysis.sequences.curve_at_perplexity` for levels and n_levels); turning points with
    tolerance `tol` (log units); at most `max_panels` panels (the tables hold every set)."""
    ds = open_source(source)
    require(ds, "loss", "step", "val_ppl")
    names = named_sets(ds)
    curve = sequence_ppl(ds, sets=names, by=by)
    turns = turning_points(curve, tol)
    models = models_by_size(ds)
    sizes = model_sizes(ds, models)
    colors = model_colors(ds)
    table = curve.to_dataframe().reset_index()
    columns = ["set", "source_set", "group", "kind", "corrupt", "model", "ckpt", "step", "val_ppl", "sequence_ppl"]
    table = table[[c for c in columns if c in table.columns]].dropna(subset=["sequence_ppl"])
    turn_table = turns.to_dataframe().reset_index()
    tables = {"sequence_ppl": table, "sequence_turns": turn_table}
    findings = []
    try:
        matched = curve_at_perplexity(curve, levels, n_levels).to_dataframe().reset_index()
        tables["sequence_ppl_matched"] = matched[["set", "model", "val_ppl", "step", "sequence_ppl"]]
    except TokendynError as err:
        findings.append(f"No matched-perplexity table ({err}).")

    shown = [str(s) for s in curve["set"].values][:max_panels]
    fig, panels = new_figure(len(shown))
    zoomed = False
    for ax, name in zip(panels, shown):
        drawn = []
        for model in models:
            rows = on_envelope(table[(table.set == name) & (table.model == model)])  # no zig-zag
            ax.plot(rows["val_ppl"], rows["sequence_ppl"], "o-", ms=3, color=colors[model])
            drawn.append((rows["val_ppl"].to_numpy(), rows["sequence_ppl"].to_numpy()))
            t = turns.sel(set=name, model=model)
            if bool(t["turns"]):
                ax.plot(float(t["turn_val_ppl"]), float(t["turn_value"]), "v", ms=9, mfc="none", color=colors[model])
        perplexity_axis(ax, "validation perplexity (log, training →)")
        zoomed |= zoom_perplexity(ax, drawn, log_y=True)
        log_scale(ax, "y")
        ax.set_ylabel("set perplexity (log scale)")
        ax.set_title(name, fontsize="medium")
        ax.grid(alpha=0.3)
    model_legend(fig, colors, title="model (▽ turn)")
    fig.suptitle(TITLE)

    findings += [
        _set_sentence(str(s), turns.sel(set=s), values_at(curve.sel(set=s), models), models, sizes)
        for s in curve["set"].values
    ]
    if len(curve["set"]) > len(shown):
        findings.append(f"The figure shows the first {len(shown)} of {len(curve['set'])} sets; the table has all.")
    findings += _paper_claims(curve, turns, models, sizes)
    findings += envelope_findings(ds) + ([ZOOM_FINDING] if zoomed else [])
    return Result(TITLE, tables, fig, findings)
