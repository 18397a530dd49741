"""`tokendyn analyze` and `report` fix glibc's malloc thresholds, unless the user set them (tokendyn.cli.memory).

What the thresholds save (the peak's growth with the number of tokens) is measured by
`benchmarks/analysis.py`, side by side with glibc's own thresholds.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import tokendyn.cli.analyze
import tokendyn.cli.report
from planted_stores import write_store
from tokendyn.cli import main

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


def set_in_a_new_process(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    code = "from tokendyn.cli.memory import return_freed_memory; print(return_freed_memory())"
    done = subprocess.run([sys.executable, "-c", code], env=clean | env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@glibc
def test_thresholds_are_set_by_mallopt():
    assert set_in_a_new_process() == "True"  # mallopt accepted both


@glibc
@pytest.mark.parametrize("name", ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"])
def test_a_threshold_the_user_set_is_left_alone(name):
    assert set_in_a_new_process(**{name: "65536"}) == "False"


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_analyze_and_report_set_them(command, tmp_path, monkeypatch):
    calls = []
    module = tokendyn.cli.analyze if command == "analyze" else tokendyn.cli.report
    monkeypatch.setattr(module, "return_freed_memory", lambda: calls.append(command) or True)
    write_store(tmp_path / "s.zarr", np.ones((1, 4, 3, 5)), np.array([[1, 2, 3, 4.0]]))
    args = [command, str(tmp_path / "s.zarr"), "--out", str(tmp_path / "out"), "--quiet", "--studies", "perplexity"]
    assert main(args) == 0
    assert calls == [command]
