"""The Argo CD health check in examples/gitops, run in a real Lua runtime on statuses the operator computes."""

from __future__ import annotations

from typing import Any

from llmservice_operator.status import Observed, compute
from tests.operator.specs import MINIMAL, body, service
from tests.operator.test_status import NOW, deployment, pod

# The health_check fixture (tests/operator/conftest.py) runs the Lua of examples/gitops/argocd-cm-health.yaml.


def llmservice(status: dict[str, Any] | None, generation: int = 3) -> dict[str, Any]:
    obj = body(MINIMAL, generation=generation)
    if status is not None:
        obj["status"] = status
    return obj


def test_no_status_yet_is_progressing(health_check: Any) -> None:
    assert health_check(llmservice(None)) == ("Progressing", "Waiting for the operator to report status")


def test_ready_is_healthy(health_check: Any) -> None:
    status = compute(service(MINIMAL, generation=3), Observed(deployment=deployment(2, 2)), None, NOW)
    state, message = health_check(llmservice(status))
    assert state == "Healthy"
    assert message.startswith("Available: ") and "http://chat.team-a.svc:8000" in message


def test_a_spec_the_operator_has_not_seen_is_progressing_even_if_ready(health_check: Any) -> None:
    status = compute(service(MINIMAL, generation=3), Observed(deployment=deployment(2, 2)), None, NOW)
    state, message = health_check(llmservice(status, generation=4))
    assert state == "Progressing"
    assert "generation 4" in message and "status is for 3" in message


def test_oom_killed_is_degraded_with_the_operators_words(health_check: Any) -> None:
    svc = service(
        {**MINIMAL, "resources": {"gpu": {"count": 0}, "memory": {"limit": "512Mi"}, "shmSize": "64Mi"}, "server": {"prefixCacheSize": 0}},
        generation=3,
    )
    oom = pod({"state": {"waiting": {"reason": "CrashLoopBackOff"}}, "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}})
    status = compute(svc, Observed(deployment=deployment(1, 0), pods=(oom,)), None, NOW)
    state, message = health_check(llmservice(status))
    assert state == "Degraded"
    assert message.startswith("OOMKilled: ") and "512Mi" in message


def test_rolling_out_is_progressing_with_the_ready_reason(health_check: Any) -> None:
    status = compute(service(MINIMAL, generation=3), Observed(deployment=deployment(1, 0)), None, NOW)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    state, message = health_check(llmservice(status))
    assert (state, message) == ("Progressing", f"{ready['reason']}: {ready['message']}")
