"""spec.model.cache: the volume and Job rendered, replicas held until the cache is complete, and its status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from llmservice_operator import cache, startup
from llmservice_operator.render import RenderContext, render
from llmservice_operator.spec import SpecError
from llmservice_server.model_cache import Layout
from tests.operator.specs import UID, service

IMAGE = "registry.local/llmservice-server:test"
CACHED: dict[str, Any] = {
    "model": {
        "source": {"huggingFace": {"repo": "acme/tiny", "revision": "abc123"}},
        "tokenSecretRef": {"name": "hf", "key": "token"},
        "cache": {"size": "20Gi", "storageClassName": "fast"},
    },
    "resources": {"gpu": {"count": 1}},
    "replicas": 2,
}


def by_kind(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {child["kind"]: child for child in children}


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_the_volume_and_the_fetch_job_are_rendered_valid_and_owned() -> None:
    kinds = by_kind(render(service(CACHED), RenderContext(IMAGE)))
    pvc, job = kinds["PersistentVolumeClaim"], kinds["Job"]
    assert pvc["metadata"]["name"] == "chat-model" and job["metadata"]["name"] == "chat-fetch"
    assert pvc["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}}, "storageClassName": "fast"}
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["llmservice-fetch"]
    assert container["args"] == ["--repo", "acme/tiny", "--revision", "abc123", "--cache-dir", "/cache"]
    assert container["image"] == IMAGE
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in container["env"]
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "chat-model"}} in pod["volumes"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [cache.PERMANENT_EXIT]
    server_labels = by_kind(render(service(CACHED), RenderContext(IMAGE)))["Deployment"]["spec"]["selector"]["matchLabels"]
    assert not server_labels.items() <= job["spec"]["template"]["metadata"]["labels"].items(), "the Service must not pick the fetch pod"
    for child in (pvc, job):
        assert child["metadata"]["ownerReferences"][0]["uid"] == UID
        kubernetes_validate.validate(child, "1.35", strict=True)


def test_replicas_are_held_at_zero_until_a_revision_is_complete() -> None:
    svc = service(CACHED)
    held = by_kind(render(svc, RenderContext(IMAGE)))["Deployment"]
    assert held["spec"]["replicas"] == 0
    serving = by_kind(render(svc, RenderContext(IMAGE, model_revision="abc123")))["Deployment"]
    assert serving["spec"]["replicas"] == 2
    env = env_of(serving)
    assert env["LLMSERVICE_MODEL"] == "/models/acme--tiny/abc123" and env["HF_HUB_OFFLINE"] == "1"
    assert "LLMSERVICE_REVISION" not in env
    pod = serving["spec"]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "chat-model", "readOnly": True}} in pod["volumes"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert serving["spec"]["template"]["metadata"]["annotations"][cache.REVISION_ANNOTATION] == "abc123"


def test_an_autoscaled_service_gets_no_hpa_while_held() -> None:
    spec = {**{k: v for k, v in CACHED.items() if k != "replicas"}, "autoscaling": {"minReplicas": 1, "maxReplicas": 3}}
    svc = service(spec)
    held = by_kind(render(svc, RenderContext(IMAGE)))
    assert held["Deployment"]["spec"]["replicas"] == 0 and "HorizontalPodAutoscaler" not in held
    serving = by_kind(render(svc, RenderContext(IMAGE, model_revision="abc123")))
    assert "replicas" not in serving["Deployment"]["spec"] and "HorizontalPodAutoscaler" in serving


def test_a_cache_needs_a_hugging_face_source() -> None:
    with pytest.raises(SpecError, match=r"spec\.model\.source\.huggingFace"):
        service({"model": {"source": {"bundled": {}}, "cache": {"size": "1Gi"}}})


def test_the_operator_and_the_fetch_agree_on_where_a_revision_lives() -> None:
    for repo, rev in (("acme/tiny", "abc123"), ("org/m", "feature/x"), ("org/m", "main")):
        assert cache.model_dir("/models", repo, rev) == str(Layout(Path("/models"), repo, rev).final)


def _job(rev: str, *conditions: str, uid: str = "job-1") -> dict[str, Any]:
    return {
        "metadata": {"name": "chat-fetch", "uid": uid, "annotations": {cache.REVISION_ANNOTATION: rev}},
        "status": {"conditions": [{"type": c, "status": "True", "message": f"{c} happened"} for c in conditions]},
    }


def _pod(phase: str, result: dict[str, Any] | None = None, uid: str = "job-1") -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if result is not None:
        status["containerStatuses"] = [
            {
                "name": "fetch",
                "state": {
                    "terminated": {
                        "exitCode": 0 if result["ok"] else 2,
                        "finishedAt": "2026-12-07T10:00:00Z",
                        "message": json.dumps(result),
                    }
                },
            }
        ]
    return {"metadata": {"name": "chat-fetch-x", "ownerReferences": [{"kind": "Job", "uid": uid}]}, "status": status}


def test_the_cache_phase_follows_the_job_and_its_result() -> None:
    svc = service(CACHED)
    assert cache.observe(svc, None, []).phase == "Pending"
    assert cache.observe(svc, _job("older"), []).phase == "Pending", "a Job of another revision says nothing of this one"
    assert cache.observe(svc, _job("abc123"), [_pod("Running")]).phase == "Fetching"

    fetched = {
        "ok": True,
        "reason": "Fetched",
        "message": "Fetched 3 files (99 bytes) of acme/tiny@abc123.",
        "commit": "f" * 40,
        "files": 3,
        "bytes": 99,
    }
    ready = cache.observe(svc, _job("abc123", "Complete"), [_pod("Succeeded", fetched)])
    assert (ready.phase, ready.files, ready.bytes, ready.commit) == ("Ready", 3, 99, "f" * 40)
    assert ready.to_status() == {
        "phase": "Ready",
        "revision": "abc123",
        "message": fetched["message"],
        "commit": "f" * 40,
        "bytes": 99,
        "files": 3,
    }

    missing = {"ok": False, "reason": "RepoNotFound", "message": "Repository acme/tiny was not found on the Hub (HTTP 404)."}
    failed = cache.observe(svc, _job("abc123", "Failed"), [_pod("Failed", missing)])
    assert failed.phase == "Failed" and failed.message.startswith("RepoNotFound: Repository acme/tiny was not found")
    assert cache.readiness(failed, None) == ("CacheFailed", f"The model cache could not be filled: {failed.message}", True)


def test_an_older_revision_keeps_serving_while_the_new_one_is_fetched() -> None:
    svc = service(CACHED)
    fetching = cache.observe(svc, _job("abc123"), [_pod("Running")])
    serving_old = {"spec": {"template": {"metadata": {"annotations": {cache.REVISION_ANNOTATION: "old999"}}}}}
    assert cache.serving_revision(svc, fetching, serving_old) == "old999"
    assert cache.readiness(fetching, "old999") is None, "still Ready: the old copy answers"
    assert cache.serving_revision(svc, fetching, None) is None
    assert cache.readiness(fetching, None)[0] == "CacheFetching"  # type: ignore[index]


def _ready_pod(created: str, scheduled: str, started: str, ready: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "chat-1", "creationTimestamp": created},
        "status": {
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": scheduled},
                {"type": "Ready", "status": "True", "lastTransitionTime": ready},
            ],
            "containerStatuses": [{"name": "server", "state": {"running": {"startedAt": started}}}],
        },
    }


def test_the_startup_phases_add_up_to_the_total() -> None:
    pod = _ready_pod("2026-12-07T10:00:00Z", "2026-12-07T10:00:02Z", "2026-12-07T10:00:32Z", "2026-12-07T10:01:40Z")
    seen = startup.breakdown(pod, {"fetch": 0.0, "load": 55.5, "warmup": 3.25})
    assert seen == {
        "pod": "chat-1",
        "readyAt": "2026-12-07T10:01:40Z",
        "scheduling": 2.0,
        "image": 30.0,
        "fetch": 0.0,
        "load": 55.5,
        "warmup": 3.25,
        "other": 9.25,
        "total": 100.0,
    }
    unasked = startup.breakdown(pod, None)
    assert unasked is not None and "load" not in unasked and unasked["other"] == 68.0
    for result in (seen, unasked):
        assert sum(v for k, v in result.items() if k in startup.PHASES and k != "total") == pytest.approx(result["total"])
    assert startup.breakdown({**pod, "status": {"phase": "Pending"}}, None) is None
