"""Drift: a child someone else changed is applied back, and only that child."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from tests.operator.kmock.conftest import (
    COLLECTIONS,
    DEPLOYMENTS,
    EVENTS_PATH,
    IMAGE,
    NAME,
    NAMESPACE,
    SERVICES,
    STATUS_PATH,
    ApiServer,
    Controller,
    body_of,
    child_writes,
    modify,
    seed,
    settle,
    stored,
    writes,
)
from tests.operator.specs import MINIMAL, body

pytestmark = pytest.mark.asyncio


def edit(kmock: ApiServer, resource: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Another writer (kubectl edit, a mutating webhook) changes a stored child."""
    spec = copy.deepcopy(kmock.objects[resource, NAMESPACE, NAME].raw["spec"])
    change(spec)
    modify(kmock, resource, spec=spec)


def set_image(spec: dict[str, Any]) -> None:
    spec["template"]["spec"]["containers"][0]["image"] = "registry.example/someone-else:latest"


def drop_env(spec: dict[str, Any]) -> None:
    spec["template"]["spec"]["containers"][0]["env"].pop()


def set_service_type(spec: dict[str, Any]) -> None:
    spec["type"] = "NodePort"


@pytest.mark.parametrize(
    ("resource", "change", "kind"),
    [(DEPLOYMENTS, set_image, "Deployment"), (DEPLOYMENTS, drop_env, "Deployment"), (SERVICES, set_service_type, "Service")],
    ids=["deployment-image", "deployment-env", "service-type"],
)
async def test_a_drifted_child_is_applied_back_alone(
    kmock: ApiServer, controller: Controller, resource: str, change: Callable[[dict[str, Any]], None], kind: str
) -> None:
    seed(kmock, body({**MINIMAL, "replicas": 2}))
    mark = await settle(kmock, controller)
    edit(kmock, resource, change)

    assert await controller.reconcile() == "applied"

    applies = child_writes(kmock, mark)
    assert [(r.method.value, r.url.path) for r in applies] == [("PATCH", f"{COLLECTIONS[kind]}/{NAME}")]
    assert body_of(applies[0])["kind"] == kind
    # The rest, if anything, is the LLMService's own status and its Event.
    assert {r.url.path for r in writes(kmock, mark)} - {applies[0].url.path} <= {STATUS_PATH, EVENTS_PATH}


async def test_the_image_is_restored_and_the_rollout_reported(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body(MINIMAL))
    mark = await settle(kmock, controller)
    edit(kmock, DEPLOYMENTS, set_image)

    assert await controller.reconcile() == "applied"

    assert stored(kmock, DEPLOYMENTS)["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    # The API server bumped the Deployment's generation; until its controller observes it, the
    # LLMService is not Ready, and says so once in its status.
    sent = writes(kmock, mark)
    assert [r.url.path for r in sent] == [f"{COLLECTIONS['Deployment']}/{NAME}", STATUS_PATH]
    ready = next(c for c in body_of(sent[1])["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "RollingOut")
