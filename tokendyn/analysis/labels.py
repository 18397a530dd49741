"""Per-token categorical labels (trend categories, Rho-1 classes, clusters): integer codes plus names.

Codes are int8 in a lazy DataArray (-1 = no label: padding, first position, or too little data),
so a million tokens cost a megabyte; comparing with a name gives a boolean mask:

    cats.sel(model="m", start=0.2) == "upward"
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from tokendyn.errors import TokendynError
from tokendyn.store.layout import TOKEN_DIMS

MISSING = -1


class TokenLabels:
    """Integer `codes` (a DataArray, -1 = no label) and the `names` that codes 0..n-1 stand for.

    `labels == name` and `labels != name` are boolean masks; both are False where there is no label.
    """

    def __init__(self, codes: xr.DataArray, names: Sequence[str]) -> None:
        self.codes = codes
        self.names = tuple(names)

    def code(self, name: str) -> int:
        """The integer code of a name."""
        if name not in self.names:
            raise TokendynError(f"unknown label {name!r}; the labels are {', '.join(self.names)}")
        return self.names.index(name)

    def __eq__(self, name: object) -> xr.DataArray:  # type: ignore[override]
        return self.codes == self.code(str(name))

    def __ne__(self, name: object) -> xr.DataArray:  # type: ignore[override]
        return (self.codes != self.code(str(name))) & (self.codes != MISSING)

    __hash__ = None  # type: ignore[assignment]

    def sel(self, **indexers) -> TokenLabels:
        return TokenLabels(self.codes.sel(**indexers), self.names)

    def isel(self, **indexers) -> TokenLabels:
        return TokenLabels(self.codes.isel(**indexers), self.names)

    def compute(self) -> TokenLabels:
        return TokenLabels(self.codes.compute(), self.names)

    @property
    def dims(self) -> tuple:
        return self.codes.dims

    def labels(self) -> xr.DataArray:
        """The names as a string DataArray ("" where there is no label). Lazy."""
        lookup = np.array([*self.names, ""], dtype=object)
        return xr.apply_ufunc(lambda c: lookup[np.where(c < 0, len(self.names), c)], self.codes,
                              dask="parallelized", output_dtypes=[object])

    def share(self, dims: Sequence[str] = TOKEN_DIMS) -> xr.DataArray:
        """Percentage of labelled tokens in each category, over `dims`: (..., category). Computed.

        The denominator is the labelled tokens (code >= 0) of each remaining index, e.g. of each
        (model, start); all-missing slices give NaN.
        """
        counts = xr.concat([(self.codes == k).sum(dims) for k in range(len(self.names))], dim="category")
        counts = counts.assign_coords(category=list(self.names)).compute()
        total = counts.sum("category")
        return (100 * counts / total.where(total > 0)).transpose(..., "category").rename("share")

    def to_dataarray(self, name: str) -> xr.DataArray:
        """The codes with the names in `attrs["categories"]`, ready to write to Zarr."""
        return self.codes.rename(name).assign_attrs(categories=list(self.names), missing=MISSING)

    @classmethod
    def from_dataarray(cls, da: xr.DataArray) -> TokenLabels:
        """Inverse of `to_dataarray` (e.g. after reading an analysis store)."""
        return cls(da, da.attrs["categories"])

    def __repr__(self) -> str:
        sizes = ", ".join(f"{dim}: {size}" for dim, size in self.codes.sizes.items())
        return f"<TokenLabels ({sizes}) names={list(self.names)}>"
