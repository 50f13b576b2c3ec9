"""`llmservice-fetch` against the fake Hub: huggingface_hub's real requests, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from devtools.fakehub import FakeHub
from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

from llmservice_server import fetch as fetch_module
from llmservice_server.fetch import fetch
from llmservice_server.model_cache import MARKER, FetchResult, Layout, UnsafePath, read_progress, relative_file

REPO = "acme/tiny"
WEIGHTS = bytes(range(256)) * 4096  # 1 MiB: an LFS file, checked by sha256
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": WEIGHTS, "tokenizer/vocab.txt": b"a\nb\n"}
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as running:
        yield running


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cli(hub: FakeHub, root: Path, *args: str, termination_log: Path | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "PYTHONPATH": f"{REPO_ROOT / 'server'}{os.pathsep}{REPO_ROOT}"}
    env.pop("HF_TOKEN", None)
    command = [sys.executable, "-m", "llmservice_server.fetch", "--cache-dir", str(root), *args]
    if termination_log is not None:
        command += ["--termination-log", str(termination_log)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_good_fetch_lands_complete_with_its_marker(hub: FakeHub, tmp_path: Path) -> None:
    commit = hub.add_repo(REPO, FILES)
    seen = []
    result = fetch(REPO, None, tmp_path, endpoint=hub.url, report=seen.append)

    layout = Layout(tmp_path, REPO)
    assert result.ok and result.reason == "Fetched" and result.commit == commit
    assert (result.files, result.bytes) == (3, sum(len(v) for v in FILES.values()))
    assert _tree(layout.final) == {**FILES, MARKER: layout.marker.read_bytes()}
    assert FetchResult.from_json(layout.marker.read_text()) == result
    assert not layout.partial.exists() and not layout.progress.exists()
    assert seen[-1].done == seen[-1].total == result.bytes and seen[-1].files_done == 3

    again = fetch(REPO, None, tmp_path, endpoint=hub.url)
    assert again.ok and "already cached" in again.message
    assert len([r for r in hub.requests if r.method == "GET"]) == 4  # one listing and three files, once


def test_a_revision_change_fetches_beside_the_old_copy(hub: FakeHub, tmp_path: Path) -> None:
    first = hub.add_repo(REPO, FILES)
    assert fetch(REPO, first, tmp_path, endpoint=hub.url).ok
    second = hub.add_repo(REPO, {**FILES, "config.json": b'{"model_type": "qwen2"}'})
    assert fetch(REPO, second, tmp_path, endpoint=hub.url).ok
    assert Layout(tmp_path, REPO, first).complete() and Layout(tmp_path, REPO, second).complete()
    assert (Layout(tmp_path, REPO, second).final / "config.json").read_bytes() == b'{"model_type": "qwen2"}'


def test_an_interrupted_fetch_resumes_mid_file(hub: FakeHub, tmp_path: Path) -> None:
    # huggingface_hub writes what it receives in chunks of DOWNLOAD_CHUNK_SIZE: the file needs more
    # than one for a kill part-way to leave something on disk to resume from.
    weights = bytes(range(256)) * ((DOWNLOAD_CHUNK_SIZE + 2 * 2**20) // 256)
    hub.add_repo(REPO, {**FILES, "model.safetensors": weights})
    hold = hub.hold(REPO, "model.safetensors", after=DOWNLOAD_CHUNK_SIZE + 2**20)
    layout = Layout(tmp_path, REPO)
    incomplete = layout.partial / "model.safetensors.incomplete"
    first = _cli(hub, tmp_path, "--repo", REPO)
    try:
        assert hold.reached.wait(60), "the first run never got part-way"
        deadline = time.monotonic() + 30
        while not (incomplete.is_file() and incomplete.stat().st_size >= DOWNLOAD_CHUNK_SIZE):
            assert time.monotonic() < deadline, "the first chunk never reached the disk"
            time.sleep(0.05)
        progress = read_progress(layout.progress)
        assert progress is not None and progress["bytes_total"] == len(weights) + sum(
            len(v) for k, v in FILES.items() if k != "model.safetensors"
        )
        first.send_signal(signal.SIGKILL)  # as a node going away kills a Job's pod
        first.wait(30)
    finally:
        hold.release.set()
        if first.poll() is None:
            first.kill()
            first.wait()
    kept = incomplete.stat().st_size
    sent_before = hub.bytes_sent

    second = _cli(hub, tmp_path, "--repo", REPO)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    result = FetchResult.from_json(out.strip().splitlines()[-1])
    assert result.ok and result.files == 3
    assert hub.ranges("model.safetensors") == [None, f"bytes={kept}-"]
    assert hub.bytes_sent - sent_before < len(weights) - kept + 1024  # the rest, and the small file it had not reached
    assert (layout.final / "model.safetensors").read_bytes() == weights


def test_a_corrupt_file_is_refused_and_not_cached(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo(REPO, FILES)
    hub.corrupt(REPO, "model.safetensors")
    result = fetch(REPO, None, tmp_path, endpoint=hub.url)

    layout = Layout(tmp_path, REPO)
    assert not result.ok and result.reason == "Corrupt" and result.exit_code == 1  # retried by the Job
    assert "model.safetensors" in result.message and hashlib.sha256(WEIGHTS).hexdigest() in result.message
    assert not layout.final.exists()
    assert not any(p.name.startswith("model.safetensors") for p in layout.partial.rglob("*"))


def test_a_private_repo_without_a_token_is_401_in_words(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo(REPO, FILES, token="hf_secret")
    termination = tmp_path / "termination-log"
    run = _cli(hub, tmp_path / "cache", "--repo", REPO, termination_log=termination)
    out, _ = run.communicate(timeout=120)

    result = FetchResult.from_json(out.strip())
    assert run.returncode == 2  # permanent: the Job fails at once instead of retrying
    assert result.reason == "Unauthorized" and "401" in result.message and "tokenSecretRef" in result.message
    assert FetchResult.from_json(termination.read_text()) == result
    assert fetch(REPO, None, tmp_path / "cache", endpoint=hub.url, token="hf_secret").ok


def test_a_gated_repo_says_to_accept_its_terms(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo(REPO, FILES, token="hf_secret", gated=True)
    result = fetch(REPO, None, tmp_path, endpoint=hub.url, token="hf_other")
    assert result.reason in ("Gated", "Unauthorized") and result.exit_code == 2
    assert "gated" in result.message or "no access" in result.message


def test_a_missing_repo_is_404_in_words(hub: FakeHub, tmp_path: Path) -> None:
    result = fetch("acme/nope", None, tmp_path, endpoint=hub.url)
    assert (result.ok, result.reason, result.exit_code) == (False, "RepoNotFound", 2)
    assert "acme/nope" in result.message and "spec.model.source.huggingFace.repo" in result.message
    assert json.loads(result.to_json())["reason"] == "RepoNotFound"


def test_a_missing_revision_is_404_in_words(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo(REPO, FILES)
    result = fetch(REPO, "v9", tmp_path, endpoint=hub.url)
    assert (result.reason, result.exit_code) == ("RevisionNotFound", 2)
    assert "'v9'" in result.message and not Layout(tmp_path, REPO, "v9").final.exists()


def test_an_unreachable_hub_is_retryable(tmp_path: Path) -> None:
    with FakeHub() as gone:
        url = gone.url
    result = fetch(REPO, None, tmp_path, endpoint=url)
    assert (result.reason, result.exit_code) == ("Unreachable", 1)


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/../../b", ""])
def test_file_names_that_leave_the_cache_are_refused(name: str) -> None:
    with pytest.raises(UnsafePath):
        relative_file(name)


def test_a_volume_too_small_is_refused_before_downloading(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo(REPO, FILES)
    real = shutil.disk_usage

    def nearly_full(path: object) -> object:
        usage = real(path)  # type: ignore[arg-type]
        return usage._replace(free=len(WEIGHTS) // 2)

    monkeypatch.setattr(fetch_module.shutil, "disk_usage", nearly_full)
    result = fetch(REPO, None, tmp_path, endpoint=hub.url)
    assert (result.reason, result.exit_code) == ("DiskFull", 2)
    assert "spec.model.cache.size" in result.message and str(len(WEIGHTS) // 2) in result.message
    assert not [r for r in hub.requests if "/resolve/" in r.path], "nothing downloaded into a volume that cannot hold it"


def test_a_branch_that_moved_since_an_interrupted_run_starts_over(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo(REPO, FILES)
    hub.corrupt(REPO, "model.safetensors")  # the first run stops there, with config.json already checked
    assert fetch(REPO, None, tmp_path, endpoint=hub.url).reason == "Corrupt"
    layout = Layout(tmp_path, REPO)
    assert (layout.partial / "config.json").read_bytes() == FILES["config.json"]

    moved = {**FILES, "config.json": b'{"model_type": "qwen2"}'}  # same size would not tell them apart
    hub.add_repo(REPO, moved)
    result = fetch(REPO, None, tmp_path, endpoint=hub.url)
    assert result.ok
    assert (layout.final / "config.json").read_bytes() == moved["config.json"]


def test_fetches_of_one_revision_at_once_download_it_once(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo(REPO, FILES)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: fetch(REPO, None, tmp_path, endpoint=hub.url), range(3)))
    assert all(r.ok for r in results)
    assert sum("already cached" in r.message for r in results) == 2
    assert len(hub.ranges("model.safetensors")) == 1
    assert (Layout(tmp_path, REPO).final / "model.safetensors").read_bytes() == WEIGHTS
