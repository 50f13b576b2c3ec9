"""The operator on a real API server as a new user meets it: names it does not own, and every failure in status.

Where a kubelet would report a failure (a model that fails to load, a crash loop, an OOM kill), the
test plays the kubelet: it annotates the kwok pod so kwok leaves its status alone, then writes the
container statuses a kubelet would write through the pods/status subresource.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from devtools.controlplane import KWOK_STATUS_ANNOTATION, ControlPlane
from devtools.operator_harness import OperatorProcess, apply_manifest, condition, get_json, service_account_kubeconfig
from devtools.waiting import wait_for
from tests.e2e.test_operator import llmservice, wait_ready

STATUS_TIMEOUT = 90
SERVER_LABELS = "app.kubernetes.io/name=llmservice-server"


@pytest.fixture(scope="module")
def operator(cluster: ControlPlane, chart: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    workdir = tmp_path_factory.mktemp("operator-real")
    process = OperatorProcess(service_account_kubeconfig(cluster, workdir / "kubeconfig"), workdir / "operator.log", resync_seconds=30)
    process.start()
    yield process
    process.stop()


def llmsvc(cluster: ControlPlane, name: str, namespace: str) -> dict[str, Any]:
    return get_json(cluster, "llmsvc", name, "-n", namespace)


def wait_reason(
    cluster: ControlPlane, operator: OperatorProcess, name: str, namespace: str, kind: str, reason: str, timeout: float = STATUS_TIMEOUT
) -> dict[str, Any]:
    """Wait for condition `kind` of the LLMService to carry `reason`; the object then."""
    try:
        wait_for(
            lambda: condition(llmsvc(cluster, name, namespace), kind).get("reason") == reason,
            timeout,
            f"LLMService {namespace}/{name}: {kind} reason {reason}",
        )
    except Exception as error:
        raise AssertionError(
            f"{error}\nstatus: {llmsvc(cluster, name, namespace).get('status')}\noperator log:\n{operator.log_tail()}"
        ) from error
    return llmsvc(cluster, name, namespace)


def warning_events(cluster: ControlPlane, namespace: str, name: str, reason: str) -> list[dict[str, Any]]:
    events = get_json(cluster, "events.events.k8s.io", "-n", namespace)["items"]
    return [
        e
        for e in events
        if e["regarding"]["kind"] == "LLMService" and e["regarding"]["name"] == name and e["reason"] == reason and e["type"] == "Warning"
    ]


def server_pod(cluster: ControlPlane, namespace: str, name: str) -> str:
    def one() -> bool:
        return len(get_json(cluster, "pods", "-n", namespace, "-l", f"llmservice.io/name={name}")["items"]) == 1

    wait_for(one, 60, f"one server pod of {namespace}/{name}")
    pod: str = get_json(cluster, "pods", "-n", namespace, "-l", f"llmservice.io/name={name}")["items"][0]["metadata"]["name"]
    return pod


def play_kubelet(cluster: ControlPlane, namespace: str, pod: str, container_status: dict[str, Any]) -> None:
    """Write what a kubelet writes for a container that is not ready, after telling kwok to keep out."""
    cluster.kubectl("annotate", "pod", pod, "-n", namespace, f"{KWOK_STATUS_ANNOTATION}=custom", "--overwrite")
    current = get_json(cluster, "pod", pod, "-n", namespace)
    status = {
        "phase": "Running",
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady"},
            {"type": "Ready", "status": "False", "reason": "ContainersNotReady"},
        ],
        "containerStatuses": [
            {
                "name": "server",
                "image": current["spec"]["containers"][0]["image"],
                "imageID": "",
                "ready": False,
                "started": False,
                **container_status,
            }
        ],
    }
    cluster.kubectl("patch", "pod", pod, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps({"status": status}))


# --- 1. ownership -------------------------------------------------------------------------------


def test_a_users_service_of_the_same_name_is_never_taken(cluster: ControlPlane, operator: OperatorProcess, namespace: str) -> None:
    cluster.kubectl("create", "service", "clusterip", "b6", "--tcp=5432:5432", "-n", namespace)
    before = get_json(cluster, "service", "b6", "-n", namespace)
    apply_manifest(cluster, llmservice("b6", namespace, resources={"gpu": {"count": 0}, "memory": {"limit": "2Gi"}}))

    obj = wait_reason(cluster, operator, "b6", namespace, "Ready", "NameConflict")
    message = condition(obj, "Ready")["message"]
    assert f"Service {namespace}/b6 already exists" in message and "will not change or delete it" in message
    assert (condition(obj, "Stalled")["status"], condition(obj, "Degraded")["status"]) == ("True", "True")
    wait_for(lambda: bool(warning_events(cluster, namespace, "b6", "NameConflict")), 30, "a Warning Event NameConflict")
    after = get_json(cluster, "service", "b6", "-n", namespace)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"], "the user's Service was written"
    assert [p["port"] for p in after["spec"]["ports"]] == [5432]
    assert "ownerReferences" not in after["metadata"]
    assert cluster.kubectl("get", "deployment", "b6", "-n", namespace, check=False).returncode != 0

    # Deleting the LLMService leaves the user's Service: it was never made a child.
    cluster.kubectl("delete", "llmsvc", "b6", "-n", namespace, "--wait=true", "--timeout=60s")
    assert get_json(cluster, "service", "b6", "-n", namespace)["metadata"]["uid"] == before["metadata"]["uid"]


def test_reconcile_goes_on_once_the_name_is_free(cluster: ControlPlane, operator: OperatorProcess, namespace: str) -> None:
    cluster.kubectl("create", "service", "clusterip", "taken", "--tcp=5432:5432", "-n", namespace)
    apply_manifest(cluster, llmservice("taken", namespace, resources={"gpu": {"count": 0}, "memory": {"limit": "2Gi"}}))
    wait_reason(cluster, operator, "taken", namespace, "Ready", "NameConflict")

    cluster.kubectl("delete", "service", "taken", "-n", namespace)

    # Nothing the operator watches changed (the Service had none of its labels): it looks again by itself.
    obj = wait_ready(cluster, operator, "taken", namespace, timeout=60)
    assert (condition(obj, "Stalled")["status"], condition(obj, "Reconciling")["status"]) == ("False", "False")
    service = get_json(cluster, "service", "taken", "-n", namespace)
    assert service["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]


def test_deleted_and_recreated_at_once_waits_for_the_old_children(cluster: ControlPlane, operator: OperatorProcess, namespace: str) -> None:
    """A GitOps replace: the new LLMService must not adopt, nor stall on, the old one's children."""
    manifest = llmservice("again", namespace, resources={"gpu": {"count": 0}, "memory": {"limit": "2Gi"}})
    apply_manifest(cluster, manifest)
    first = wait_ready(cluster, operator, "again", namespace)
    cluster.kubectl("delete", "llmsvc", "again", "-n", namespace, "--wait=false")
    apply_manifest(cluster, manifest)

    obj = wait_ready(cluster, operator, "again", namespace, timeout=60)
    assert obj["metadata"]["uid"] != first["metadata"]["uid"]
    for kind in ("deployment", "service"):
        owner = get_json(cluster, kind, "again", "-n", namespace)["metadata"]["ownerReferences"]
        assert [ref["uid"] for ref in owner] == [obj["metadata"]["uid"]]
    assert not warning_events(cluster, namespace, "again", "NameConflict")


