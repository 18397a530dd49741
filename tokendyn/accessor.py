"""The `ds.tokendyn` accessor: domain methods on a tokendyn dataset, delegating to the analysis modules."""

from __future__ import annotations

import numpy as np
import xarray as xr

from tokendyn.corpus import PAD


@xr.register_dataset_accessor("tokendyn")
class TokendynAccessor:
    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def token_text(self, token_id: xr.DataArray | np.ndarray | None = None) -> xr.DataArray:
        """Decoded text of tokens (default: every token of the store, dims (seq, pos); "" on padding)."""
        ids = self._ds.token_id if token_id is None else token_id
        ids = ids if isinstance(ids, xr.DataArray) else xr.DataArray(np.asarray(ids))
        vocab = self._ds.vocab_text.values
        return xr.apply_ufunc(lambda i: np.where(i == PAD, "", vocab[np.clip(i, 0, None)]), ids.load(),
                              output_dtypes=[object])

    def context(self, seq: int, pos: int, width: int = 20, mark: tuple[str, str] = ("[[", "]]")) -> str:
        """The text of up to `width` tokens before token (seq, pos), with the token itself between `mark`."""
        row = self._ds.token_id.isel(seq=seq).values
        vocab = self._ds.vocab_text.values
        left = "".join(vocab[i] for i in row[max(0, pos - width): pos] if i != PAD)
        return f"{left}{mark[0]}{vocab[row[pos]]}{mark[1]}"
