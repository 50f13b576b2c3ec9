"""API faults: conflicts and throttling retry quietly, every other refused write is ApplyFailed in the status while
the backoff goes on, a rejected child becomes a condition, a gone object is left alone."""

from __future__ import annotations

import pytest
from kmock import KubernetesError

from llmservice_operator.workqueue import RetryLater
from tests.operator.kmock.conftest import (
    COLLECTIONS,
    DEPLOYMENTS,
    EVENTS_PATH,
    LLMSERVICES,
    NAME,
    STATUS_PATH,
    ApiServer,
    Controller,
    body_of,
    child_writes,
    exists,
    modify,
    seed,
    settle,
    stored,
    writes,
)
from tests.operator.specs import MINIMAL, body

pytestmark = pytest.mark.asyncio

DEPLOYMENT_PATH = f"{COLLECTIONS['Deployment']}/{NAME}"
TRANSIENT = {
    409: KubernetesError(status=409, reason="Conflict", message='Operation cannot be fulfilled on deployments.apps "chat"'),
    429: KubernetesError(status=429, reason="TooManyRequests", message="the server has received too many requests"),
    500: KubernetesError(status=500, reason="InternalError", message="etcdserver: request timed out"),
    503: KubernetesError(status=503, reason="ServiceUnavailable", message="the server is currently unable to handle the request"),
}


@pytest.mark.parametrize("code", [409, 429])
async def test_a_conflict_or_throttling_on_apply_retries_quietly(kmock: ApiServer, controller: Controller, code: int) -> None:
    seed(kmock, body(MINIMAL))
    kmock[f"patch {DEPLOYMENT_PATH}"] << TRANSIENT[code]

    with pytest.raises(RetryLater, match=f"HTTP {code}"):
        await controller.run()

    assert controller.reconciles("retry") == 1
    assert controller.api_requests("apply", str(code)) == 1
    # It stopped at the failed write: no further children, no status, no Event.
    assert [r.url.path for r in writes(kmock)] == [DEPLOYMENT_PATH]
    assert not exists(kmock, DEPLOYMENTS)


REFUSALS = {
    403: KubernetesError(
        status=403,
        reason="Forbidden",
        message='deployments.apps "chat" is forbidden: User "system:serviceaccount:ops:op" cannot patch resource "deployments"',
    ),
    404: KubernetesError(status=404, reason="NotFound", message="the server could not find the requested resource"),
    500: KubernetesError(
        status=500,
        reason="InternalError",
        message='Internal error occurred: failed calling webhook "validate.kyverno.svc": context deadline exceeded',
    ),
}


@pytest.mark.parametrize("code", [403, 404, 500])
async def test_any_other_apply_error_is_apply_failed_in_status_and_retries(kmock: ApiServer, controller: Controller, code: int) -> None:
    seed(kmock, body(MINIMAL))
    kmock[f"patch {DEPLOYMENT_PATH}"] << REFUSALS[code]

    with pytest.raises(RetryLater, match=f"HTTP {code}"):
        await controller.run()

    assert controller.reconciles("retry") == 1  # the backoff continues
    sent = writes(kmock)
    assert [(r.method.value, r.url.path) for r in sent] == [("PATCH", DEPLOYMENT_PATH), ("PATCH", STATUS_PATH), ("POST", EVENTS_PATH)]
    assert not exists(kmock, DEPLOYMENTS)
    conditions = {c["type"]: c for c in stored(kmock, LLMSERVICES)["status"]["conditions"]}
    ready = conditions["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "ApplyFailed")
    assert ready["message"].startswith(f"Applying Deployment team-a/{NAME} failed (HTTP {code}): {REFUSALS[code].message}")
    assert {403: "Grant the operator's ServiceAccount", 404: "install its CRD", 500: ""}[code] in ready["message"]
    assert (conditions["Reconciling"]["status"], conditions["Stalled"]["status"]) == ("True", "False")
    event = body_of(sent[2])
    assert (event["type"], event["reason"], event["note"]) == ("Warning", "ApplyFailed", ready["message"])


async def test_apply_failed_clears_once_the_write_goes_through(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body(MINIMAL))
    kmock[f"patch {DEPLOYMENT_PATH}"][:1] << REFUSALS[403]  # RBAC fixed after the first attempt

    with pytest.raises(RetryLater):
        await controller.run()
    await controller.run()

    ready = next(c for c in stored(kmock, LLMSERVICES)["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "RollingOut"
    assert exists(kmock, DEPLOYMENTS)


async def test_an_error_writing_the_status_itself_retries_later(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body(MINIMAL))
    kmock[f"patch {STATUS_PATH}"] << TRANSIENT[503]

    with pytest.raises(RetryLater, match="HTTP 503"):
        await controller.run()

    assert controller.reconciles("retry") == 1
    assert [r.url.path for r in writes(kmock) if r.url.path == EVENTS_PATH] == []


async def test_a_retry_after_a_conflict_converges(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body(MINIMAL))
    kmock[f"patch {DEPLOYMENT_PATH}"][:1] << TRANSIENT[409]  # only the first attempt fails

    with pytest.raises(RetryLater):
        await controller.run()
    await controller.run()

    assert (controller.reconciles("retry"), controller.reconciles("applied")) == (1, 1)
    assert [r.url.path for r in writes(kmock)] == [DEPLOYMENT_PATH, DEPLOYMENT_PATH, f"{COLLECTIONS['Service']}/{NAME}", STATUS_PATH]


async def test_a_rejected_child_becomes_an_invalid_spec_condition(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body(MINIMAL))
    message = 'Deployment.apps "chat" is invalid: spec.template.spec.tolerations[0].operator: Unsupported value: "Sometimes"'
    kmock[f"patch {DEPLOYMENT_PATH}"] << KubernetesError(status=422, reason="Invalid", message=message)

    await controller.run()  # no RetryLater: retrying the same spec cannot help

    assert controller.reconciles("invalid") == 1
    assert controller.reconciles("retry") == 0
    sent = writes(kmock)
    assert [(r.method.value, r.url.path) for r in sent] == [("PATCH", DEPLOYMENT_PATH), ("PATCH", STATUS_PATH), ("POST", EVENTS_PATH)]
    status = body_of(sent[1])["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert ready["message"] == f"The API server rejected a child object: {message}"
    event = body_of(sent[2])
    assert (event["type"], event["reason"], event["note"]) == ("Warning", "InvalidSpec", ready["message"])


async def test_a_gone_llmservice_is_left_alone(kmock: ApiServer, controller: Controller) -> None:
    await controller.run()  # nothing seeded: the store holds no such LLMService

    assert controller.reconciles("gone") == 1
    assert controller.requests() == []


async def test_a_deleting_llmservice_is_left_to_the_garbage_collector(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body(MINIMAL))
    mark = await settle(kmock, controller)
    metadata = stored(kmock, LLMSERVICES)["metadata"]
    modify(kmock, LLMSERVICES, metadata={**metadata, "deletionTimestamp": "2026-11-29T10:01:00Z"})

    assert await controller.reconcile() == "gone"

    assert controller.requests() == []
    assert child_writes(kmock, mark) == []
