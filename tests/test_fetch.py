"""Prefetch, eviction and `tokendyn download` against a Hugging Face cache built in the test.

The hub cannot be reached from the tests: `huggingface_hub.snapshot_download` is replaced by a
throttled copy from local folders into the cache's layout (blobs named by sha256, snapshots/<commit>
linking to them, refs/<revision>), i.e. what a download leaves behind.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import xarray as xr
from distributed import WorkerPlugin
from huggingface_hub import constants as hub_constants
from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

import tokendyn.models.extract as extract_module
from conftest import build_tokenizer, save_checkpoint
from test_checkpoints import make_hub_cache
from test_discover import unreachable_hub
from tokendyn.cli import main
from tokendyn.config.suite import load_suite
from tokendyn.errors import TokendynError
from tokendyn.models import download, fetch
from tokendyn.models.checkpoints import resolve, weights_fingerprint
from tokendyn.models.extract import extract

REPO = "org/run"


def commit_of(revision: str) -> str:
    return hashlib.sha1(f"{REPO}@{revision}".encode()).hexdigest()


class FakeHub:
    """snapshot_download from local folders: copies the allowed files into the cache, `delay` seconds per call."""

    def __init__(
        self,
        cache: Path,
        remote: dict[str, Path],
        delay: float,
        aliases: dict[str, str] | None = None,
        log: Path | None = None,
    ):
        self.cache, self.remote, self.delay, self.log = cache, remote, delay, log
        self.aliases = aliases or {}  # revision name -> the revision whose commit it points to (main -> step4000)
        self.calls: list[tuple[str, str, float, float]] = []  # (revision, thread, start, end)
        self.weights: list[str] = []  # revisions of the calls that copied weight files

    def __call__(self, repo_id, revision=None, allow_patterns=None, **_):
        start = time.perf_counter()
        repo = self.cache / ("models--" + repo_id.replace("/", "--"))
        commit = commit_of(self.aliases.get(revision, revision))
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        (repo / "blobs").mkdir(exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        if not (repo / "refs" / revision).is_file():
            (repo / "refs" / revision).write_text(commit)
        copied = weights = False
        for file in sorted(self.remote[revision].iterdir()):
            if (snapshot / file.name).exists() or not any(fnmatch.fnmatch(file.name, p) for p in allow_patterns):
                continue
            data = file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            if not blob.exists():  # blobs are shared by content, as in the real cache
                blob.write_bytes(data)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
            copied = True
            if file.suffix == ".safetensors":
                self.weights.append(revision)
                weights = True
        if copied:
            time.sleep(self.delay)
        end = time.perf_counter()
        self.calls.append((revision, threading.current_thread().name, start, end))
        if weights and self.log is not None:  # this call's own copies: other threads share the lists above
            with self.log.open("a") as f:
                f.write(f"{revision} {start} {end} {threading.current_thread().name}\n")
        return str(snapshot)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Four revisions of org/run on the 'hub'; step1000 is already in the cache before the run."""
    tokenizer = build_tokenizer()
    remote = {}
    for index, step in enumerate((1000, 2000, 3000, 4000)):
        remote[f"step{step}"] = tmp_path / "remote" / f"step{step}"
        save_checkpoint(remote[f"step{step}"], "gpt_neox", tokenizer, seed=index)
    cache = tmp_path / "hf" / "hub"
    make_hub_cache(cache, REPO, {"step1000": remote["step1000"]})
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    fake = FakeHub(cache, remote, delay=0.3)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    (tmp_path / "valid.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 4)
    suite = tmp_path / "suite.toml"
    suite.write_text(
        '[eval]\nfiles = ["valid.txt"]\nseq_len = 16\n\n[[models]]\nname = "run"\n'
        f'hub_id = "{REPO}"\nrevisions = ["step1000", "step2000", "step3000", "step4000"]\n'
    )
    return fake, cache, suite


def cache_files(cache: Path) -> dict[str, int]:
    """Every file and link of the cache with its modification time (directories change as entries come and
    go), but lock files (huggingface_hub's and tokendyn's eviction lock live under .locks)."""
    files = (p for p in cache.rglob("*") if not p.is_dir() and p.relative_to(cache).parts[0] != ".locks")
    return {str(p.relative_to(cache)): p.lstat().st_mtime_ns for p in files}


def test_prefetch_downloads_the_next_checkpoint_while_one_is_scored(hub, tmp_path, monkeypatch):
    fake, _, suite = hub
    scoring = []
    real = extract_module.score_checkpoint

    def timed(suite, root, sets, m, c, **kwargs):
        start = time.perf_counter()
        refused = real(suite, root, sets, m, c, **kwargs)
        scoring.append((suite.models[m].checkpoints[c].revision, start, time.perf_counter()))
        return refused

    monkeypatch.setattr(extract_module, "score_checkpoint", timed)
    extract(suite, tmp_path / "s.zarr", prefetch=1, progress=False)
    weights = [call for call in fake.calls if call[1].startswith("tokendyn-prefetch")]
    assert [call[0] for call in weights] == ["step1000", "step2000", "step3000", "step4000"]
    started = {revision: start for revision, _, start, _ in weights}
    for (revision, _, end), following in zip(scoring, ["step2000", "step3000", "step4000"]):
        assert started[following] < end, f"{following} was not fetched while {revision} was scored"


def test_evict_deletes_only_what_the_run_downloaded(hub, tmp_path):
    _, cache, suite = hub
    before = cache_files(cache)
    out = tmp_path / "s.zarr"
    extract(suite, out, evict=True, progress=False)
    repo = cache / "models--org--run"
    assert sorted(p.name for p in (repo / "refs").iterdir()) == ["step1000"]
    assert sorted(p.name for p in (repo / "snapshots").iterdir()) == [commit_of("step1000")]
    assert cache_files(cache) == before  # what was there before is untouched
    assert xr.open_zarr(out).done.values.tolist() == [[True] * 4]


def test_evict_leaves_other_repos_copies_of_the_same_commit(hub, tmp_path):
    """A mirror pushed from the same git history has the same commits; only the run's repo loses its copy
    (was: whichever repo holding the commit huggingface_hub met first, often the user's)."""
    _, cache, suite = hub
    shutil.copytree(cache / "models--org--run", cache / "models--org--fork", symlinks=True)
    before = cache_files(cache)
    suite.write_text(suite.read_text().replace(f'hub_id = "{REPO}"', 'hub_id = "org/mirror"'))
    extract(suite, tmp_path / "s.zarr", evict=True, progress=False)
    assert not list((cache / "models--org--mirror").glob("snapshots/*"))
    assert {k: v for k, v in cache_files(cache).items() if "models--org--mirror" not in k} == before


def test_evict_scans_again_when_another_worker_changed_the_cache(hub, monkeypatch):
    """On a cluster another worker may delete a revision while this one's cache scan lists it: the scan
    then fails on a vanished file, and is tried again."""
    _, cache, _ = hub
    snapshot = cache / "models--org--run" / "snapshots" / commit_of("step1000")
    real, failures = huggingface_hub.scan_cache_dir, []

    def changed_meanwhile(*args, **kwargs):
        if len(failures) < fetch.SCAN_ATTEMPTS - 1:
            failures.append(1)
            raise FileNotFoundError(2, "No such file or directory", str(snapshot))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "scan_cache_dir", changed_meanwhile)
    assert fetch.evict(REPO, "step1000", keep=set()) > 0
    assert not snapshot.exists() and len(failures) == fetch.SCAN_ATTEMPTS - 1

    def always_changing(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(snapshot))

    monkeypatch.setattr(fetch, "SCAN_ATTEMPTS", 2)
    monkeypatch.setattr(huggingface_hub, "scan_cache_dir", always_changing)
    with pytest.raises(FileNotFoundError):  # a cache that keeps changing is an error, not an empty cache
        fetch.cache_state()


