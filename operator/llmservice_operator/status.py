"""Pure status: what was observed in, the LLMService status out, in words a user can act on.

Conditions follow the Kubernetes API conventions: `Ready` is True only when every desired replica
runs the current spec; `Progressing` is True while a rollout is under way; `Degraded` carries a
failure the user must fix. Each carries reason, message, observedGeneration and a
lastTransitionTime that only moves when the condition's status does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmservice_operator import naming
from llmservice_operator.render import Capabilities, Manifest
from llmservice_operator.spec import LLMService

IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
CONFIG_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError"})


@dataclass(frozen=True)
class Observed:
    """Children as the API server returned them."""

    deployment: Manifest | None = None
    pods: tuple[Manifest, ...] = ()
    capabilities: Capabilities = field(default_factory=Capabilities)


@dataclass(frozen=True)
class Diagnosis:
    reason: str
    message: str


def compute(service: LLMService, observed: Observed, previous: dict[str, Any] | None, now: str) -> dict[str, Any]:
    """The status the LLMService should show."""
    generation = service.ref.generation
    replicas, ready, rollout_done = _counts(observed.deployment)
    desired = _desired(service, observed.deployment)
    diagnosis = diagnose(service, observed)
    url = naming.url(service)

    if observed.deployment is None:
        readiness = _cond("Ready", False, "Creating", "The Deployment is being created.")
        progressing = _cond("Progressing", True, "Creating", "Creating the inference server Deployment.")
    elif desired == 0:
        readiness = _cond(
            "Ready", False, "ScaledToZero",
            f"spec.replicas is 0, so no server runs; scale up with "
            f"`kubectl scale llmsvc {service.ref.name} -n {service.ref.namespace} --replicas=1`.",
        )
        progressing = _cond("Progressing", False, "Complete", "Scaled to zero.")
    elif rollout_done and ready >= desired:
        readiness = _cond("Ready", True, "Available", f"{ready}/{desired} replicas ready, serving at {url}.")
        progressing = _cond("Progressing", False, "Complete", "The latest spec is rolled out.")
    else:
        reason, message = ("RollingOut", f"{ready}/{desired} replicas ready; the rollout is in progress.")
        if diagnosis is not None:
            reason, message = diagnosis.reason, diagnosis.message
        readiness = _cond("Ready", False, reason, message)
        progressing = _cond("Progressing", True, "RollingOut", f"{ready}/{desired} replicas ready.")

    degraded = _cond("Degraded", False, "AsExpected", "No failure observed.")
    if diagnosis is not None:
        degraded = _cond("Degraded", True, diagnosis.reason, diagnosis.message)
    elif _needs_custom_metrics(service) and not observed.capabilities.custom_metrics:
        degraded = _cond(
            "Degraded", True, "MetricsAPIMissing",
            "spec.autoscaling targets the server's own metrics, but the custom.metrics.k8s.io API is not "
            "served in this cluster, so the HPA cannot act; install a custom-metrics adapter "
            "(for example prometheus-adapter) or use metric: cpu.",
        )

    conditions = [_stamp(c, generation, previous, now) for c in (readiness, progressing, degraded)]
    return {
        "observedGeneration": generation,
        "replicas": replicas,
        "readyReplicas": ready,
        "selector": naming.selector_string(service.ref.name),
        "url": url,
        "model": service.spec.served_model_name,
        "conditions": conditions,
    }


def invalid(generation: int, message: str, previous: dict[str, Any] | None, now: str) -> dict[str, Any]:
    """Status for a spec the operator cannot serve: nothing is applied until it is fixed."""
    status = dict(previous or {})
    status["observedGeneration"] = generation
    status["conditions"] = [
        _stamp(_cond("Ready", False, "InvalidSpec", message), generation, previous, now),
        _stamp(_cond("Progressing", False, "InvalidSpec", "Waiting for a valid spec."), generation, previous, now),
        _stamp(_cond("Degraded", True, "InvalidSpec", message), generation, previous, now),
    ]
    return status


def override(
    state: dict[str, Any], kind: str, ok: bool, reason: str, message: str, generation: int,
    previous: dict[str, Any] | None, now: str,
) -> dict[str, Any]:
    """`state` with its condition `kind` replaced, for checks made outside `compute` (the model cache)."""
    new = _stamp(_cond(kind, ok, reason, message), generation, previous, now)
    return {**state, "conditions": [new if c.get("type") == kind else c for c in state.get("conditions") or []]}


def _counts(deployment: Manifest | None) -> tuple[int, int, bool]:
    if deployment is None:
        return 0, 0, False
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    wanted = int(spec.get("replicas", 1))
    current = int(status.get("observedGeneration", 0)) >= int(deployment["metadata"].get("generation", 0))
    updated = int(status.get("updatedReplicas", 0))
    total = int(status.get("replicas", 0))
    ready = int(status.get("readyReplicas", 0))
    available = int(status.get("availableReplicas", 0))
    done = current and updated == wanted and total == wanted and available >= wanted
    return total, ready, done


def _desired(service: LLMService, deployment: Manifest | None) -> int:
    # Under an HPA the Deployment's replicas are the autoscaler's choice, not the spec's.
    if deployment is not None and "replicas" in (deployment.get("spec") or {}):
        return int(deployment["spec"]["replicas"])
    return service.spec.desired_replicas if service.spec.desired_replicas is not None else 1


def _needs_custom_metrics(service: LLMService) -> bool:
    autoscaling = service.spec.autoscaling
    return autoscaling is not None and autoscaling.metric != "cpu"


def diagnose(service: LLMService, observed: Observed) -> Diagnosis | None:
    """The most actionable failure among the server pods, if any."""
    found: list[tuple[int, Diagnosis]] = []
    for pod in observed.pods:
        found.extend(_pod_failures(service, pod))
    deployment = observed.deployment
    if deployment is not None:
        for condition in (deployment.get("status") or {}).get("conditions") or []:
            if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
                found.append((9, Diagnosis("ProgressDeadlineExceeded", str(condition.get("message", "")))))
    return min(found, key=lambda item: item[0])[1] if found else None


def _pod_failures(service: LLMService, pod: Manifest) -> list[tuple[int, Diagnosis]]:
    name = pod.get("metadata", {}).get("name", "?")
    status = pod.get("status") or {}
    failures: list[tuple[int, Diagnosis]] = []
    for container in status.get("containerStatuses") or []:
        state, last = container.get("state") or {}, container.get("lastState") or {}
        terminated = state.get("terminated") or last.get("terminated") or {}
        waiting = state.get("waiting") or {}
        if terminated.get("reason") == "OOMKilled":
            failures.append((0, _oom(service, name)))
        elif waiting.get("reason") in IMAGE_PULL_REASONS:
            failures.append((1, Diagnosis(
                "ImagePullFailed",
                f"Pod {name} cannot pull image {container.get('image')}: {waiting.get('message', waiting['reason'])}. "
                "Check spec.server.image and spec.server.imagePullSecrets.",
            )))
        elif waiting.get("reason") in CONFIG_REASONS:
            failures.append((2, Diagnosis(
                "ContainerConfigError",
                f"Pod {name} cannot start its container: {waiting.get('message', waiting['reason'])}.",
            )))
        elif waiting.get("reason") == "CrashLoopBackOff":
            detail = terminated.get("message") or f"exit code {terminated.get('exitCode', '?')}"
            failures.append((3, Diagnosis(
                "CrashLoop",
                f"Pod {name} keeps crashing ({container.get('restartCount', 0)} restarts); "
                f"last termination: {str(detail).strip()[-400:]}",
            )))
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False" \
                and condition.get("reason") == "Unschedulable":
            failures.append((4, _unschedulable(service, name, str(condition.get("message", "")))))
    return failures


def _oom(service: LLMService, pod: str) -> Diagnosis:
    limit = service.spec.resources.memory_limit
    return Diagnosis(
        "OOMKilled",
        f"Pod {pod} was OOMKilled at its memory limit of {limit}. Loading a model needs about its weights "
        f"(parameters x bytes per {service.spec.model.dtype} weight) plus the KV cache for "
        f"{service.spec.server.max_num_seqs} sequences in host memory; raise spec.resources.memory.limit "
        "or lower spec.server.maxNumSeqs.",
    )


def _unschedulable(service: LLMService, pod: str, message: str) -> Diagnosis:
    gpu = service.spec.resources.gpu
    if gpu.count and f"Insufficient {gpu.resource_name}" in message:
        return Diagnosis(
            "InsufficientGPU",
            f"Pod {pod} is unschedulable: no node has {gpu.count} free {gpu.resource_name} "
            f"({message.strip()}). A cluster autoscaler with a matching GPU node group will add one; "
            "otherwise lower spec.resources.gpu.count.",
        )
    return Diagnosis("Unschedulable", f"Pod {pod} is unschedulable: {message.strip()}")


def _cond(kind: str, status: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message}


def _stamp(condition: dict[str, Any], generation: int, previous: dict[str, Any] | None, now: str) -> dict[str, Any]:
    earlier = {c.get("type"): c for c in (previous or {}).get("conditions") or []}
    before = earlier.get(condition["type"])
    changed = before is None or before.get("status") != condition["status"]
    since = now if changed or not before else before.get("lastTransitionTime", now)
    return {**condition, "observedGeneration": generation, "lastTransitionTime": since}
