"""glibc's malloc thresholds per kind of work (tokendyn.memory): set by the commands, kept off a user's choice.

The behaviour is checked by counting the page faults of repeated allocations (a block mapped afresh
is faulted in again; a block served from the heap is not). What the thresholds save in time and
memory is measured by `benchmarks/scoring.py` and `benchmarks/analysis.py`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import tokendyn.memory
from planted_stores import write_store
from tokendyn import memory
from tokendyn.cli import main

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
SIZES = (25 * 2**20, 64 * 2**20)  # an MLP activation of SmolLM2-135M at 8 x 512 positions; a chunk of logits


def faults_per_allocation() -> dict[str, float]:
    """Minor page faults of allocating (and freeing) an array of each of `SIZES`, after a first one."""
    import resource

    out = {}
    for size in SIZES:
        np.ones(size // 8)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(4):
            np.ones(size // 8)
        out[str(size >> 20)] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
    return out


def in_a_new_process(thresholds: str | None, **env: str) -> tuple[bool, dict[str, float]]:
    """(whether `memory.use(memory.<thresholds>)` set them, faults per allocation) in a fresh interpreter."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    code = (
        "import json, sys; sys.path[:0] = [{tests!r}]; from tokendyn import memory; from test_memory import "
        "faults_per_allocation as f; set = {thresholds} is not None and memory.use(getattr(memory, {thresholds}))\n"
        "print(json.dumps([set, f()]))"
    ).format(tests=os.path.dirname(__file__), thresholds=repr(thresholds))
    done = subprocess.run([sys.executable, "-c", code], env=clean | env, capture_output=True, text=True, check=True)
    return tuple(json.loads(done.stdout))


@glibc
def test_scoring_keeps_repeated_activations_on_the_heap():
    _, default = in_a_new_process(None)
    assert default["64"] > 100  # glibc's own thresholds map a 64 MiB block afresh every time
    was_set, scoring = in_a_new_process("SCORING")
    assert was_set and scoring == {"25": 0, "64": 0}


@glibc
def test_analysis_maps_large_arrays_afresh():
    was_set, analysis = in_a_new_process("ANALYSIS")
    assert was_set and analysis["25"] == 0 and analysis["64"] > 100  # 32 MiB or more: mapped and unmapped


@glibc
@pytest.mark.parametrize("name", ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"])
def test_a_threshold_the_user_set_is_left_alone(name):
    was_set, faults = in_a_new_process("SCORING", **{name: "65536"})
    assert not was_set and faults["64"] > 100


@pytest.fixture
def used(monkeypatch) -> list[memory.Thresholds]:
    calls: list[memory.Thresholds] = []
    monkeypatch.setattr(tokendyn.memory, "use", lambda thresholds: calls.append(thresholds) or True)
    return calls


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_analyze_and_report_use_the_analysis_thresholds(command, tmp_path, used):
    write_store(tmp_path / "s.zarr", np.ones((1, 4, 3, 5)), np.array([[1, 2, 3, 4.0]]))
    args = [command, str(tmp_path / "s.zarr"), "--out", str(tmp_path / "out"), "--quiet", "--studies", "perplexity"]
    assert main(args) == 0
    assert used == [memory.ANALYSIS]


def test_extract_uses_the_scoring_thresholds(tiny_suite, tmp_path, used):
    assert main(["extract", str(tiny_suite), "--out", str(tmp_path / "s.zarr"), "--no-progress"]) == 0
    assert used == [memory.SCORING]


@pytest.mark.parametrize("command", ["generate", "tasks"])
def test_generate_and_tasks_use_the_scoring_thresholds(command, tiny_suite, tmp_path, used):
    # Both score with the models; refused here after the thresholds, on an argument checked later.
    args = {
        "generate": ["generate", str(tiny_suite), "--small", "m@last", "--out", str(tmp_path / "g.jsonl")],
        "tasks": ["tasks", str(tiny_suite), "--task", "t.jsonl", "--out", str(tmp_path / "s.zarr"), "--max-items", "1"],
    }[command]
    assert main(args) != 0
    assert used == [memory.SCORING]


@glibc
def test_workers_of_a_local_cluster_keep_activations_on_the_heap():
    from distributed import Client

    from tokendyn.models.distributed import local_cluster

    with local_cluster(1) as cluster, Client(cluster) as client:
        (environ, faults), *_ = client.run(
            lambda: ({k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}, faults_per_allocation())
        ).values()
    assert environ == memory.SCORING.environment()  # not dask's MALLOC_TRIM_THRESHOLD_=65536
    assert faults == {"25": 0, "64": 0}


def test_a_dask_setting_of_the_user_reaches_the_workers():
    import dask

    from tokendyn.models.distributed import _scoring_workers

    mine = {"MALLOC_TRIM_THRESHOLD_": "131072", "OMP_NUM_THREADS": 1}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": mine}), _scoring_workers():
        assert dask.config.get("distributed.nanny.pre-spawn-environ") == mine
    with _scoring_workers():
        environ = dask.config.get("distributed.nanny.pre-spawn-environ")
    assert {k: environ[k] for k in memory.USER_SETTINGS} == memory.SCORING.environment()