def shared_commit_suite(hub, tmp_path) -> Path:
    """`main` points to step4000's commit; model 'final' scores it after model 'run' scored step4000."""
    fake, _, _ = hub
    fake.remote["main"] = fake.remote["step4000"]
    fake.aliases["main"] = "step4000"
    suite = tmp_path / "shared.toml"
    suite.write_text(
        '[eval]\nfiles = ["valid.txt"]\nseq_len = 16\n\n'
        f'[[models]]\nname = "run"\nhub_id = "{REPO}"\nrevisions = ["step2000", "step4000"]\n\n'
        f'[[models]]\nname = "final"\nhub_id = "{REPO}"\ncheckpoints = [{{ step = 4000, revision = "main" }}]\n'
    )
    return suite


@pytest.mark.parametrize("prefetch", [0, 1])
def test_evict_keeps_a_commit_until_every_revision_on_it_is_scored(hub, tmp_path, prefetch):
    fake, cache, _ = hub
    suite = shared_commit_suite(hub, tmp_path)
    before = cache_files(cache)
    out = extract(suite, tmp_path / "s.zarr", evict=True, prefetch=prefetch, progress=False)
    # Each commit's weights were fetched once: step4000's (or main's) were not deleted under the other and refetched.
    assert sorted(fake.aliases.get(revision, revision) for revision in fake.weights) == ["step2000", "step4000"]
    assert cache_files(cache) == before  # and the shared commit is gone once both are scored
    got = xr.open_zarr(out)
    assert got.done.values.tolist() == [[True, True], [True, False]]  # 'final' has one checkpoint
    np.testing.assert_array_equal(got.loss.values[1, 0], got.loss.values[0, 1])  # one commit, one set of weights


