"""The pure status: conditions say what is true, in words a user can act on."""

from __future__ import annotations

from typing import Any

from llmservice_operator.render import Capabilities
from llmservice_operator.status import Observed, compute, invalid
from tests.operator.specs import MINIMAL, service

NOW, LATER = "2026-11-29T10:00:00Z", "2026-11-29T10:05:00Z"


def deployment(replicas: int = 1, ready: int = 1, updated: int | None = None, generation: int = 2,
               observed_generation: int = 2, conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "chat", "generation": generation},
        "spec": {"replicas": replicas},
        "status": {"observedGeneration": observed_generation, "replicas": replicas, "readyReplicas": ready,
                   "availableReplicas": ready, "updatedReplicas": replicas if updated is None else updated,
                   "conditions": conditions or []},
    }


def pod(container_status: dict[str, Any] | None = None, scheduled: dict[str, Any] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if container_status is not None:
        status["containerStatuses"] = [{"name": "server", "image": "img:1", "restartCount": 4, **container_status}]
    if scheduled is not None:
        status["conditions"] = [{"type": "PodScheduled", **scheduled}]
    return {"metadata": {"name": "chat-abc"}, "status": status}


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_ready_when_every_desired_replica_runs_the_current_spec() -> None:
    status = compute(service(MINIMAL, generation=3), Observed(deployment=deployment(2, 2)), None, NOW)
    ready = conditions(status)["Ready"]
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("True", "Available", 3)
    assert "http://chat.team-a.svc:8000" in ready["message"]
    assert status["url"] == "http://chat.team-a.svc:8000"
    assert status["selector"] == "app.kubernetes.io/name=llmservice-server,llmservice.io/name=chat"
    assert (status["replicas"], status["readyReplicas"], status["observedGeneration"]) == (2, 2, 3)
    assert conditions(status)["Progressing"]["status"] == "False"
    assert conditions(status)["Degraded"]["status"] == "False"


def test_not_ready_while_the_deployment_has_not_seen_its_new_generation() -> None:
    status = compute(service(MINIMAL), Observed(deployment=deployment(generation=3, observed_generation=2)), None, NOW)
    assert conditions(status)["Ready"]["status"] == "False"
    assert conditions(status)["Progressing"]["status"] == "True"


def test_oom_killed_names_the_limit_and_what_to_change() -> None:
    svc = service({**MINIMAL, "resources": {"gpu": {"count": 0}, "memory": {"limit": "512Mi"}}})
    oom = pod({"state": {"waiting": {"reason": "CrashLoopBackOff"}},
               "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}})
    status = compute(svc, Observed(deployment=deployment(1, 0), pods=(oom,)), None, NOW)
    ready, degraded = conditions(status)["Ready"], conditions(status)["Degraded"]
    assert (ready["reason"], degraded["reason"], degraded["status"]) == ("OOMKilled", "OOMKilled", "True")
    assert "512Mi" in ready["message"] and "spec.resources.memory.limit" in ready["message"]


def test_unschedulable_for_lack_of_gpus_is_called_out() -> None:
    svc = service({"model": {"source": {"bundled": {}}}, "resources": {"gpu": {"count": 8}}})
    pending = pod(scheduled={"status": "False", "reason": "Unschedulable",
                             "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."})
    status = compute(svc, Observed(deployment=deployment(1, 0), pods=(pending,)), None, NOW)
    ready = conditions(status)["Ready"]
    assert ready["reason"] == "InsufficientGPU"
    assert "8 free nvidia.com/gpu" in ready["message"]


def test_image_pull_and_crash_loop_messages() -> None:
    pull = pod({"state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}})
    crash = pod({"state": {"waiting": {"reason": "CrashLoopBackOff"}},
                 "lastState": {"terminated": {"exitCode": 1, "message": "ValueError: no such model"}}})
    pulled = compute(service(MINIMAL), Observed(deployment=deployment(1, 0), pods=(pull,)), None, NOW)
    assert conditions(pulled)["Ready"]["reason"] == "ImagePullFailed"
    assert "spec.server.image" in conditions(pulled)["Ready"]["message"]
    crashed = compute(service(MINIMAL), Observed(deployment=deployment(1, 0), pods=(crash,)), None, NOW)
    assert conditions(crashed)["Ready"]["reason"] == "CrashLoop"
    assert "ValueError: no such model" in conditions(crashed)["Ready"]["message"]


def test_last_transition_time_moves_only_when_the_status_does() -> None:
    svc = service(MINIMAL)
    first = compute(svc, Observed(deployment=deployment(1, 1)), None, NOW)
    same = compute(svc, Observed(deployment=deployment(1, 1)), first, LATER)
    assert same == first, "an unchanged world must produce an identical status (zero writes)"
    flipped = compute(svc, Observed(deployment=deployment(1, 0)), first, LATER)
    assert conditions(flipped)["Ready"]["lastTransitionTime"] == LATER
    assert conditions(flipped)["Degraded"]["lastTransitionTime"] == NOW


def test_missing_custom_metrics_api_is_reported() -> None:
    svc = service({**MINIMAL, "autoscaling": {"maxReplicas": 3}})
    status = compute(svc, Observed(deployment=deployment(1, 1)), None, NOW)
    assert conditions(status)["Degraded"]["reason"] == "MetricsAPIMissing"
    fine = compute(svc, Observed(deployment=deployment(1, 1), capabilities=Capabilities(custom_metrics=True)), None, NOW)
    assert conditions(fine)["Degraded"]["status"] == "False"


def test_scaled_to_zero_is_not_ready_and_says_how_to_scale_up() -> None:
    status = compute(service({**MINIMAL, "replicas": 0}), Observed(deployment=deployment(0, 0)), None, NOW)
    assert conditions(status)["Ready"]["reason"] == "ScaledToZero"
    assert "kubectl scale llmsvc chat" in conditions(status)["Ready"]["message"]


def test_invalid_spec_status() -> None:
    status = invalid(4, "spec.model.source must set exactly one", None, NOW)
    assert status["observedGeneration"] == 4
    assert conditions(status)["Ready"] == {"type": "Ready", "status": "False", "reason": "InvalidSpec",
                                           "message": "spec.model.source must set exactly one",
                                           "observedGeneration": 4, "lastTransitionTime": NOW}
