"""Analysis: pure functions on the store's xarray datasets (no torch)."""