def test_extract_without_evict_keeps_the_cache(hub, tmp_path):
    _, cache, suite = hub
    extract(suite, tmp_path / "s.zarr", prefetch=0, progress=False)
    assert len(list((cache / "models--org--run" / "snapshots").iterdir())) == 4


def siblings(folder: Path) -> list[RepoSibling]:
    out = []
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        lfs = (
            BlobLfsInfo(size=len(data), sha256=hashlib.sha256(data).hexdigest(), pointer_size=134)
            if file.suffix == ".safetensors"
            else None
        )
        out.append(RepoSibling(rfilename=file.name, size=len(data), lfs=lfs))
    return out


class FakeApi:
    """HfApi.model_info with files_metadata, answered from the local 'hub' folders (and step3000 = step2000)."""

    def __init__(self, remote: dict[str, Path]) -> None:
        self.remote = remote

    def model_info(self, repo_id, revision, files_metadata):
        assert files_metadata
        return type("Info", (), {"siblings": siblings(self.remote[revision])})


def test_download_plan_sizes_hashes_and_resume(hub, tmp_path):
    fake, cache, suite_path = hub
    fake.remote["step3000"] = fake.remote["step2000"]  # published twice: identical weights
    suite = load_suite(suite_path)
    revisions = download.plan(suite, api=FakeApi(fake.remote))
    sizes = [sum(f.stat().st_size for f in fake.remote[r].iterdir()) for r in ("step1000", "step2000", "step4000")]
    assert sum(download.unique_bytes(revisions)) < sizes[0] + 2 * sizes[1] + sizes[2]  # step3000's weights counted once
    assert [r.missing_bytes == 0 for r in revisions] == [True, False, False, False]  # step1000 is cached
    pairs = download.identical(revisions)
    assert [(a.revision, b.revision) for a, b in pairs] == [("step2000", "step3000")]

    download.download(revisions, progress=False)
    assert all(r.missing_bytes == 0 for r in download.plan(suite, api=FakeApi(fake.remote)))
    # The fingerprint from the hub's hashes equals the one of the files in the cache, which reads no weights.
    assert revisions[1].weights_hash == weights_fingerprint(suite.models[0].checkpoints[1])


def test_only_the_weights_from_pretrained_reads_are_fetched(hub):
    """A revision that also ships other safetensors (Mistral's consolidated.safetensors, adapters) gets and
    hashes only model.safetensors (was: every *.safetensors: twice the download, and a planned weights hash
    unlike the fingerprint of what extract loads)."""
    fake, cache, suite_path = hub
    shutil.copy(fake.remote["step2000"] / "model.safetensors", fake.remote["step2000"] / "consolidated.safetensors")
    suite = load_suite(suite_path)
    revisions = download.plan(suite, api=FakeApi(fake.remote))
    assert "consolidated.safetensors" not in revisions[1].files and "model.safetensors" in revisions[1].files
    download.download(revisions, progress=False)
    ckpt = suite.models[0].checkpoints[1]
    assert not (resolve(ckpt) / "consolidated.safetensors").exists()
    assert revisions[1].weights_hash == weights_fingerprint(ckpt)


