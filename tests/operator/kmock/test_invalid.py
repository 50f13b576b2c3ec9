"""A spec the operator cannot serve: a condition and a Warning Event, no children, and quiet after that."""

from __future__ import annotations

from typing import Any

import pytest

from tests.operator.kmock.conftest import (
    EVENTS_PATH,
    LLMSERVICES,
    STATUS_PATH,
    ApiServer,
    Controller,
    body_of,
    modify,
    requests,
    seed,
    stored,
    writes,
)
from tests.operator.specs import MINIMAL, UID, body

pytestmark = pytest.mark.asyncio

BOTH: dict[str, Any] = {**MINIMAL, "replicas": 2, "autoscaling": {"minReplicas": 1, "maxReplicas": 3}}
MESSAGE = "set spec.replicas or spec.autoscaling, not both: the HPA owns replicas when autoscaling"


async def test_an_invalid_spec_gets_a_condition_and_a_warning_and_no_children(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body(BOTH, generation=3))

    await controller.run()

    assert controller.reconciles("invalid") == 1
    # Parsing failed, so nothing else was asked: no discovery.
    assert [(r.method.value, r.url.path) for r in controller.requests()] == [("PATCH", STATUS_PATH), ("POST", EVENTS_PATH)]
    status_apply, event = writes(kmock)
    status = body_of(status_apply)["status"]
    assert status["observedGeneration"] == 3
    conditions = {c["type"]: c for c in status["conditions"]}
    assert {kind: (c["status"], c["reason"]) for kind, c in conditions.items()} == {
        "Ready": ("False", "InvalidSpec"),
        "Progressing": ("False", "InvalidSpec"),
        "Degraded": ("True", "InvalidSpec"),
        "Reconciling": ("False", "AsExpected"),
        "Stalled": ("True", "InvalidSpec"),
    }
    assert conditions["Ready"]["message"] == MESSAGE
    note = body_of(event)
    assert (note["type"], note["reason"], note["note"]) == ("Warning", "InvalidSpec", MESSAGE)
    assert note["regarding"] == {
        "apiVersion": "llmservice.io/v1alpha1",
        "kind": "LLMService",
        "name": "chat",
        "namespace": "team-a",
        "uid": UID,
        "resourceVersion": "",
    }


async def test_an_invalid_spec_costs_nothing_on_resync(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body(BOTH))
    await controller.run()
    assert stored(kmock, LLMSERVICES)["status"]["conditions"][0]["reason"] == "InvalidSpec"
    mark = len(requests(kmock))

    await controller.run()
    assert controller.requests() == []
    await controller.run()
    assert controller.requests() == []

    assert writes(kmock, mark) == []
    assert controller.reconciles("invalid") == 3
    assert controller.reconciles("retry") == 0


async def test_fixing_the_spec_applies_the_children_and_clears_the_condition(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body(BOTH))
    await controller.run()
    metadata = stored(kmock, LLMSERVICES)["metadata"]
    modify(kmock, LLMSERVICES, spec={**MINIMAL, "replicas": 2}, metadata={**metadata, "generation": 2})
    mark = len(requests(kmock))

    assert await controller.reconcile() == "applied"

    kinds = [r.url.path.rsplit("/", 2)[-2] for r in writes(kmock, mark) if r.url.path not in (STATUS_PATH, EVENTS_PATH)]
    assert kinds == ["deployments", "services", "poddisruptionbudgets"]
    status = stored(kmock, LLMSERVICES)["status"]
    assert status["observedGeneration"] == 2
    assert all(c["reason"] != "InvalidSpec" for c in status["conditions"])
    assert writes(kmock, mark)[-1].url.path == STATUS_PATH, "routine progress is not an Event"
