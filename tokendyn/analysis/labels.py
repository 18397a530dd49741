"""Per-token categorical labels (trend categories, Rho-1 classes, clusters) as plain xarray, and the
attributes of derived arrays (`describe`).

A label array is an int8 DataArray of codes with the CF Conventions' flag attributes:
`flag_values` (0, 1, ..., n-1) and `flag_meanings` (the names, blank-separated, spaces written
as underscores), plus `long_name`. Code -1 (`MISSING`) means no label: padding, the first
position, or too little data; it is not a flag value. A million tokens cost a megabyte, the arrays
stay lazy, write to Zarr as they are, and tools that read CF flags (e.g. cf_xarray) understand
them. The helpers below turn names into masks and codes into names and shares:

    cats = ds.tokendyn.trend_categories()
    upward = label_mask(cats.sel(model="m", start=0.2), "upward")
    label_share(cats)  # percent of labelled tokens per (model, start, category)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from tokendyn.errors import TokendynError
from tokendyn.store.layout import TOKEN_DIMS

MISSING = -1


def describe(da: xr.DataArray, long_name: str, units: str | None = None, **attrs: Any) -> xr.DataArray:
    """`da` with exactly these attributes: a derived array otherwise keeps its input's (e.g. the loss's
    `units: nats` on a perplexity, a share or a step), and xarray's plots label axes from them."""
    out = da.copy(deep=False)
    out.attrs = {"long_name": long_name, **({"units": units} if units else {}), **attrs}
    return out


def flag_array(codes: xr.DataArray, names: Sequence[str], name: str, long_name: str, **attrs: Any) -> xr.DataArray:
    """Integer codes (code k stands for names[k], -1 = no label) as an int8 CF flag DataArray.

    Attributes of `codes` (e.g. the `units` of the loss it was computed from) are dropped; `attrs`
    adds others (e.g. a threshold).
    """
    out = codes.astype(np.int8).rename(name)
    out.attrs = {
        "long_name": long_name,
        "flag_values": np.arange(len(names), dtype=np.int8),
        "flag_meanings": " ".join(n.replace(" ", "_") for n in names),
        "comment": f"{MISSING}: no label",
        **attrs,
    }
    return out


def flag_names(labels: xr.DataArray) -> tuple[str, ...]:
    """The names of codes 0, 1, ..., n-1 of a label array (underscores of `flag_meanings` read as spaces)."""
    if "flag_meanings" not in labels.attrs:
        raise TokendynError(
            f"{labels.name or 'this array'} has no flag_meanings attribute; pass a label array "
            "(e.g. from ds.tokendyn.trend_categories())"
        )
    return tuple(n.replace("_", " ") for n in labels.attrs["flag_meanings"].split())


def flag_code(labels: xr.DataArray, name: str) -> int:
    """The integer code of a label name."""
    names = flag_names(labels)
    if name not in names:
        raise TokendynError(f"unknown label {name!r}; the labels are {', '.join(names)}")
    return names.index(name)


def label_mask(labels: xr.DataArray, name: str) -> xr.DataArray:
    """Boolean mask of the tokens labelled `name` (False where there is no label). Lazy."""
    return (labels == flag_code(labels, name)).rename(name).assign_attrs(long_name=f"token is labelled {name}")


def label_text(labels: xr.DataArray) -> xr.DataArray:
    """The label names as a string DataArray ("" where there is no label). Lazy."""
    names = flag_names(labels)
    lookup = np.array([*names, ""], dtype=object)
    text = xr.apply_ufunc(
        lambda c: lookup[np.where(c < 0, len(names), c)],
        labels,
        dask="parallelized",
        output_dtypes=[object],
        keep_attrs=False,
    )
    return text.assign_attrs(long_name=labels.attrs.get("long_name", "label"))


def label_share(labels: xr.DataArray, dims: Sequence[str] = TOKEN_DIMS) -> xr.DataArray:
    """Percentage of labelled tokens in each category, over `dims`: (..., category). Computed.

    The denominator is the labelled tokens (code >= 0) of each remaining index, e.g. of each
    (model, start); all-missing slices give NaN.
    """
    names = flag_names(labels)
    counts = xr.concat([(labels == k).sum(dims) for k in range(len(names))], dim="category")
    counts = counts.assign_coords(category=list(names)).compute()
    total = counts.sum("category")
    share = (100 * counts / total.where(total > 0)).transpose(..., "category").rename("share")
    share.attrs = {"long_name": f"share of labelled tokens ({labels.attrs.get('long_name', 'label')})", "units": "%"}
    return share