# --- 2. every failure in status -----------------------------------------------------------------


def test_a_model_that_fails_to_load_says_why_and_stalls_after_three_restarts(
    cluster: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    apply_manifest(cluster, llmservice("load", namespace, resources={"gpu": {"count": 0}, "memory": {"limit": "2Gi"}}))
    pod = server_pod(cluster, namespace, "load")
    reason = "OSError: /models/llama-3 is not a model directory (no config.json)"

    def failed(restarts: int) -> dict[str, Any]:
        return {
            "restartCount": restarts,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
            "lastState": {
                "terminated": {
                    "exitCode": 1,
                    "reason": "Error",
                    "message": reason,
                    "startedAt": "2026-11-29T10:00:00Z",
                    "finishedAt": "2026-11-29T10:00:04Z",
                }
            },
        }

    play_kubelet(cluster, namespace, pod, failed(1))
    obj = wait_reason(cluster, operator, "load", namespace, "Ready", "ModelLoadFailed")
    assert reason in condition(obj, "Ready")["message"] and "1 restarts" in condition(obj, "Ready")["message"]
    assert (condition(obj, "Degraded")["status"], condition(obj, "Stalled")["status"]) == ("True", "False")

    play_kubelet(cluster, namespace, pod, failed(3))
    obj = wait_reason(cluster, operator, "load", namespace, "Stalled", "ModelLoadFailed")
    assert condition(obj, "Stalled")["status"] == "True" and condition(obj, "Reconciling")["status"] == "False"
    assert warning_events(cluster, namespace, "load", "ModelLoadFailed")


@pytest.mark.parametrize(
    ("container_status", "reason", "says"),
    [
        (
            {
                "restartCount": 5,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 139, "reason": "Error"}},
            },
            "CrashLoop",
            "5 restarts",
        ),
        (
            {
                "restartCount": 2,
                "state": {"running": {"startedAt": "2026-11-29T10:00:00Z"}},
                "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
            },
            "OOMKilled",
            "memory limit of 2Gi",
        ),
    ],
    ids=["crash-loop", "oom-killed"],
)
def test_a_container_that_keeps_failing_says_how(
    cluster: ControlPlane, operator: OperatorProcess, namespace: str, container_status: dict[str, Any], reason: str, says: str
) -> None:
    apply_manifest(cluster, llmservice("fail", namespace, resources={"gpu": {"count": 0}, "memory": {"limit": "2Gi"}}))
    play_kubelet(cluster, namespace, server_pod(cluster, namespace, "fail"), container_status)

    obj = wait_reason(cluster, operator, "fail", namespace, "Ready", reason)
    assert says in condition(obj, "Ready")["message"]
    assert condition(obj, "Degraded")["reason"] == reason


