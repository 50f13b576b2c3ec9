"""A settled LLMService costs nothing: no write and, reading from the store, no request at all."""

from __future__ import annotations

from typing import Any

import pytest

from tests.operator.kmock.conftest import (
    DEPLOYMENTS,
    HPAS,
    LLMSERVICES,
    SERVICES,
    ApiServer,
    Controller,
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
        {**MINIMAL, "replicas": 2, "resources": {"gpu": {"count": 0}, "memory": {"request": "4096Mi", "limit": "8Gi"}}},
        None,
    ),
    # The HPA has scaled the Deployment to 3: its choice, not drift, and not ours to fight.
    "autoscaled-hpa-chose-3": (
        {**MINIMAL, "autoscaling": {"minReplicas": 2, "maxReplicas": 5, "metric": "cpu", "target": 60}},
        3,
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
    # Everything it compares comes from the store, and discovery is cached.
    assert controller.requests() == []

    await controller.run()
    assert controller.requests() == []
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
    assert {c["type"]: c["status"] for c in conditions} == {
        "Ready": "True",
        "Progressing": "False",
        "Degraded": "False",
        "Reconciling": "False",
        "Stalled": "False",
    }


async def test_a_reconcile_right_after_our_writes_writes_nothing_again(kmock: ApiServer, controller: Controller) -> None:
    """The store learns our writes from their responses, before any watch event could tell it."""
    seed(kmock, body({**MINIMAL, "replicas": 3}))
    assert await controller.reconcile() == "applied"

    assert await controller.reconcile(sync=False) == "unchanged"

    assert controller.requests() == []
