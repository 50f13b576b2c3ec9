"""The resync: the LISTs that fill the store at startup, and repair it when a watch missed a deletion."""

from __future__ import annotations

import pytest
from kmock import KubernetesError

from llmservice_operator.kube import KubeError
from llmservice_operator.reconcile import Key
from tests.operator.kmock.conftest import (
    COLLECTIONS,
    KEY,
    LLMSERVICES,
    NAME,
    NAMESPACE,
    SERVICES,
    ApiServer,
    Controller,
    child_writes,
    exists,
    seed,
    settle,
    writes,
)
from tests.operator.specs import MINIMAL, body

pytestmark = pytest.mark.asyncio


async def test_the_startup_fill_queues_every_llmservice_once(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body(MINIMAL))
    seed(kmock, body(MINIMAL, name="other", namespace="team-b"))

    assert await controller.sync() == [KEY, Key("team-b", "other")]

    # Cluster-wide LISTs, children by our labels, LLMServices whatever their labels.
    lists = {r.url.path: r.params.get("labelSelector") for r in kmock}
    assert lists["/apis/llmservice.io/v1alpha1/llmservices"] is None
    assert lists["/apis/apps/v1/deployments"] == "app.kubernetes.io/managed-by=llmservice-operator,llmservice.io/name"
    assert lists["/api/v1/pods"] == "app.kubernetes.io/managed-by=llmservice-operator,llmservice.io/name"
    assert writes(kmock) == []


async def test_a_resync_that_finds_nothing_changed_queues_nothing(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body(MINIMAL))
    mark = await settle(kmock, controller)
    # The fill, then the rollout: the store had only ever learnt of our own writes from their responses.
    assert controller.queued == [KEY, KEY]

    assert await controller.sync() == []
    assert await controller.sync() == []

    assert controller.queued == [KEY, KEY]
    assert writes(kmock, mark) == []


async def test_a_child_deleted_behind_the_stores_back_is_recreated_after_resync(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body(MINIMAL))
    mark = await settle(kmock, controller)
    # Deleted while the watch was down: no DELETED event will ever say so.
    del kmock.objects[SERVICES, NAMESPACE, NAME]

    assert await controller.reconcile(sync=False) == "unchanged"  # the store still holds it
    assert child_writes(kmock, mark) == []

    assert await controller.sync() == [KEY]
    assert await controller.reconcile(sync=False) == "applied"

    assert [(r.method.value, r.url.path) for r in child_writes(kmock, mark)] == [("PATCH", f"{COLLECTIONS['Service']}/{NAME}")]
    assert exists(kmock, SERVICES)
    assert await controller.sync() == []  # the store learnt the new Service from the apply's response


async def test_an_llmservice_deleted_behind_the_stores_back_is_gone_after_resync(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body(MINIMAL))
    mark = await settle(kmock, controller)
    del kmock.objects[LLMSERVICES, NAMESPACE, NAME]

    assert await controller.sync() == [KEY]
    assert await controller.reconcile(sync=False) == "gone"

    assert writes(kmock, mark) == []


async def test_a_failed_list_fails_the_resync_and_keeps_what_the_store_knew(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body(MINIMAL))
    mark = await settle(kmock, controller)
    kmock["get /api/v1/pods"] << KubernetesError(status=503, reason="ServiceUnavailable", message="try later")

    with pytest.raises(KubeError, match="HTTP 503"):
        await controller.sync()

    assert await controller.reconcile(sync=False) == "unchanged"
    assert controller.requests() == []
    assert writes(kmock, mark) == []