def test_a_recovered_containers_old_oom_kill_is_not_reported(cluster: ControlPlane, operator: OperatorProcess, namespace: str) -> None:
    apply_manifest(cluster, llmservice("healed", namespace, resources={"gpu": {"count": 0}, "memory": {"limit": "2Gi"}}))
    wait_ready(cluster, operator, "healed", namespace)
    pod = server_pod(cluster, namespace, "healed")
    play_kubelet(
        cluster,
        namespace,
        pod,
        {
            "restartCount": 1,
            "state": {"running": {"startedAt": "2026-11-29T10:00:00Z"}},
            "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
        },
    )
    wait_reason(cluster, operator, "healed", namespace, "Ready", "OOMKilled")

    # The kubelet's view once the restarted container is ready again: the OOM kill is history.
    status = get_json(cluster, "pod", pod, "-n", namespace)["status"]
    status["containerStatuses"][0].update(ready=True, started=True)
    status["conditions"] = [
        {**c, "status": "True", "reason": None} if c["type"] in ("Ready", "ContainersReady") else c for c in status["conditions"]
    ]
    cluster.kubectl("patch", "pod", pod, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps({"status": status}))
    obj = wait_ready(cluster, operator, "healed", namespace)
    assert condition(obj, "Degraded")["status"] == "False"


def test_pods_the_api_server_refuses_to_create_are_pod_creation_failed(
    cluster: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-gpus", "namespace": namespace},
        "spec": {"hard": {"requests.nvidia.com/gpu": "0"}},
    }
    apply_manifest(cluster, quota)
    wait_for(
        lambda: "hard" in (get_json(cluster, "resourcequota", "no-gpus", "-n", namespace).get("status") or {}),
        30,
        "the quota controller to publish the quota",
    )
    apply_manifest(cluster, llmservice("quota", namespace))

    obj = wait_reason(cluster, operator, "quota", namespace, "Ready", "PodCreationFailed")
    message = condition(obj, "Ready")["message"]
    assert "exceeded quota: no-gpus" in message and "ResourceQuota" in message
    assert condition(obj, "Degraded")["reason"] == "PodCreationFailed"


def test_an_apply_the_api_server_refuses_is_apply_failed(cluster: ControlPlane, operator: OperatorProcess, namespace: str) -> None:
    # No prometheus-operator CRDs in this cluster: the ServiceMonitor's apply answers 404.
    apply_manifest(
        cluster,
        llmservice(
            "monitor", namespace, monitoring={"mode": "serviceMonitor"}, resources={"gpu": {"count": 0}, "memory": {"limit": "2Gi"}}
        ),
    )

    obj = wait_reason(cluster, operator, "monitor", namespace, "Ready", "ApplyFailed")
    message = condition(obj, "Ready")["message"]
    assert f"Applying ServiceMonitor {namespace}/monitor failed (HTTP 404)" in message and "install its CRD" in message
    assert (condition(obj, "Reconciling")["status"], condition(obj, "Stalled")["status"]) == ("True", "False")
    assert warning_events(cluster, namespace, "monitor", "ApplyFailed")

    # Fixing the spec is picked up (the backoff does not hold a new generation back).
    apply_manifest(
        cluster,
        llmservice("monitor", namespace, monitoring={"mode": "annotations"}, resources={"gpu": {"count": 0}, "memory": {"limit": "2Gi"}}),
    )
    wait_ready(cluster, operator, "monitor", namespace)


def test_an_hpa_that_cannot_read_its_metric_is_autoscaling_not_active(
    cluster: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    # No metrics-server here: the HPA controller sets ScalingActive=False, FailedGetResourceMetric.
    apply_manifest(
        cluster,
        llmservice(
            "blind",
            namespace,
            autoscaling={"minReplicas": 1, "maxReplicas": 2, "metric": "cpu"},
            resources={"gpu": {"count": 0}, "memory": {"limit": "2Gi"}},
        ),
    )

    obj = wait_reason(cluster, operator, "blind", namespace, "Degraded", "AutoscalingNotActive", timeout=120)
    assert "ScalingActive=False" in condition(obj, "Degraded")["message"]
    assert condition(obj, "Ready")["status"] == "True", "it still serves"
