"""A settled LLMService costs reads only: zero writes on resync."""

from __future__ import annotations

from typing import Any

import pytest

from tests.operator.kmock.conftest import (
    CHILDREN_SELECTOR,
    COLLECTIONS,
    DEPLOYMENTS,
    HPAS,
    LLMSERVICE_PATH,
    LLMSERVICES,
    SERVICES,
    ApiServer,
    Controller,
    requests,
    seed,
    settle,
    stored,
    writes,
)
from tests.operator.specs import MINIMAL, body

pytestmark = pytest.mark.asyncio

SETTLED_SPECS: dict[str, tuple[dict[str, Any], int | None]] = {
    "one-replica": (MINIMAL, None),
    # 4096Mi is stored as 4Gi by the API server: the same quantity, not drift.
    "two-replicas-non-canonical-memory": (
        {**MINIMAL, "replicas": 2, "resources": {"gpu": {"count": 0}, "memory": {"request": "4096Mi", "limit": "8Gi"}}}, None,
    ),
    # The HPA has scaled the Deployment to 3: its choice, not drift, and not ours to fight.
    "autoscaled-hpa-chose-3": (
        {**MINIMAL, "autoscaling": {"minReplicas": 2, "maxReplicas": 5, "metric": "cpu", "target": 60}}, 3,
    ),
}


@pytest.mark.parametrize(("spec", "hpa_replicas"), SETTLED_SPECS.values(), ids=SETTLED_SPECS.keys())
async def test_a_settled_llmservice_costs_zero_writes(
    kmock: ApiServer, controller: Controller, spec: dict[str, Any], hpa_replicas: int | None
) -> None:
    seed(kmock, body(spec))
    mark = await settle(kmock, controller, replicas=hpa_replicas)
    # The API server holds its own defaults on top of what was applied.
    assert stored(kmock, DEPLOYMENTS)["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"]
    assert stored(kmock, SERVICES)["spec"]["clusterIP"]
    resources = stored(kmock, DEPLOYMENTS)["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["memory"] == "4Gi"  # canonical, whatever the spec wrote

    assert await controller.reconcile() == "unchanged"

    assert writes(kmock, mark) == []
    # The whole cost of a resync: one GET and one LIST per child kind (discovery is cached, and a
    # Ready service has no pods to read).
    assert [(r.method.value, r.url.path, r.params.get("labelSelector")) for r in requests(kmock, mark)] == [
        ("GET", LLMSERVICE_PATH, None),
        ("GET", COLLECTIONS["Deployment"], CHILDREN_SELECTOR),
        ("GET", COLLECTIONS["Service"], CHILDREN_SELECTOR),
        ("GET", COLLECTIONS["HorizontalPodAutoscaler"], CHILDREN_SELECTOR),
        ("GET", COLLECTIONS["PodDisruptionBudget"], CHILDREN_SELECTOR),
    ]

    await controller.run()
    assert writes(kmock, mark) == []
    assert controller.reconciles("unchanged") == 1


async def test_the_hpa_keeps_the_replicas_it_chose(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body({**MINIMAL, "autoscaling": {"minReplicas": 1, "maxReplicas": 5, "metric": "cpu", "target": 60}}))
    await settle(kmock, controller, replicas=4)
    assert stored(kmock, HPAS)["spec"]["maxReplicas"] == 5

    for _ in range(3):
        assert await controller.reconcile() == "unchanged"

    assert stored(kmock, DEPLOYMENTS)["spec"]["replicas"] == 4
    conditions = stored(kmock, LLMSERVICES)["status"]["conditions"]
    assert {c["type"]: c["status"] for c in conditions} == {"Ready": "True", "Progressing": "False", "Degraded": "False"}
