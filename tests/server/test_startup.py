"""/startupz says where the start-up went: the phases' seconds, and bytes done while downloading."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from devtools.fakehub import FakeHub

from llmservice_server.fetch import fetch
from llmservice_server.startup import StageClock
from tests.server.conftest import STARTUP_DEADLINE, ServerProcess


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_clock_adds_up_each_phase_and_counts_the_one_under_way() -> None:
    clock = _Clock()
    stages = StageClock(clock)
    stages.mark("starting")
    clock.now += 1.0
    stages.mark("fetching")
    clock.now += 4.0
    stages.mark("loading")
    clock.now += 2.0
    stages.mark("loading_model")  # the same phase: no restart
    clock.now += 3.0
    stages.mark("warming")
    clock.now += 0.5
    assert stages.seconds() == {"fetch": 4.0, "load": 5.0, "warmup": 0.5}
    stages.mark("ready")
    clock.now += 60.0
    assert stages.seconds() == {"fetch": 4.0, "load": 5.0, "warmup": 0.5}
    assert stages.phase is None


def test_a_local_model_reports_no_fetch() -> None:
    clock = _Clock()
    stages = StageClock(clock)
    stages.mark("loading")
    clock.now += 1.25
    stages.mark("warming")
    clock.now += 0.25
    stages.mark("ready")
    assert stages.seconds() == {"load": 1.25, "warmup": 0.25}


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as running:
        yield running


def test_a_hub_model_reports_its_download_then_its_phases(hub: FakeHub, tiny_model_dir: Path, tmp_path: Path) -> None:
    files = {str(p.relative_to(tiny_model_dir)): p.read_bytes() for p in sorted(tiny_model_dir.rglob("*")) if p.is_file()}
    weights = max(files, key=lambda name: len(files[name]))
    hub.add_repo("acme/tiny", files)
    hold = hub.hold("acme/tiny", weights, after=len(files[weights]) // 2)
    server = ServerProcess(Path("acme/tiny"), tmp_path / "server.log", env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"})
    try:
        assert hold.reached.wait(STARTUP_DEADLINE), server.logs()
        body = _startupz(server)
        assert body["stage"] == "fetching" and body["status"] == "starting"
        assert body["progress"]["bytes_total"] == sum(len(v) for v in files.values())
        assert body["progress"]["files_total"] == len(files)
        assert body["progress"]["bytes_done"] < body["progress"]["bytes_total"]
        assert body["stages"]["fetch"] > 0
        hold.release.set()  # the connection drops; the fetch resumes the file from where it was

        server.wait_ready()
        done = server.get("/startupz")
        assert done.status_code == 200
        stages = done.json()["stages"]
        assert set(stages) == {"fetch", "load", "warmup"} and all(v > 0 for v in stages.values())
        assert "progress" not in done.json()
        assert len(hub.ranges(weights)) == 2  # the dropped connection, and the retry that completed the file
        answer = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2}, timeout=60)
        assert answer.status_code == 200
    finally:
        hold.release.set()
        server.stop()


def _startupz(server: ServerProcess) -> dict[str, object]:
    deadline = time.monotonic() + STARTUP_DEADLINE
    while True:
        try:
            response = server.get("/startupz")
            body = response.json()
            if body.get("stage") == "fetching" and body.get("progress"):
                return dict(body)
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"/startupz never reported the download:\n{server.logs()}"
        time.sleep(0.1)


def test_a_model_from_the_cache_volume_loads_offline_with_no_fetch(hub: FakeHub, tiny_model_dir: Path, tmp_path: Path) -> None:
    # What a replica with spec.model.cache does: the Job fetched the revision; the pod loads its directory offline.
    files = {str(p.relative_to(tiny_model_dir)): p.read_bytes() for p in sorted(tiny_model_dir.rglob("*")) if p.is_file()}
    commit = hub.add_repo("acme/tiny", files)
    fetched = fetch("acme/tiny", commit, tmp_path / "volume", endpoint=hub.url)
    assert fetched.ok and fetched.path is not None
    requests_before = len(hub.requests)

    server = ServerProcess(Path(fetched.path), tmp_path / "server.log", env={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": hub.url})
    try:
        server.wait_ready()
        stages = server.get("/startupz").json()["stages"]
        assert "fetch" not in stages and stages["load"] > 0
        assert len(hub.requests) == requests_before, "a cached replica never asks the Hub"
    finally:
        server.stop()