def test_download_command_dry_run_then_download(hub, monkeypatch, capsys):
    """`tokendyn download` as a user runs it: the plan with its sizes, nothing fetched on --dry-run, then the
    download and the command to run on the compute nodes."""
    fake, cache, suite_path = hub
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: FakeApi(fake.remote))
    before = cache_files(cache)
    assert main(["download", str(suite_path), "--dry-run", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 hub revisions, ") and "still to download" in out and "done" not in out
    assert cache_files(cache) == before
    assert main(["download", str(suite_path), "-q"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "done: every revision is in the Hugging Face cache; on the compute nodes run "
        f"HF_HUB_OFFLINE=1 tokendyn extract {suite_path} --out STORE"
    )
    assert sorted(revision for revision, *_ in fake.calls) == ["step2000", "step3000", "step4000"]


def test_download_without_network(hub, monkeypatch):
    """huggingface_hub 2 raises httpx2's ConnectError, neither an HfHubHTTPError nor an OSError (was: a traceback)."""
    _, _, suite = hub
    with pytest.raises(
        TokendynError,
        match=r"^cannot read the file list of org/run@step1000 \(.*Connection refused\); "
        "`tokendyn download` needs network access to the hub$",
    ):
        download.plan(load_suite(suite), api=unreachable_hub(monkeypatch))


def test_pickle_weights_are_fetched_only_without_safetensors(hub):
    """--allow-pickle is for checkpoints without safetensors: a revision with both gets its safetensors only
    (was: both, twice the download), in `tokendyn download`'s plan as in the download itself."""
    fake, cache, suite_path = hub
    (fake.remote["step2000"] / "pytorch_model.bin").write_bytes(b"pickled weights")
    (fake.remote["step3000"] / "model.safetensors").rename(fake.remote["step3000"] / "pytorch_model.bin")
    suite = load_suite(suite_path)
    revisions = download.plan(suite, allow_pickle=True, api=FakeApi(fake.remote))
    weights = [sorted(name for name in r.files if "model." in name) for r in revisions]
    assert weights == [["model.safetensors"], ["model.safetensors"], ["pytorch_model.bin"], ["model.safetensors"]]
    both, pickle_only = suite.models[0].checkpoints[1:3]
    assert not (resolve(both, allow_pickle=True) / "pytorch_model.bin").exists()
    assert (resolve(pickle_only, allow_pickle=True) / "pytorch_model.bin").is_file()


def test_cli_version_and_quiet(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("tokendyn ")
    (tmp_path / "valid.txt").write_text("text\n")
    assert main(["extract", "--out", str(tmp_path / "s.zarr"), "--quiet"]) == 2
    assert "give a suite file, or --model" in capsys.readouterr().err


def test_store_equal_with_and_without_prefetch(hub, tmp_path):
    _, _, suite = hub
    a = extract(suite, tmp_path / "a.zarr", prefetch=2, progress=False)
    b = extract(suite, tmp_path / "b.zarr", prefetch=0, progress=False)
    np.testing.assert_array_equal(xr.open_zarr(a).loss.values, xr.open_zarr(b).loss.values)


class FakeHubPlugin(WorkerPlugin):
    """Installs `FakeHub` in every worker process of a cluster (and in any worker a nanny restarts).

    Each download with weights is logged to `log` as "revision start end thread" (worker processes cannot
    report back through the test's FakeHub object).
    """

    def __init__(self, cache: Path, remote: dict[str, Path], delay: float, log: Path, aliases=None) -> None:
        self.cache, self.remote, self.delay, self.log, self.aliases = str(cache), remote, delay, log, aliases

    def setup(self, worker) -> None:
        fake = FakeHub(Path(self.cache), self.remote, self.delay, self.aliases, self.log)
        hub_constants.HF_HUB_CACHE = self.cache
        hub_constants.HF_HUB_OFFLINE = True
        huggingface_hub.snapshot_download = fake


@pytest.mark.slow
def test_cluster_prefetch_and_evict_leave_the_cache_as_before(hub, tmp_path, monkeypatch):
    from distributed import Client

    from tokendyn.models.distributed import local_cluster

    fake, cache, suite = hub
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    before = cache_files(cache)
    reference = extract(suite, tmp_path / "single.zarr", evict=True, prefetch=0, progress=False)
    assert cache_files(cache) == before
    log = tmp_path / "downloads.log"
    with local_cluster(2) as cluster, Client(cluster) as client:
        client.register_plugin(FakeHubPlugin(cache, fake.remote, 0.3, log), name="fake-hub")
        out = extract(
            suite,
            tmp_path / "cluster.zarr",
            evict=True,
            prefetch=1,
            progress=False,
            scheduler=cluster.scheduler_address,
        )
    repo = cache / "models--org--run"
    assert sorted(p.name for p in (repo / "refs").iterdir()) == ["step1000"]  # scored revisions are gone
    assert cache_files(cache) == before  # what was there before is untouched
    downloaded = sorted(line.split()[0] for line in log.read_text().splitlines())
    assert downloaded == ["step2000", "step3000", "step4000"], log.read_text()  # on the workers, each once
    got, want = xr.open_zarr(out), xr.open_zarr(reference)
    for name in ("loss", "done", "val_ppl", "weights_hash"):
        np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)


@pytest.mark.slow
def test_cluster_evict_keeps_a_commit_until_every_revision_on_it_is_scored(hub, tmp_path, monkeypatch):
    from distributed import Client

    from tokendyn.models.distributed import local_cluster

    fake, cache, _ = hub
    suite = shared_commit_suite(hub, tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    before = cache_files(cache)
    log = tmp_path / "downloads.log"
    with local_cluster(2) as cluster, Client(cluster) as client:
        client.register_plugin(FakeHubPlugin(cache, fake.remote, 0.3, log, fake.aliases), name="fake-hub")
        out = extract(
            suite,
            tmp_path / "cluster.zarr",
            evict=True,
            prefetch=1,
            progress=False,
            scheduler=cluster.scheduler_address,
        )
    downloaded = sorted(line.split()[0] for line in log.read_text().splitlines())
    assert downloaded in (["step2000", "step4000"], ["main", "step2000"])  # the shared commit once
    assert cache_files(cache) == before
    assert xr.open_zarr(out).done.values.tolist() == [[True, True], [True, False]]
