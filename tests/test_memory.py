"""glibc's malloc thresholds per kind of work (tokendyn.memory): set by the commands, kept off a user's choice.

The behaviour is checked by counting page faults of repeated allocations (tests/page_faults.py).
What the thresholds save in time and memory is measured by `benchmarks/scoring.py` and
`benchmarks/analysis.py`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from page_faults import MAPPED, ON_HEAP, faults_per_allocation
from planted_stores import write_store
from tokendyn import memory
from tokendyn.cli import main

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
scoring_accepted = pytest.mark.skipif(
    not memory.accepted(memory.SCORING), reason="this glibc caps the mmap threshold at 32 MiB"
)
WORKER_SETTINGS = (*memory.USER_SETTINGS, "MALLOC_ARENA_MAX")
CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from page_faults import faults_per_allocation
from tokendyn import memory
name = {name!r}
was_set = name is not None and memory.use(getattr(memory, name))
print(json.dumps([was_set, faults_per_allocation()]))
"""


def in_a_new_process(name: str | None, **env: str) -> tuple[bool, dict[str, float]]:
    """(whether `memory.use(memory.<name>)` set the thresholds, page faults per allocation), in a new process."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    code = CHILD.format(tests=os.path.dirname(__file__), name=name)
    done = subprocess.run([sys.executable, "-c", code], env=clean | env, capture_output=True, text=True, check=True)
    was_set, faults = json.loads(done.stdout)
    return was_set, faults


@glibc
@scoring_accepted
def test_scoring_keeps_repeated_activations_on_the_heap():
    _, default = in_a_new_process(None)
    assert default["64"] > MAPPED  # glibc's own thresholds map a 64 MiB block afresh every time
    was_set, scoring = in_a_new_process("SCORING")
    assert was_set and max(scoring.values()) < ON_HEAP


@glibc
def test_analysis_maps_large_arrays_afresh():
    was_set, analysis = in_a_new_process("ANALYSIS")
    assert was_set and analysis["25"] < ON_HEAP and analysis["64"] > MAPPED  # 32 MiB or more: mapped


@glibc
@scoring_accepted
@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_TRIM_THRESHOLD_": "65536"},
        {"MALLOC_MMAP_THRESHOLD_": "65536"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=65536"},
    ],
)
def test_a_threshold_the_user_set_is_left_alone(env):
    was_set, faults = in_a_new_process("SCORING", **env)
    assert not was_set and faults["64"] > MAPPED


def test_thresholds_fit_mallopt():
    with pytest.raises(ValueError, match="outside"):
        memory.Thresholds(mmap=256 * memory.MiB, trim=4 * 2**30)  # a C int would wrap it


@pytest.fixture
def used(monkeypatch) -> list[memory.Thresholds]:
    calls: list[memory.Thresholds] = []
    monkeypatch.setattr(memory, "use", lambda thresholds: calls.append(thresholds) or True)
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


@pytest.mark.parametrize("command", ["generate", "tasks", "passuntil"])
def test_the_other_scoring_commands_use_the_scoring_thresholds(command, tiny_suite, tmp_path, used):
    # Each scores with the models; refused here after the thresholds, on an argument checked later.
    args = {
        "generate": ["generate", str(tiny_suite), "--small", "m@last", "--out", str(tmp_path / "g.jsonl")],
        "tasks": ["tasks", str(tiny_suite), "--task", "t.jsonl", "--out", str(tmp_path / "s.zarr"), "--max-items", "1"],
        "passuntil": ["passuntil", str(tiny_suite), "--task", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)],
    }[command]
    assert main(args) != 0
    assert used == [memory.SCORING]


@glibc
@scoring_accepted
@pytest.mark.skipif(
    memory.user_set() or "MALLOC_ARENA_MAX" in memory.start_environment(),
    reason="this test process started with glibc settings of the user's",
)
def test_workers_of_a_local_cluster_keep_activations_on_the_heap(monkeypatch):
    from distributed import Client

    from tokendyn.models.distributed import local_cluster

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # as an earlier cluster's nanny leaves it here
    with local_cluster(1) as cluster, Client(cluster) as client:
        assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # this process's environment is as it was
        assert "MALLOC_MMAP_THRESHOLD_" not in os.environ
        (environ,) = client.run(lambda: {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}).values()
        # In a task's thread, as scoring runs. The worker's other threads share the one arena and now and
        # then take the low end of a freed block, so the best of three runs: mapped afresh, none is near 0.
        runs = [client.submit(faults_per_allocation, pure=False).result() for _ in range(3)]
    assert {k: environ.get(k) for k in WORKER_SETTINGS} == memory.SCORING.environment() | {"MALLOC_ARENA_MAX": "1"}
    assert max(min(run[size] for run in runs) for size in runs[0]) < ON_HEAP


def test_workers_get_the_scoring_settings_and_this_process_keeps_its_own(monkeypatch):
    import dask

    from tokendyn.models import distributed

    monkeypatch.setattr(memory, "user_set", lambda: False)
    monkeypatch.setattr(memory, "accepted", lambda thresholds: True)
    monkeypatch.setattr(memory, "start_environment", lambda: {"MALLOC_ARENA_MAX": "4"})
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the user's, from the start: dask lets it win
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # left by an earlier nanny: would override
    monkeypatch.setenv("MALLOC_PERTURB_", "3")  # set at run time, not one of the workers' settings
    with distributed._scoring_workers():
        assert dask.config.get(distributed.PRE_SPAWN)["MALLOC_MMAP_THRESHOLD_"] == str(memory.SCORING.mmap)
        assert "MALLOC_TRIM_THRESHOLD_" not in os.environ
        assert os.environ["MALLOC_ARENA_MAX"] == "4" and os.environ["MALLOC_PERTURB_"] == "3"
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "1"  # what a nanny writes here when it starts a worker
    assert {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} == {
        "MALLOC_ARENA_MAX": "4",
        "MALLOC_TRIM_THRESHOLD_": "65536",
        "MALLOC_PERTURB_": "3",
    }


def test_a_dask_configuration_of_the_user_is_kept():
    import dask

    from tokendyn.models.distributed import PRE_SPAWN, _scoring_workers

    mine = {"MALLOC_TRIM_THRESHOLD_": "131072", "OMP_NUM_THREADS": 1}
    with dask.config.set({PRE_SPAWN: mine}), _scoring_workers():
        assert dask.config.get(PRE_SPAWN) == mine
