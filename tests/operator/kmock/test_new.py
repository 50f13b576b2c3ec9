"""A new LLMService: one server-side apply per child, one status apply, one Event, nothing else."""

from __future__ import annotations

from typing import Any

import pytest

from tests.operator.kmock.conftest import (
    APPLY,
    COLLECTIONS,
    DEPLOYMENTS,
    EVENTS_PATH,
    FIELD_MANAGER,
    KEY,
    LLMSERVICES,
    NAME,
    NAMESPACE,
    STATUS_PATH,
    ApiServer,
    Controller,
    body_of,
    by_verb,
    child_writes,
    header,
    rendered,
    roll_out,
    seed,
    stored,
    writes,
)
from tests.operator.specs import MINIMAL, UID, body

pytestmark = pytest.mark.asyncio

AUTOSCALED: dict[str, Any] = {**MINIMAL, "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "metric": "cpu", "target": 70}}


@pytest.mark.parametrize(
    ("spec", "kinds"),
    [
        (MINIMAL, ["Deployment", "Service"]),
        ({**MINIMAL, "replicas": 3}, ["Deployment", "Service", "PodDisruptionBudget"]),
        (AUTOSCALED, ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]),
    ],
    ids=["one-replica", "three-replicas", "autoscaled"],
)
async def test_each_child_is_applied_once_with_ssa(
    kmock: ApiServer, controller: Controller, spec: dict[str, Any], kinds: list[str]
) -> None:
    llmservice = body(spec)
    seed(kmock, llmservice)

    assert await controller.reconcile() == "applied"

    desired = rendered(llmservice)
    assert [m["kind"] for m in desired] == kinds
    applies = child_writes(kmock)
    assert [(r.method.value, r.url.path) for r in applies] == [("PATCH", f"{COLLECTIONS[kind]}/{NAME}") for kind in kinds]
    for request, manifest in zip(applies, desired, strict=True):
        assert header(request, "Content-Type") == APPLY
        assert dict(request.params) == {"fieldManager": FIELD_MANAGER, "force": "true"}
        assert body_of(request) == manifest
        assert manifest["metadata"]["ownerReferences"] == [
            {"apiVersion": "llmservice.io/v1alpha1", "kind": "LLMService", "name": NAME, "uid": UID, "controller": True}
        ]


async def test_writes_are_the_children_then_one_status(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body(AUTOSCALED))

    assert await controller.reconcile() == "applied"

    sent = writes(kmock)
    # Four children (Deployment, Service, HPA, PDB) and the status: the floor for a new autoscaled
    # LLMService. Routine progress (RollingOut) is in the conditions, not in an Event.
    assert by_verb(sent) == {"PATCH": 5}
    status_apply = sent[-1]
    assert (status_apply.method.value, status_apply.url.path) == ("PATCH", STATUS_PATH)
    assert header(status_apply, "Content-Type") == APPLY
    assert dict(status_apply.params) == {"fieldManager": FIELD_MANAGER, "force": "true"}
    status = body_of(status_apply)
    assert status["apiVersion"] == "llmservice.io/v1alpha1" and status["kind"] == "LLMService"
    assert status["metadata"] == {"name": NAME, "namespace": NAMESPACE}
    assert set(status) == {"apiVersion", "kind", "metadata", "status"}  # nothing but the status is applied there
    assert status["status"]["observedGeneration"] == 1
    conditions = {c["type"]: c for c in status["status"]["conditions"]}
    assert set(conditions) == {"Ready", "Progressing", "Degraded", "Reconciling", "Stalled"}
    assert (conditions["Reconciling"]["status"], conditions["Stalled"]["status"]) == ("True", "False")
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "RollingOut")
    assert all(c["observedGeneration"] == 1 and c["lastTransitionTime"] == "2026-11-29T10:00:00Z" for c in conditions.values())
    assert status["status"]["selector"] == "app.kubernetes.io/name=llmservice-server,llmservice.io/name=chat"

    # What the API server now holds is what was applied.
    assert stored(kmock, LLMSERVICES)["status"] == status["status"]
    assert "replicas" not in body_of(child_writes(kmock)[0])["spec"]  # the HPA owns replicas
    assert stored(kmock, DEPLOYMENTS)["spec"]["replicas"] == 1  # the server's default, not ours


