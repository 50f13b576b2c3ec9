"""The local control plane behaves like the Kubernetes the operator will meet.

Nodes with GPUs, scheduling on nvidia.com/gpu (and the lack of it), Deployments going Ready,
garbage collection, HPA objects, PodDisruptionBudget status, ServiceAccount tokens and RBAC for
an impersonated ServiceAccount.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from devtools.controlplane import DEFAULT_GPU_PRODUCT, GPU_RESOURCE, ControlPlane
from devtools.waiting import wait_for

IMAGE = "registry.invalid/llmservice/server:e2e"  # kwok never pulls it


def get(cluster: ControlPlane, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def apply(cluster: ControlPlane, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in obj.get("status", {}).get("conditions", []):
        if cond["type"] == kind:
            return dict(cond)
    return None


def is_running_and_ready(pod: dict[str, Any]) -> bool:
    ready = condition(pod, "Ready")
    return pod["status"].get("phase") == "Running" and ready is not None and ready["status"] == "True"


def pod_template(app: str, resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app": app}},
        "spec": {"containers": [{"name": "server", "image": IMAGE, "resources": resources}]},
    }


def deployment(namespace: str, name: str, replicas: int, resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": pod_template(name, resources),
        },
    }


def gpu_pod(namespace: str, name: str, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": pod_template(name, {"limits": {GPU_RESOURCE: str(gpus)}})["spec"],
    }


def test_nodes_are_ready_with_gpu_capacity(cluster: ControlPlane) -> None:
    assert cluster.gpu_node_names
    for name in cluster.gpu_node_names:
        node = get(cluster, "node", name)
        ready = condition(node, "Ready")
        assert ready is not None and ready["status"] == "True", node["status"]
        assert node["status"]["capacity"][GPU_RESOURCE] == "4"
        assert node["status"]["allocatable"][GPU_RESOURCE] == "4"
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == DEFAULT_GPU_PRODUCT
        assert not [t for t in node["spec"].get("taints", []) if t["effect"] == "NoSchedule"]


def test_gpu_deployment_gets_running_ready_pods(cluster: ControlPlane, namespace: str) -> None:
    apply(cluster, deployment(namespace, "gpu-app", 2, {"limits": {GPU_RESOURCE: "1"}}))

    def ready_replicas() -> bool:
        status = get(cluster, "deployment", "gpu-app", "-n", namespace).get("status", {})
        return bool(status.get("readyReplicas") == 2 and status.get("availableReplicas") == 2)

    wait_for(ready_replicas, 60, "Deployment gpu-app to have 2 ready replicas")
    pods = get(cluster, "pods", "-n", namespace, "-l", "app=gpu-app")["items"]
    assert len(pods) == 2
    for pod in pods:
        assert is_running_and_ready(pod), pod["status"]
        assert pod["spec"]["nodeName"] in cluster.gpu_node_names
        assert pod["status"].get("podIP")


def test_gpu_pod_too_big_stays_pending_until_a_bigger_node_joins(cluster: ControlPlane, namespace: str) -> None:
    apply(cluster, gpu_pod(namespace, "needs-8-gpus", 8))

    def unschedulable() -> dict[str, Any] | None:
        scheduled = condition(get(cluster, "pod", "needs-8-gpus", "-n", namespace), "PodScheduled")
        if scheduled and scheduled["status"] == "False" and scheduled.get("reason") == "Unschedulable":
            return scheduled
        return None

    scheduled = wait_for(unschedulable, 60, "pod needs-8-gpus to be marked Unschedulable")
    assert scheduled is not None and GPU_RESOURCE in scheduled["message"], scheduled

    def failed_scheduling_events() -> list[dict[str, Any]]:
        events = get(
            cluster,
            "events",
            "-n",
            namespace,
            "--field-selector",
            "involvedObject.name=needs-8-gpus,reason=FailedScheduling",
        )["items"]
        return [e for e in events if GPU_RESOURCE in e.get("message", "")]

    wait_for(failed_scheduling_events, 30, "a FailedScheduling event naming nvidia.com/gpu")
    assert get(cluster, "pod", "needs-8-gpus", "-n", namespace)["status"]["phase"] == "Pending"

    def running_pod() -> dict[str, Any] | None:
        pod: dict[str, Any] = get(cluster, "pod", "needs-8-gpus", "-n", namespace)
        return pod if is_running_and_ready(pod) else None

    big_node = f"gpu-node-big-{secrets.token_hex(3)}"
    cluster.add_gpu_node(big_node, 8)
    try:
        pod = wait_for(running_pod, 90, f"pod needs-8-gpus to run on the new node {big_node}")
        assert pod is not None and pod["spec"]["nodeName"] == big_node
    finally:
        cluster.kubectl("delete", "pod", "needs-8-gpus", "-n", namespace, "--wait=false")
        cluster.remove_node(big_node)


def test_garbage_collector_deletes_pods_of_a_deleted_replicaset(cluster: ControlPlane, namespace: str) -> None:
    replicaset = {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {"name": "owner", "namespace": namespace},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "owner"}},
            "template": pod_template("owner", {"requests": {"cpu": "100m"}}),
        },
    }
    apply(cluster, replicaset)
    uid = get(cluster, "replicaset", "owner", "-n", namespace)["metadata"]["uid"]

    def owned_pods() -> list[dict[str, Any]]:
        pods = get(cluster, "pods", "-n", namespace, "-l", "app=owner")["items"]
        return [p for p in pods if any(r["uid"] == uid for r in p["metadata"].get("ownerReferences", []))]

    wait_for(lambda: len(owned_pods()) == 2, 60, "ReplicaSet owner to create 2 pods")
    cluster.kubectl("delete", "replicaset", "owner", "-n", namespace, "--cascade=background")
    wait_for(
        lambda: not get(cluster, "pods", "-n", namespace, "-l", "app=owner")["items"],
        60,
        "the garbage collector to delete the pods of ReplicaSet owner",
    )


def test_horizontal_pod_autoscaler_is_accepted_and_reconciled(cluster: ControlPlane, namespace: str) -> None:
    apply(cluster, deployment(namespace, "scaled", 1, {"requests": {"cpu": "500m"}}))
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "scaled", "namespace": namespace},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "scaled"},
            "minReplicas": 1,
            "maxReplicas": 3,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 60},
                    },
                }
            ],
        },
    }
    apply(cluster, hpa)
    stored = get(cluster, "horizontalpodautoscalers.v2.autoscaling", "scaled", "-n", namespace)
    assert stored["spec"]["maxReplicas"] == 3
    # No metrics API here: the HPA controller still reconciles and says so in a condition.
    reconciled = wait_for(
        lambda: condition(
            get(cluster, "horizontalpodautoscalers.v2.autoscaling", "scaled", "-n", namespace),
            "AbleToScale",
        ),
        60,
        "the HPA controller to set the AbleToScale condition",
    )
    assert reconciled is not None


def test_disruption_controller_fills_pdb_status(cluster: ControlPlane, namespace: str) -> None:
    apply(cluster, deployment(namespace, "guarded", 2, {"requests": {"cpu": "100m"}}))
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "guarded", "namespace": namespace},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "guarded"}}},
    }
    apply(cluster, pdb)

    def healthy_status() -> dict[str, Any] | None:
        status: dict[str, Any] = get(cluster, "pdb", "guarded", "-n", namespace).get("status", {})
        return status if status.get("currentHealthy") == 2 else None

    status = wait_for(healthy_status, 60, "PDB guarded to count 2 healthy pods")
    assert status is not None
    assert status["expectedPods"] == 2 and status["disruptionsAllowed"] == 1


def test_service_account_tokens_are_issued(cluster: ControlPlane, namespace: str) -> None:
    cluster.kubectl("create", "serviceaccount", "robot", "-n", namespace)
    token = cluster.kubectl("create", "token", "robot", "-n", namespace).stdout.strip()
    assert token.count(".") == 2  # a JWT from the TokenRequest API
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/service-account-token",
        "metadata": {
            "name": "robot-token",
            "namespace": namespace,
            "annotations": {"kubernetes.io/service-account.name": "robot"},
        },
    }
    apply(cluster, secret)
    wait_for(
        lambda: get(cluster, "secret", "robot-token", "-n", namespace).get("data", {}).get("token"),
        30,
        "the token controller to fill secret robot-token",
    )
    wait_for(
        lambda: cluster.kubectl("get", "configmap", "kube-root-ca.crt", "-n", namespace, check=False).returncode == 0,
        30,
        "the root CA ConfigMap to be published into the namespace",
    )


def test_impersonated_service_account_without_rbac_is_forbidden(cluster: ControlPlane, namespace: str) -> None:
    cluster.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    user = f"system:serviceaccount:{namespace}:reader"
    denied = cluster.kubectl("get", "pods", "-n", namespace, as_user=user, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower() and user in denied.stderr, denied.stderr

    cluster.kubectl("create", "role", "pod-reader", "--verb=get,list", "--resource=pods", "-n", namespace)
    cluster.kubectl(
        "create",
        "rolebinding",
        "pod-reader",
        "--role=pod-reader",
        f"--serviceaccount={namespace}:reader",
        "-n",
        namespace,
    )
    wait_for(
        lambda: cluster.kubectl("get", "pods", "-n", namespace, as_user=user, check=False).returncode == 0,
        30,
        "the impersonated ServiceAccount to be allowed after binding a Role",
    )
    other = cluster.kubectl("get", "pods", "-n", "kube-system", as_user=user, check=False)
    assert other.returncode != 0 and "forbidden" in other.stderr.lower()


def test_namespace_deletion_completes(cluster: ControlPlane) -> None:
    name = f"e2e-doomed-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("create", "configmap", "leftover", "-n", name, "--from-literal=k=v")
    cluster.kubectl("delete", "namespace", name, "--wait=false")
    wait_for(
        lambda: cluster.kubectl("get", "namespace", name, check=False).returncode != 0,
        60,
        f"the namespace controller to finish deleting namespace {name}",
    )
