"""Stores for the report tests: the planted three-size suite of `planted_stores` with a vocabulary
whose token texts need HTML escaping."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import xarray as xr

import tokendyn
from planted_stores import planted_suite
from tokendyn.store import FORMAT_VERSION

HOSTILE = {50: "<script>alert(1)</script>", 51: "&amp;", 40: '"q" <b>bold</b>', 10: "$x$ & y"}


def vocabulary(size: int = 64) -> np.ndarray:
    """Token texts "w<id>", with the hostile texts of HOSTILE at their ids."""
    return np.array([HOSTILE.get(i, f" w{i}") for i in range(size)], dtype=object)


def planted_store_with_vocab(path: Path, **options) -> tuple[xr.Dataset, dict]:
    """`planted_suite` plus a `vocab_text` coordinate; returns (the store opened by tokendyn, truth)."""
    vocab = xr.Dataset(coords={"vocab_text": ("vocab", vocabulary())}, attrs={"tokendyn_version": tokendyn.__version__,
                                                                                  "format_version": FORMAT_VERSION})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's note that consolidated metadata is not in the v3 spec
        _, truth = planted_suite(path, **options)
        vocab.to_zarr(path, mode="a")
    return tokendyn.open_store(path), truth


REPORT_OPTIONS = {"clusters": {"n_clusters": 4}}  # a fixed k: the automatic choice fits k = 2..8


def planted_report(tmp_path_factory) -> Path:
    """A folder with the planted store `p.zarr`, its truth `truth.npz` and the full report on it
    (`report/index.html`, default options but REPORT_OPTIONS), built once per test session: the
    analyses, report and browser tests all read it."""
    from tokendyn.pipelines.report import write_report

    folder = tmp_path_factory.getbasetemp() / "planted_report"
    if not (folder / "report" / "index.html").is_file():
        _, truth = planted_store_with_vocab(folder / "p.zarr")
        np.savez(folder / "truth.npz", **truth)
        write_report(folder / "p.zarr", folder / "report", options=REPORT_OPTIONS, progress=False)
    return folder
