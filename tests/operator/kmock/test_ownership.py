"""A child's name held by an object this LLMService does not control: never applied over, never deleted."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from llmservice_operator.reconcile import CONFLICT_RECHECK_SECONDS
from tests.operator.kmock.conftest import (
    COLLECTIONS,
    DEPLOYMENTS,
    EVENTS_PATH,
    HPAS,
    KEY,
    LLMSERVICES,
    NAME,
    NAMESPACE,
    SERVICES,
    STATUS_PATH,
    ApiServer,
    Controller,
    body_of,
    child_writes,
    exists,
    rendered,
    seed,
    stored,
    writes,
)
from tests.operator.specs import MINIMAL, body

pytestmark = pytest.mark.asyncio

SERVICE_PATH = f"{COLLECTIONS['Service']}/{NAME}"
OTHER_UID = "0b5e2d35-2222-4c4c-8e8e-000000000000"


def users_service() -> dict[str, Any]:
    """A Service someone made by hand before the LLMService: no labels of ours, no owner."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": NAME, "namespace": NAMESPACE, "uid": "uid-of-users-service", "resourceVersion": "500"},
        "spec": {"ports": [{"name": "postgres", "port": 5432}], "selector": {"app": "postgres"}},
    }


def ready_conditions(kmock: ApiServer) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in stored(kmock, LLMSERVICES)["status"]["conditions"]}


async def test_a_name_held_by_someone_elses_object_is_a_name_conflict(kmock: ApiServer, controller: Controller) -> None:
    kmock.objects[SERVICES, NAMESPACE, NAME] = users_service()
    seed(kmock, body(MINIMAL))

    assert await controller.reconcile() == "conflict"

    # Nothing applied at all (not even the Deployment: half a service is worse than none).
    assert child_writes(kmock) == []
    assert not exists(kmock, DEPLOYMENTS)
    assert stored(kmock, SERVICES) == users_service(), "the user's Service must be left exactly as it was"
    conditions = ready_conditions(kmock)
    assert {kind: (c["status"], c["reason"]) for kind, c in conditions.items()} == {
        "Ready": ("False", "NameConflict"),
        "Progressing": ("False", "NameConflict"),
        "Degraded": ("True", "NameConflict"),
        "Reconciling": ("False", "AsExpected"),
        "Stalled": ("True", "NameConflict"),
    }
    message = conditions["Ready"]["message"]
    assert f"Service {NAMESPACE}/{NAME} already exists" in message and "will not change or delete it" in message
    sent = writes(kmock)
    assert [(r.method.value, r.url.path) for r in sent] == [("PATCH", STATUS_PATH), ("POST", EVENTS_PATH)]
    event = body_of(sent[1])
    assert (event["type"], event["reason"], event["note"]) == ("Warning", "NameConflict", message)

    # The user's Service has none of our labels, so no watch event will say it went: look again later.
    assert controller.requeued == [(KEY, CONFLICT_RECHECK_SECONDS)]
    # Looking again while the name is still taken writes nothing.
    assert await controller.reconcile() == "conflict"
    assert [r for r in controller.requests() if r.method.value != "GET"] == []


async def test_once_the_name_is_free_reconcile_goes_on(kmock: ApiServer, controller: Controller) -> None:
    kmock.objects[SERVICES, NAMESPACE, NAME] = users_service()
    seed(kmock, body(MINIMAL))
    assert await controller.reconcile() == "conflict"

    del kmock.objects[SERVICES, NAMESPACE, NAME]
    assert await controller.reconcile() == "applied"

    assert [(r.method.value, r.url.path) for r in child_writes(kmock)] == [
        ("PATCH", f"{COLLECTIONS['Deployment']}/{NAME}"),
        ("PATCH", SERVICE_PATH),
    ]
    assert stored(kmock, SERVICES)["metadata"]["ownerReferences"][0]["controller"] is True
    assert ready_conditions(kmock)["Ready"]["reason"] == "RollingOut"


