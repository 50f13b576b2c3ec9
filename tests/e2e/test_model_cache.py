"""spec.model.cache and status.startup on the real control plane, with the operator as a process.

No storage provisioner runs here, so the cache volume stays unbound and the fetch Job's pod is
never scheduled: the test plays the kubelet. It runs `llmservice-fetch`'s code in this process
against the fake Hub (as the Job's container would), and writes the pod's end - phase, exit code
and the fetch's JSON as the termination message - into the pod's status, as the kubelet does. The
Job controller and the operator take it from there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devtools.controlplane import ControlPlane
from devtools.fakehub import FakeHub
from devtools.operator_harness import OperatorProcess, apply_manifest, condition, get_json, service_account_kubeconfig
from devtools.waiting import wait_for
from tests.e2e.test_operator import llmservice, wait_ready

from llmservice_server.fetch import fetch
from llmservice_server.model_cache import FetchResult

TIMEOUT = 90
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": bytes(range(256)) * 64, "tokenizer.json": b"{}"}


@pytest.fixture(scope="module")
def operator(cluster: ControlPlane, chart: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    workdir = tmp_path_factory.mktemp("operator")
    process = OperatorProcess(service_account_kubeconfig(cluster, workdir / "kubeconfig"), workdir / "operator.log")
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    with FakeHub() as running:
        yield running


def _status(cluster: ControlPlane, name: str, namespace: str) -> dict[str, Any]:
    return dict(get_json(cluster, "llmsvc", name, "-n", namespace).get("status") or {})


def _wait_status(cluster: ControlPlane, operator: OperatorProcess, name: str, namespace: str, what: str, predicate: Any) -> dict[str, Any]:
    try:
        wait_for(lambda: predicate(_status(cluster, name, namespace)), TIMEOUT, what)
    except Exception as error:
        raise AssertionError(f"{error}\nstatus: {_status(cluster, name, namespace)}\noperator log:\n{operator.log_tail()}") from error
    return _status(cluster, name, namespace)


def _fetch_pod(cluster: ControlPlane, name: str, namespace: str) -> dict[str, Any]:
    def pods() -> list[dict[str, Any]]:
        return list(get_json(cluster, "pods", "-n", namespace, "-l", f"job-name={name}-fetch")["items"])

    wait_for(lambda: bool(pods()), TIMEOUT, f"the pod of Job {namespace}/{name}-fetch")
    return pods()[0]


def _finish_like_the_kubelet(cluster: ControlPlane, pod: dict[str, Any], result: FetchResult) -> None:
    container = pod["spec"]["containers"][0]
    now = "2026-12-07T10:00:00Z"
    status = {
        "phase": "Succeeded" if result.ok else "Failed",
        "containerStatuses": [
            {
                "name": container["name"],
                "image": container["image"],
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {
                    "terminated": {
                        "exitCode": result.exit_code,
                        "reason": "Completed" if result.ok else "Error",
                        "message": result.to_json(),
                        "startedAt": now,
                        "finishedAt": now,
                    }
                },
            }
        ],
    }
    cluster.kubectl(
        "patch",
        "pod",
        pod["metadata"]["name"],
        "-n",
        pod["metadata"]["namespace"],
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


def _bind_volume(cluster: ControlPlane, namespace: str, claim: str, path: Path) -> str:
    """A PersistentVolume pre-bound to the claim (the control plane has no provisioner)."""
    name = f"pv-{namespace}"
    apply_manifest(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "hostPath": {"path": str(path)},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
    )
    return name


def test_a_cached_model_is_fetched_once_then_served(
    cluster: ControlPlane, operator: OperatorProcess, namespace: str, hub: FakeHub, tmp_path: Path
) -> None:
    commit = hub.add_repo("acme/tiny", FILES)
    apply_manifest(
        cluster,
        llmservice(
            "chat", namespace, model={"source": {"huggingFace": {"repo": "acme/tiny", "revision": commit}}, "cache": {"size": "1Gi"}}
        ),
    )

    waiting = _wait_status(
        cluster,
        operator,
        "chat",
        namespace,
        "the cache to be reported",
        lambda s: "cache" in s and condition(s and {"status": s}, "Ready").get("reason") == "CacheFetching",
    )
    assert waiting["cache"]["phase"] in ("Pending", "Fetching") and waiting["cache"]["revision"] == commit
    pvc = get_json(cluster, "pvc", "chat-model", "-n", namespace)
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert pvc["metadata"]["ownerReferences"][0]["name"] == "chat"
    job = get_json(cluster, "job", "chat-fetch", "-n", namespace)
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][:4] == ["--repo", "acme/tiny", "--revision", commit]
    assert get_json(cluster, "deployment", "chat", "-n", namespace)["spec"]["replicas"] == 0, "held until the cache is complete"

    result = fetch("acme/tiny", commit, tmp_path / "volume", endpoint=hub.url)  # what the Job's container runs
    assert result.ok
    _finish_like_the_kubelet(cluster, _fetch_pod(cluster, "chat", namespace), result)

    ready = _wait_status(
        cluster, operator, "chat", namespace, "the cache to be Ready", lambda s: (s.get("cache") or {}).get("phase") == "Ready"
    )
    assert ready["cache"] | {"message": ""} == {
        "phase": "Ready",
        "revision": commit,
        "commit": commit,
        "bytes": sum(len(v) for v in FILES.values()),
        "files": 3,
        "message": "",
    }
    deployment = get_json(cluster, "deployment", "chat", "-n", namespace)
    assert deployment["spec"]["replicas"] == 1
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LLMSERVICE_MODEL"] == f"/models/acme--tiny/{commit}" and env["HF_HUB_OFFLINE"] == "1"

    volume = _bind_volume(cluster, namespace, "chat-model", tmp_path / "volume")
    try:
        obj = wait_ready(cluster, operator, "chat", namespace)
        startup = obj["status"]["startup"]
        assert startup["pod"].startswith("chat-")
        assert abs(sum(v for k, v in startup.items() if k not in ("pod", "readyAt", "total")) - startup["total"]) <= 1.0
    finally:
        cluster.kubectl("delete", "pv", volume, "--wait=false", check=False)


def test_a_missing_repo_fails_the_cache_in_words(
    cluster: ControlPlane, operator: OperatorProcess, namespace: str, hub: FakeHub, tmp_path: Path
) -> None:
    apply_manifest(
        cluster, llmservice("gone", namespace, model={"source": {"huggingFace": {"repo": "acme/missing"}}, "cache": {"size": "1Gi"}})
    )
    result = fetch("acme/missing", None, tmp_path, endpoint=hub.url)
    assert (result.reason, result.exit_code) == ("RepoNotFound", 2)
    _finish_like_the_kubelet(cluster, _fetch_pod(cluster, "gone", namespace), result)

    failed = _wait_status(
        cluster, operator, "gone", namespace, "the cache to fail", lambda s: (s.get("cache") or {}).get("phase") == "Failed"
    )
    ready = condition({"status": failed}, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "CacheFailed"
    assert "acme/missing" in ready["message"] and "spec.model.source.huggingFace.repo" in ready["message"]
    assert condition({"status": failed}, "Degraded")["reason"] == "CacheFailed"
    assert get_json(cluster, "deployment", "gone", "-n", namespace)["spec"]["replicas"] == 0


def test_startup_phases_add_up_for_a_ready_service(cluster: ControlPlane, operator: OperatorProcess, namespace: str) -> None:
    apply_manifest(cluster, llmservice("quick", namespace))
    obj = wait_ready(cluster, operator, "quick", namespace)
    if "startup" not in obj["status"]:
        obj = {"status": _wait_status(cluster, operator, "quick", namespace, "status.startup", lambda s: "startup" in s)}
    startup = obj["status"]["startup"]
    parts = {k: v for k, v in startup.items() if k not in ("pod", "readyAt", "total")}
    assert {"scheduling", "image", "other"} <= parts.keys()
    assert abs(sum(parts.values()) - startup["total"]) <= 1.0
    pod = get_json(cluster, "pod", startup["pod"], "-n", namespace)
    assert pod["metadata"]["labels"]["llmservice.io/name"] == "quick"
    wait_for(
        lambda: operator.metric("llmservice_operator_cold_start_seconds_count", phase="total") >= 1,
        TIMEOUT,
        "the cold start in the operator's histogram",
    )
