"""Every status reason as Argo CD (the shipped Lua), kstatus and Flux read it, checked against docs/status.md.

For each row of the table in docs/status.md the test builds the status the operator computes for
that reason, runs the Argo CD health check in a real Lua runtime and the kstatus rules on it, and
compares with what the row says. A new reason without a row, or a row no status produces, fails.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llmservice_operator.render import Capabilities
from llmservice_operator.status import Observed, apply_failed, cache_waiting, compute, invalid, name_conflict
from tests.operator.specs import MINIMAL, body, service
from tests.operator.test_status import NOW, deployment, pod

STATUS_DOC = Path(__file__).resolve().parents[2] / "docs" / "status.md"
GENERATION = 3
LONG_AGO = "2026-11-29T08:00:00Z"
GPU8: dict[str, Any] = {"model": {"source": {"bundled": {}}}, "resources": {"gpu": {"count": 8}}}
FLUX = {"Current": "Ready", "InProgress": "waits", "Failed": "fails"}


def kstatus(obj: dict[str, Any]) -> str:
    """kstatus's rules for a custom resource without type-specific rules (cli-utils pkg/kstatus, generic checks)."""
    if obj["metadata"].get("deletionTimestamp"):
        return "Terminating"
    status = obj.get("status") or {}
    if status.get("observedGeneration", obj["metadata"]["generation"]) != obj["metadata"]["generation"]:
        return "InProgress"
    for condition in status.get("conditions") or []:
        if condition["type"] == "Reconciling" and condition["status"] == "True":
            return "InProgress"
        if condition["type"] == "Stalled" and condition["status"] == "True":
            return "Failed"
    return "Current"


def _computed(
    spec: dict[str, Any],
    *,
    pods: tuple[dict[str, Any], ...] = (),
    ready: int = 0,
    replicas: int = 1,
    capabilities: Capabilities | None = None,
    autoscaler: dict[str, Any] | None = None,
    conditions: list[dict[str, Any]] | None = None,
    rollout: bool = True,
) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        observed = Observed(
            deployment=deployment(replicas, ready, conditions=conditions) if rollout else None,
            pods=pods,
            capabilities=capabilities or Capabilities(),
            autoscaler=autoscaler,
        )
        return compute(service(spec, generation=GENERATION), observed, None, NOW)

    return build


def _unschedulable(message: str, since: str = NOW) -> dict[str, Any]:
    return pod(scheduled={"status": "False", "reason": "Unschedulable", "message": message, "lastTransitionTime": since})


def _load_failure(restarts: int) -> dict[str, Any]:
    return pod(
        {
            "restartCount": restarts,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "message": "OSError: no model at /models/x"}},
        }
    )


def _cache(reason: str, *, failed: bool) -> dict[str, Any]:
    held = _computed({**MINIMAL, "replicas": 0}, replicas=0)()  # replicas wait at zero for the cache
    return cache_waiting(
        held, reason, "the model cache says why", failed=failed, serving=False, generation=GENERATION, previous=None, now=NOW
    )


NO_GPU = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
HPA_BLIND = {
    "metadata": {"name": "chat"},
    "status": {"conditions": [{"type": "ScalingActive", "status": "False", "reason": "FailedGetResourceMetric", "message": "no metrics"}]},
}

