"""The model cache at the request level: held replicas, the Job's completion, a revision change beside the old copy."""

from __future__ import annotations

from typing import Any

import pytest

from tests.operator.kmock.conftest import (
    COLLECTIONS,
    DEPLOYMENTS,
    JOBS,
    LLMSERVICES,
    NAME,
    PVCS,
    ApiServer,
    Controller,
    body_of,
    modify,
    roll_out,
    seed,
    stored,
    writes,
)
from tests.operator.specs import body

pytestmark = pytest.mark.asyncio

CACHED: dict[str, Any] = {
    "model": {"source": {"huggingFace": {"repo": "acme/tiny", "revision": "r1"}}, "cache": {"size": "10Gi"}},
    "resources": {"gpu": {"count": 0}},
    "replicas": 2,
}


def ready(kmock: ApiServer) -> dict[str, Any]:
    return next(c for c in stored(kmock, LLMSERVICES)["status"]["conditions"] if c["type"] == "Ready")


def served(kmock: ApiServer) -> tuple[int, str, str]:
    deployment = stored(kmock, DEPLOYMENTS)
    template = deployment["spec"]["template"]
    env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
    annotation = (template["metadata"].get("annotations") or {}).get("llmservice.io/model-revision", "")
    return deployment["spec"]["replicas"], env["LLMSERVICE_MODEL"], annotation


def complete_job(kmock: ApiServer) -> None:
    modify(kmock, JOBS, f"{NAME}-fetch", status={"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1})


async def test_replicas_wait_for_the_cache_then_a_new_revision_is_fetched_beside_the_old(kmock: ApiServer, controller: Controller) -> None:
    seed(kmock, body(CACHED))
    assert await controller.reconcile() == "applied"
    assert stored(kmock, PVCS, f"{NAME}-model")["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert stored(kmock, JOBS, f"{NAME}-fetch")["spec"]["template"]["spec"]["containers"][0]["args"][3] == "r1"
    assert served(kmock)[0] == 0
    assert (ready(kmock)["reason"], stored(kmock, LLMSERVICES)["status"]["cache"]["phase"]) == ("CacheFetching", "Pending")

    complete_job(kmock)
    assert await controller.reconcile() == "applied"
    assert served(kmock) == (2, "/models/acme--tiny/r1", "r1")
    assert stored(kmock, LLMSERVICES)["status"]["cache"]["phase"] == "Ready"
    roll_out(kmock)
    assert await controller.reconcile() == "applied"
    assert ready(kmock)["status"] == "True"

    llmservice = stored(kmock, LLMSERVICES)
    r2 = {"huggingFace": {"repo": "acme/tiny", "revision": "r2"}}
    spec = {**llmservice["spec"], "model": {**llmservice["spec"]["model"], "source": r2}}
    modify(kmock, LLMSERVICES, spec=spec, metadata={**llmservice["metadata"], "generation": 2})
    old_job = stored(kmock, JOBS, f"{NAME}-fetch")["metadata"]["uid"]
    mark = len(list(kmock))
    assert await controller.reconcile() == "applied"

    job_writes = [r for r in writes(kmock, mark) if r.url.path.startswith(COLLECTIONS["Job"])]
    assert [r.method.value for r in job_writes] == ["DELETE", "PATCH"], "a Job's template cannot change: replaced"
    assert body_of(job_writes[0])["preconditions"] == {"uid": old_job}
    assert stored(kmock, JOBS, f"{NAME}-fetch")["spec"]["template"]["spec"]["containers"][0]["args"][3] == "r2"
    assert served(kmock) == (2, "/models/acme--tiny/r1", "r1"), "the old copy keeps serving while r2 is fetched"
    status = stored(kmock, LLMSERVICES)["status"]
    assert status["cache"]["revision"] == "r2" and status["cache"]["phase"] == "Pending"
    assert ready(kmock)["reason"] != "CacheFetching"

    complete_job(kmock)
    assert await controller.reconcile() == "applied"
    assert served(kmock) == (2, "/models/acme--tiny/r2", "r2")
