"""Pruning: children we own that are no longer rendered go, by uid; nobody else's objects do."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.operator.kmock.conftest import (
    COLLECTIONS,
    HPAS,
    LLMSERVICES,
    NAME,
    NAMESPACE,
    PDBS,
    ApiServer,
    Controller,
    body_of,
    header,
    modify,
    rendered,
    seed,
    settle,
    stored,
    writes,
)
from tests.operator.specs import MINIMAL, body

pytestmark = pytest.mark.asyncio

AUTOSCALED: dict[str, Any] = {**MINIMAL, "autoscaling": {"minReplicas": 2, "maxReplicas": 4, "metric": "cpu", "target": 70}}
OTHER_UID = "0b5e2d35-1111-4c4c-8e8e-000000000000"


def foreign_hpa(name: str, owner_uid: str | None) -> dict[str, Any]:
    """An HPA carrying our labels, as a copy-paste or another controller might leave one."""
    hpa = copy.deepcopy(next(m for m in rendered(body(AUTOSCALED)) if m["kind"] == "HorizontalPodAutoscaler"))
    hpa["metadata"]["name"] = name
    hpa["metadata"]["uid"] = f"uid-of-{name}"
    if owner_uid is None:
        del hpa["metadata"]["ownerReferences"]
    else:
        hpa["metadata"]["ownerReferences"][0]["uid"] = owner_uid
    return hpa


def turn_autoscaling_off(kmock: ApiServer, replicas: int) -> None:
    """What `kubectl apply` of the edited manifest does: a new spec, a new generation."""
    llmservice = stored(kmock, LLMSERVICES)
    spec = {k: v for k, v in llmservice["spec"].items() if k != "autoscaling"}
    modify(kmock, LLMSERVICES, spec={**spec, "replicas": replicas}, metadata={**llmservice["metadata"], "generation": 2})


async def test_turning_autoscaling_off_deletes_our_hpa_by_uid(kmock: ApiServer, controller: Controller) -> None:
    kmock.objects[HPAS, NAMESPACE, "chat-canary"] = foreign_hpa("chat-canary", OTHER_UID)
    kmock.objects[HPAS, NAMESPACE, "chat-by-hand"] = foreign_hpa("chat-by-hand", None)
    seed(kmock, body(AUTOSCALED))
    mark = await settle(kmock, controller, replicas=2)
    ours = stored(kmock, HPAS)["metadata"]["uid"]
    assert ours not in ("uid-of-chat-canary", "uid-of-chat-by-hand")

    turn_autoscaling_off(kmock, replicas=3)
    assert await controller.reconcile() == "applied"

    deletes = [r for r in writes(kmock, mark) if r.method.value == "DELETE"]
    assert [r.url.path for r in deletes] == [f"{COLLECTIONS['HorizontalPodAutoscaler']}/{NAME}"]
    assert header(deletes[0], "Content-Type") == "application/json"
    assert body_of(deletes[0]) == {
        "apiVersion": "v1",
        "kind": "DeleteOptions",
        "preconditions": {"uid": ours},
        "propagationPolicy": "Background",
    }
    assert kmock.objects[HPAS, NAMESPACE, NAME].deleted
    assert not kmock.objects[HPAS, NAMESPACE, "chat-canary"].deleted
    assert not kmock.objects[HPAS, NAMESPACE, "chat-by-hand"].deleted
    assert not kmock.objects[PDBS, NAMESPACE, NAME].deleted  # still more than one replica: the PDB stays

    # The spec takes replicas back from the departed HPA (which had chosen 2).
    applies = [r for r in writes(kmock, mark) if r.url.path == f"{COLLECTIONS['Deployment']}/{NAME}"]
    assert [body_of(r)["spec"]["replicas"] for r in applies] == [3]


async def test_shrinking_to_one_replica_prunes_the_pdb_too(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body(AUTOSCALED))
    mark = await settle(kmock, controller, replicas=2)

    turn_autoscaling_off(kmock, replicas=1)
    assert await controller.reconcile() == "applied"

    deletes = sorted(r.url.path for r in writes(kmock, mark) if r.method.value == "DELETE")
    assert deletes == [f"{COLLECTIONS['HorizontalPodAutoscaler']}/{NAME}", f"{COLLECTIONS['PodDisruptionBudget']}/{NAME}"]


async def test_a_replaced_child_is_left_to_its_new_owner(kmock: ApiServer, controller: Controller) -> None:
    """The uid precondition makes the API server refuse (409) to delete an object that was replaced."""
    seed(kmock, body(AUTOSCALED))
    mark = await settle(kmock, controller, replicas=2)
    turn_autoscaling_off(kmock, replicas=2)

    await controller.sync()
    # After the store saw the HPA and before our DELETE, someone deletes and recreates it: a new
    # uid, whose watch event has not reached the store yet.
    modify(kmock, HPAS, metadata={**stored(kmock, HPAS)["metadata"], "uid": "uid-of-the-replacement"})

    assert await controller.reconcile(sync=False) == "applied"

    deletes = [r for r in writes(kmock, mark) if r.method.value == "DELETE"]
    assert len(deletes) == 1 and body_of(deletes[0])["preconditions"]["uid"] != "uid-of-the-replacement"
    assert not kmock.objects[HPAS, NAMESPACE, NAME].deleted
    assert controller.api_requests("delete", "409") == 1