async def test_a_new_llmservice_costs_five_writes_and_reads_only_discovery_and_its_names(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body(MINIMAL))

    assert await controller.reconcile() == "applied"
    first = [(r.method.value, r.url.path) for r in controller.requests()]
    roll_out(kmock)
    assert await controller.reconcile() == "applied"
    second = [(r.method.value, r.url.path) for r in controller.requests()]

    # Everything else it needs comes from the store the watches feed; discovery is cached for a minute.
    # Each child it is about to create is looked up once by name: the watches see only objects with
    # our labels, and a name held by someone else's object must not be applied over.
    assert first == [
        ("GET", "/apis/monitoring.coreos.com/v1"),
        ("GET", "/apis/custom.metrics.k8s.io"),
        ("GET", f"{COLLECTIONS['Deployment']}/{NAME}"),
        ("GET", f"{COLLECTIONS['Service']}/{NAME}"),
        ("PATCH", f"{COLLECTIONS['Deployment']}/{NAME}"),
        ("PATCH", f"{COLLECTIONS['Service']}/{NAME}"),
        ("PATCH", STATUS_PATH),
    ]
    # Ready: the status says so, and one Event announces it.
    assert second == [("PATCH", STATUS_PATH), ("POST", EVENTS_PATH)]


async def test_not_ready_says_why_from_the_pods_in_the_store(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body({**MINIMAL, "resources": {"gpu": {"count": 2}}}))
    assert await controller.reconcile() == "applied"
    pod_labels = stored(kmock, DEPLOYMENTS)["spec"]["template"]["metadata"]["labels"]
    kmock.objects["v1/pods", NAMESPACE, "chat-5d8f-abcde"] = {
        "metadata": {"name": "chat-5d8f-abcde", "namespace": NAMESPACE, "labels": pod_labels, "resourceVersion": kmock.next_version()},
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
                }
            ],
        },
    }

    assert await controller.reconcile() == "applied"

    # A cluster autoscaler may add a GPU node: progress, not a failure, and no Event.
    assert [(r.method.value, r.url.path) for r in controller.requests()] == [("PATCH", STATUS_PATH)]
    conditions = {c["type"]: c for c in stored(kmock, LLMSERVICES)["status"]["conditions"]}
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "WaitingForCapacity")
    assert "chat-5d8f-abcde" in conditions["Ready"]["message"]
    assert (conditions["Progressing"]["reason"], conditions["Degraded"]["status"]) == ("WaitingForCapacity", "False")
    # Nothing will change in the cluster when the grace period ends: the reconciler asks to look again then.
    assert controller.requeued == [(KEY, 900.0 + 1.0)]

    # The scheduler said so long ago: past the grace period it is a failure that waiting will not fix.
    pod = kmock.objects["v1/pods", NAMESPACE, "chat-5d8f-abcde"]
    pod["status"] = {
        **pod.raw["status"],
        "conditions": [{**pod.raw["status"]["conditions"][0], "lastTransitionTime": "2026-11-29T09:40:00Z"}],
    }
    pod["metadata"] = {**pod.raw["metadata"], "resourceVersion": kmock.next_version()}
    assert await controller.reconcile() == "applied"

    assert [(r.method.value, r.url.path) for r in controller.requests()] == [("PATCH", STATUS_PATH), ("POST", EVENTS_PATH)]
    conditions = {c["type"]: c for c in stored(kmock, LLMSERVICES)["status"]["conditions"]}
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "InsufficientGPU")
    assert (conditions["Stalled"]["status"], conditions["Degraded"]["status"]) == ("True", "True")
