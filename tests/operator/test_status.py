"""The pure status: conditions say what is true, in words a user can act on."""

from __future__ import annotations

from typing import Any

from llmservice_operator.render import Capabilities
from llmservice_operator.spec import LLMService
from llmservice_operator.status import Observed, Policy, apply_failed, compute, invalid, name_conflict, recheck_after
from tests.operator.specs import MINIMAL, service

NOW, LATER = "2026-11-29T10:00:00Z", "2026-11-29T10:05:00Z"


def deployment(
    replicas: int = 1,
    ready: int = 1,
    updated: int | None = None,
    generation: int = 2,
    observed_generation: int = 2,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"name": "chat", "generation": generation},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": observed_generation,
            "replicas": replicas,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "updatedReplicas": replicas if updated is None else updated,
            "conditions": conditions or [],
        },
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
    svc = service(
        {**MINIMAL, "resources": {"gpu": {"count": 0}, "memory": {"limit": "512Mi"}, "shmSize": "64Mi"}, "server": {"prefixCacheSize": 0}}
    )
    oom = pod({"state": {"waiting": {"reason": "CrashLoopBackOff"}}, "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}})
    status = compute(svc, Observed(deployment=deployment(1, 0), pods=(oom,)), None, NOW)
    ready, degraded = conditions(status)["Ready"], conditions(status)["Degraded"]
    assert (ready["reason"], degraded["reason"], degraded["status"]) == ("OOMKilled", "OOMKilled", "True")
    assert "512Mi" in ready["message"] and "spec.resources.memory.limit" in ready["message"]


def test_unschedulable_for_lack_of_gpus_is_called_out() -> None:
    svc = service({"model": {"source": {"bundled": {}}}, "resources": {"gpu": {"count": 8}}})
    pending = pod(
        scheduled={
            "status": "False",
            "reason": "Unschedulable",
            "lastTransitionTime": "2026-11-29T09:00:00Z",
            "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
        }
    )
    status = compute(svc, Observed(deployment=deployment(1, 0), pods=(pending,)), None, NOW)
    ready = conditions(status)["Ready"]
    assert ready["reason"] == "InsufficientGPU"
    assert "8 free nvidia.com/gpu" in ready["message"]


def _waiting_for_gpus() -> tuple[LLMService, Observed]:
    """A service asking 8 GPUs per replica whose one pod the scheduler refused at NOW for lack of them."""
    svc = service({"model": {"source": {"bundled": {}}}, "resources": {"gpu": {"count": 8}}})
    pending = pod(
        scheduled={
            "status": "False",
            "reason": "Unschedulable",
            "lastTransitionTime": NOW,
            "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
        }
    )
    return svc, Observed(deployment=deployment(1, 0), pods=(pending,))


def test_waiting_for_a_gpu_node_is_progress_for_the_grace_period_then_stalled() -> None:
    svc, observed = _waiting_for_gpus()
    policy = Policy(capacity_grace_seconds=600)

    waiting = conditions(compute(svc, observed, None, LATER, policy))  # 5 of 10 minutes
    assert (waiting["Ready"]["reason"], waiting["Progressing"]["status"], waiting["Progressing"]["reason"]) == (
        "WaitingForCapacity",
        "True",
        "WaitingForCapacity",
    )
    assert "8 free nvidia.com/gpu" in waiting["Ready"]["message"]
    assert waiting["Degraded"]["status"] == "False", "a scale-up in progress must not turn Argo CD red"
    assert (waiting["Reconciling"]["status"], waiting["Stalled"]["status"]) == ("True", "False")
    assert recheck_after(svc, observed, LATER, policy) == 300

    expired = conditions(compute(svc, observed, None, "2026-11-29T10:10:01Z", policy))
    assert expired["Ready"]["reason"] == "InsufficientGPU"
    assert (expired["Degraded"]["status"], expired["Stalled"]["status"], expired["Reconciling"]["status"]) == ("True", "True", "False")
    assert recheck_after(svc, observed, "2026-11-29T10:10:01Z", policy) is None


def test_the_waiting_message_does_not_change_while_waiting() -> None:
    svc, observed = _waiting_for_gpus()
    first = compute(svc, observed, None, NOW)
    assert compute(svc, observed, first, LATER) == first, "a resync while waiting must write nothing"


def test_a_past_oom_kill_counts_only_while_the_container_is_not_ready() -> None:
    recovered = pod({"ready": True, "state": {"running": {}}, "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}})
    rolling = compute(service(MINIMAL), Observed(deployment=deployment(2, 1), pods=(recovered,)), None, NOW)
    assert conditions(rolling)["Ready"]["reason"] == "RollingOut"
    assert conditions(rolling)["Degraded"]["status"] == "False"
    restarting = pod({"ready": False, "state": {"running": {}}, "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}})
    oom = compute(service(MINIMAL), Observed(deployment=deployment(1, 0), pods=(restarting,)), None, NOW)
    assert conditions(oom)["Ready"]["reason"] == "OOMKilled"


def test_a_model_that_fails_to_load_says_why_and_stalls_after_three_restarts() -> None:
    def failing(restarts: int) -> dict[str, Any]:
        return pod(
            {
                "ready": False,
                "restartCount": restarts,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {
                    "terminated": {"exitCode": 1, "reason": "Error", "message": "OSError: /models/llama is not a model directory\n"}
                },
            }
        )

    early = conditions(compute(service(MINIMAL), Observed(deployment=deployment(1, 0), pods=(failing(2),)), None, NOW))
    assert early["Ready"]["reason"] == "ModelLoadFailed"
    assert "OSError: /models/llama is not a model directory" in early["Ready"]["message"]
    assert "2 restarts" in early["Ready"]["message"] and "spec.model" in early["Ready"]["message"]
    assert (early["Degraded"]["status"], early["Stalled"]["status"], early["Reconciling"]["status"]) == ("True", "False", "True")
    late = conditions(compute(service(MINIMAL), Observed(deployment=deployment(1, 0), pods=(failing(3),)), None, NOW))
    assert (late["Ready"]["reason"], late["Stalled"]["status"], late["Stalled"]["reason"]) == ("ModelLoadFailed", "True", "ModelLoadFailed")
    assert late["Progressing"]["status"] == "False"


def test_pods_that_cannot_be_created_are_pod_creation_failed() -> None:
    quota = (
        'pods "chat-5d8f-x" is forbidden: exceeded quota: gpus, requested: requests.nvidia.com/gpu=1, '
        "used: requests.nvidia.com/gpu=4, limited: requests.nvidia.com/gpu=4"
    )
    failing = deployment(
        1,
        0,
        conditions=[
            {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"},
            {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": quota},
        ],
    )
    found = conditions(compute(service(MINIMAL), Observed(deployment=failing), None, NOW))
    assert (found["Ready"]["reason"], found["Degraded"]["reason"]) == ("PodCreationFailed", "PodCreationFailed")
    assert quota in found["Ready"]["message"] and "ResourceQuota" in found["Ready"]["message"]


def test_an_hpa_that_cannot_act_is_autoscaling_not_active() -> None:
    svc = service({**MINIMAL, "autoscaling": {"maxReplicas": 3, "metric": "cpu"}})
    hpa = {
        "metadata": {"name": "chat"},
        "status": {
            "conditions": [
                {"type": "AbleToScale", "status": "True", "reason": "SucceededGetScale"},
                {
                    "type": "ScalingActive",
                    "status": "False",
                    "reason": "FailedGetResourceMetric",
                    "message": "the HPA was unable to compute the replica count: failed to get cpu utilization",
                },
            ]
        },
    }
    found = conditions(compute(svc, Observed(deployment=deployment(1, 1), autoscaler=hpa), None, NOW))
    assert found["Ready"]["status"] == "True", "it still serves"
    assert (found["Degraded"]["status"], found["Degraded"]["reason"]) == ("True", "AutoscalingNotActive")
    assert "ScalingActive=False (FailedGetResourceMetric)" in found["Degraded"]["message"]
    assert "unable to compute the replica count" in found["Degraded"]["message"]
    disabled = {
        "metadata": {"name": "chat"},
        "status": {
            "conditions": [{"type": "ScalingActive", "status": "False", "reason": "ScalingDisabled", "message": "scaling is disabled"}]
        },
    }
    fine = conditions(compute(svc, Observed(deployment=deployment(1, 1), autoscaler=disabled), None, NOW))
    assert fine["Degraded"]["status"] == "False"


def test_kstatus_reconciling_while_a_rollout_is_under_way_and_not_once_done() -> None:
    rolling = conditions(compute(service(MINIMAL), Observed(deployment=deployment(2, 1)), None, NOW))
    assert (rolling["Reconciling"]["status"], rolling["Reconciling"]["reason"]) == ("True", "RollingOut")
    assert rolling["Stalled"]["status"] == "False"
    lagging = conditions(compute(service(MINIMAL), Observed(deployment=deployment(generation=3, observed_generation=2)), None, NOW))
    assert lagging["Reconciling"]["status"] == "True"
    done = conditions(compute(service(MINIMAL), Observed(deployment=deployment(1, 1)), None, NOW))
    assert (done["Reconciling"]["status"], done["Stalled"]["status"]) == ("False", "False")
    deadline = conditions(
        compute(
            service(MINIMAL),
            Observed(
                deployment=deployment(
                    1,
                    0,
                    conditions=[
                        {
                            "type": "Progressing",
                            "status": "False",
                            "reason": "ProgressDeadlineExceeded",
                            "message": 'ReplicaSet "chat-5d8f" has timed out progressing.',
                        }
                    ],
                )
            ),
            None,
            NOW,
        )
    )
    assert (deadline["Stalled"]["status"], deadline["Stalled"]["reason"]) == ("True", "ProgressDeadlineExceeded")
    assert deadline["Reconciling"]["status"] == "False"


def test_name_conflict_and_apply_failed_statuses() -> None:
    conflict = conditions(name_conflict(2, "Service team-a/chat already exists", None, NOW))
    assert {kind: (c["status"], c["reason"]) for kind, c in conflict.items()} == {
        "Ready": ("False", "NameConflict"),
        "Progressing": ("False", "NameConflict"),
        "Degraded": ("True", "NameConflict"),
        "Reconciling": ("False", "AsExpected"),
        "Stalled": ("True", "NameConflict"),
    }
    failed = conditions(apply_failed(2, "Applying Deployment team-a/chat failed (HTTP 403): forbidden", None, NOW))
    assert {kind: (c["status"], c["reason"]) for kind, c in failed.items()} == {
        "Ready": ("False", "ApplyFailed"),
        "Progressing": ("True", "ApplyFailed"),
        "Degraded": ("True", "ApplyFailed"),
        "Reconciling": ("True", "ApplyFailed"),
        "Stalled": ("False", "AsExpected"),
    }
    assert "HTTP 403" in failed["Ready"]["message"]


def test_image_pull_and_crash_loop_messages() -> None:
    pull = pod({"state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}})
    crash = pod({"state": {"waiting": {"reason": "CrashLoopBackOff"}}, "lastState": {"terminated": {"exitCode": 139, "reason": "Error"}}})
    pulled = compute(service(MINIMAL), Observed(deployment=deployment(1, 0), pods=(pull,)), None, NOW)
    assert conditions(pulled)["Ready"]["reason"] == "ImagePullFailed"
    assert "spec.server.image" in conditions(pulled)["Ready"]["message"]
    crashed = compute(service(MINIMAL), Observed(deployment=deployment(1, 0), pods=(crash,)), None, NOW)
    assert conditions(crashed)["Ready"]["reason"] == "CrashLoop"
    assert "4 restarts" in conditions(crashed)["Ready"]["message"]
    assert "exit code 139" in conditions(crashed)["Ready"]["message"]


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
    assert conditions(status)["Ready"] == {
        "type": "Ready",
        "status": "False",
        "reason": "InvalidSpec",
        "message": "spec.model.source must set exactly one",
        "observedGeneration": 4,
        "lastTransitionTime": NOW,
    }