SCENARIOS: dict[str, Callable[[], dict[str, Any]]] = {
    "Available": _computed(MINIMAL, ready=1),
    "Creating": _computed(MINIMAL, rollout=False),
    "RollingOut": _computed(MINIMAL),
    "ScaledToZero": _computed({**MINIMAL, "replicas": 0}, replicas=0),
    "WaitingForCapacity": _computed(GPU8, pods=(_unschedulable(NO_GPU),)),
    "Unschedulable": _computed(MINIMAL, pods=(_unschedulable("0/2 nodes are available: 2 node(s) had untolerated taint."),)),
    "InsufficientGPU": _computed(GPU8, pods=(_unschedulable(NO_GPU, LONG_AGO),)),
    "OOMKilled": _computed(
        MINIMAL,
        pods=(
            pod(
                {
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}},
                }
            ),
        ),
    ),
    "ModelLoadFailed, under 3 restarts": _computed(MINIMAL, pods=(_load_failure(2),)),
    "ModelLoadFailed, 3 restarts or more": _computed(MINIMAL, pods=(_load_failure(3),)),
    "ImagePullFailed": _computed(MINIMAL, pods=(pod({"state": {"waiting": {"reason": "ImagePullBackOff"}}}),)),
    "ContainerConfigError": _computed(
        MINIMAL, pods=(pod({"state": {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "keys" not found'}}}),)
    ),
    "CrashLoop": _computed(
        MINIMAL, pods=(pod({"state": {"waiting": {"reason": "CrashLoopBackOff"}}, "lastState": {"terminated": {"exitCode": 139}}}),)
    ),
    "PodCreationFailed": _computed(
        MINIMAL, conditions=[{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": "exceeded quota"}]
    ),
    "ProgressDeadlineExceeded": _computed(
        MINIMAL, conditions=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "timed out"}]
    ),
    "InvalidSpec": lambda: invalid(GENERATION, "minReplicas above maxReplicas", None, NOW),
    "NameConflict": lambda: name_conflict(GENERATION, "Service team-a/chat already exists", None, NOW),
    "ApplyFailed": lambda: apply_failed(GENERATION, "Applying Deployment team-a/chat failed (HTTP 403)", None, NOW),
    "MetricsAPIMissing (while serving)": _computed({**MINIMAL, "autoscaling": {"maxReplicas": 3}}, ready=1),
    "AutoscalingNotActive (while serving)": _computed(
        {**MINIMAL, "autoscaling": {"maxReplicas": 3, "metric": "cpu"}},
        ready=1,
        capabilities=Capabilities(custom_metrics=True),
        autoscaler=HPA_BLIND,
    ),
    "CacheFetching": lambda: _cache("CacheFetching", failed=False),
    "CacheFailed": lambda: _cache("CacheFailed", failed=True),
}


def documented_rows() -> dict[str, tuple[str, str, str]]:
    """The table under "What Argo CD, kstatus and Flux show": reason cell -> (kstatus, Flux, Argo CD)."""
    text = STATUS_DOC.read_text()
    section = text[text.index("## What Argo CD, kstatus and Flux show") :]
    rows: dict[str, tuple[str, str, str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].replace("`", "")] = (cells[1], cells[2], cells[3])
    return rows


def _reason(row: str) -> str:
    """The reason a row is about: its first word ("ModelLoadFailed, under 3 restarts" -> ModelLoadFailed)."""
    return re.match(r"\w+", row).group(0)  # type: ignore[union-attr]  # every row starts with a reason


def documented_reasons() -> set[str]:
    """Every reason in the Reasons table of docs/status.md."""
    text = STATUS_DOC.read_text()
    section = text[text.index("## Reasons") : text.index("## What Argo CD, kstatus and Flux show")]
    return set(re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE))


def test_the_table_has_a_row_for_every_reason_and_a_status_for_every_row() -> None:
    rows = documented_rows()
    assert set(rows) == set(SCENARIOS)
    named = {_reason(row) for row in rows}
    assert named == documented_reasons() - {"Complete", "AsExpected"}


@pytest.mark.parametrize("row", sorted(SCENARIOS))
def test_each_reason_reads_as_documented(row: str, health_check: Any) -> None:
    status = SCENARIOS[row]()
    reason = _reason(row)
    reported = {c["type"]: c for c in status["conditions"]}
    assert reason in (reported["Ready"]["reason"], reported["Degraded"]["reason"]), reported
    obj = {**body(MINIMAL, generation=GENERATION), "status": status}
    want_kstatus, want_flux, want_argo = documented_rows()[row]
    assert kstatus(obj) == want_kstatus
    assert FLUX[kstatus(obj)] == want_flux
    assert health_check(obj)[0] == want_argo
    # kstatus's pair is never both True: Failed would hide behind InProgress in list order.
    assert not (reported["Reconciling"]["status"] == "True" and reported["Stalled"]["status"] == "True")


def test_a_status_for_an_older_generation_is_in_progress_whatever_it_says() -> None:
    obj = {**body(MINIMAL, generation=GENERATION + 1), "status": SCENARIOS["NameConflict"]()}
    assert kstatus(obj) == "InProgress"