def labelled_service(owner_name: str, owner_uid: str) -> dict[str, Any]:
    """Our Service as rendered, but controlled by another LLMService (the store holds it: it has our labels)."""
    held = copy.deepcopy(next(m for m in rendered(body(MINIMAL)) if m["kind"] == "Service"))
    held["metadata"]["ownerReferences"][0].update(name=owner_name, uid=owner_uid)
    held["metadata"].update(uid="uid-of-held-service", resourceVersion="501")
    return held


async def test_a_child_of_a_deleted_predecessor_is_waited_for_not_taken(kmock: ApiServer, controller: Controller) -> None:
    """Deleted and re-created under the same name (a GitOps replace) before the garbage collector removed the old
    children: a wait, not a failure, so Flux and Argo CD do not fail the sync."""
    kmock.objects[SERVICES, NAMESPACE, NAME] = labelled_service(NAME, OTHER_UID)
    seed(kmock, body(MINIMAL))

    assert await controller.reconcile() == "waiting"

    assert child_writes(kmock) == []
    # Known from the store the watches fill: no lookup needed.
    assert ("GET", SERVICE_PATH) not in [(r.method.value, r.url.path) for r in controller.requests()]
    conditions = ready_conditions(kmock)
    assert {kind: (c["status"], c["reason"]) for kind, c in conditions.items()} == {
        "Ready": ("False", "Creating"),
        "Progressing": ("True", "Creating"),
        "Degraded": ("False", "AsExpected"),
        "Reconciling": ("True", "Creating"),
        "Stalled": ("False", "AsExpected"),
    }
    assert "garbage collector" in conditions["Ready"]["message"]
    assert [r.url.path for r in writes(kmock)] == [STATUS_PATH], "routine progress: no Event"

    del kmock.objects[SERVICES, NAMESPACE, NAME]  # the garbage collector's turn
    assert await controller.reconcile() == "applied"
    assert stored(kmock, SERVICES)["metadata"]["ownerReferences"][0]["uid"] != OTHER_UID


async def test_a_child_of_another_llmservice_is_a_conflict(kmock: ApiServer, controller: Controller) -> None:
    kmock.objects[SERVICES, NAMESPACE, NAME] = labelled_service("other", OTHER_UID)
    seed(kmock, body(MINIMAL))

    assert await controller.reconcile() == "conflict"

    assert child_writes(kmock) == []
    assert f"is controlled by LLMService other (uid {OTHER_UID})" in ready_conditions(kmock)["Ready"]["message"]


async def test_our_own_child_the_store_missed_is_applied(kmock: ApiServer, controller: Controller) -> None:
    """A child that carries our controller reference but lost our labels is still ours: applied, labels put back."""
    ours = copy.deepcopy(next(m for m in rendered(body(MINIMAL)) if m["kind"] == "Service"))
    ours["metadata"]["labels"] = {}
    ours["metadata"].update(uid="uid-of-our-service", resourceVersion="502")
    kmock.objects[SERVICES, NAMESPACE, NAME] = ours
    seed(kmock, body(MINIMAL))

    assert await controller.reconcile() == "applied"

    assert stored(kmock, SERVICES)["metadata"]["labels"]["llmservice.io/name"] == NAME


async def test_a_foreign_hpa_of_the_same_name_blocks_autoscaling(kmock: ApiServer, controller: Controller) -> None:
    kmock.objects[HPAS, NAMESPACE, NAME] = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {
            "name": NAME,
            "namespace": NAMESPACE,
            "uid": "uid-of-keda-hpa",
            "resourceVersion": "503",
            "ownerReferences": [
                {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "name": NAME, "uid": "keda-uid", "controller": True}
            ],
        },
        "spec": {"maxReplicas": 9, "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME}},
    }
    seed(kmock, body({**MINIMAL, "autoscaling": {"minReplicas": 1, "maxReplicas": 3, "metric": "cpu"}}))

    assert await controller.reconcile() == "conflict"

    assert child_writes(kmock) == []
    assert stored(kmock, HPAS)["spec"]["maxReplicas"] == 9
    assert "is controlled by ScaledObject chat (uid keda-uid)" in ready_conditions(kmock)["Ready"]["message"]
