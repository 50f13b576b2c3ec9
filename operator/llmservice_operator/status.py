"""Pure status: what was observed in, the LLMService status out, in words a user can act on.

Conditions follow the Kubernetes API conventions: `Ready` is True only when every desired replica
runs the current spec; `Progressing` is True while a rollout is under way; `Degraded` carries a
failure the user must fix. `Reconciling` and `Stalled` are kstatus's abnormal-true pair, so Flux
and kstatus-based tools tell "still working" from "will not get there by waiting". Each carries
reason, message, observedGeneration and a lastTransitionTime that only moves when the condition's
status does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from llmservice_operator import naming
from llmservice_operator.render import Capabilities, Manifest
from llmservice_operator.spec import LLMService

IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
CONFIG_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError"})
# A server that failed to load its model this many times will not load it by restarting again.
LOAD_RESTARTS_STALLED = 3
DEFAULT_CAPACITY_GRACE_SECONDS = 900.0
# HPA conditions that are a choice, not a failure: scaled to zero, or autoscaling switched off.
HPA_BENIGN_REASONS = frozenset({"ScalingDisabled"})


@dataclass(frozen=True)
class Observed:
    """Children as the API server returned them."""

    deployment: Manifest | None = None
    pods: tuple[Manifest, ...] = ()
    capabilities: Capabilities = field(default_factory=Capabilities)
    autoscaler: Manifest | None = None


@dataclass(frozen=True)
class Policy:
    """How long a wait is still progress; the operator's settings, passed in."""

    # An unschedulable GPU pod is WaitingForCapacity (a cluster autoscaler may add a node) this
    # long after the scheduler first said so; InsufficientGPU, Stalled, after.
    capacity_grace_seconds: float = DEFAULT_CAPACITY_GRACE_SECONDS


@dataclass(frozen=True)
class Diagnosis:
    reason: str
    message: str
    # Waiting will not fix it: kstatus Stalled=True, Progressing=False.
    stalled: bool = False
    # A wait that is expected to end by itself: Progressing, not Degraded.
    waiting: bool = False
    # For a wait with a deadline: seconds until it turns into a failure.
    recheck_seconds: float | None = None


def compute(
    service: LLMService, observed: Observed, previous: dict[str, Any] | None, now: str, policy: Policy = Policy()
) -> dict[str, Any]:
    """The status the LLMService should show."""
    generation = service.ref.generation
    replicas, ready, rollout_done = _counts(observed.deployment)
    desired = _desired(service, observed.deployment)
    diagnosis = diagnose(service, observed, now, policy)
    url = naming.url(service)
    stalled = _cond("Stalled", False, "AsExpected", "Nothing is stuck.")

    if observed.deployment is None:
        readiness = _cond("Ready", False, "Creating", "The Deployment is being created.")
        progressing = _cond("Progressing", True, "Creating", "Creating the inference server Deployment.")
    elif desired == 0:
        readiness = _cond(
            "Ready",
            False,
            "ScaledToZero",
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
        if diagnosis is not None and diagnosis.stalled:
            progressing = _cond(
                "Progressing", False, diagnosis.reason, f"{ready}/{desired} replicas ready; waiting will not fix this (see Ready)."
            )
            stalled = _cond("Stalled", True, diagnosis.reason, diagnosis.message)
        else:
            progress_reason = diagnosis.reason if diagnosis is not None and diagnosis.waiting else "RollingOut"
            progressing = _cond("Progressing", True, progress_reason, f"{ready}/{desired} replicas ready.")

    degraded = _cond("Degraded", False, "AsExpected", "No failure observed.")
    if diagnosis is not None and not diagnosis.waiting:
        degraded = _cond("Degraded", True, diagnosis.reason, diagnosis.message)
    elif _needs_custom_metrics(service) and not observed.capabilities.custom_metrics:
        degraded = _cond(
            "Degraded",
            True,
            "MetricsAPIMissing",
            "spec.autoscaling targets the server's own metrics, but the custom.metrics.k8s.io API is not "
            "served in this cluster, so the HPA cannot act; install a custom-metrics adapter "
            "(for example prometheus-adapter) or use metric: cpu.",
        )
    elif (inactive := _autoscaling_inactive(observed.autoscaler)) is not None:
        degraded = _cond("Degraded", True, "AutoscalingNotActive", inactive)

    # kstatus: Reconciling while work is under way, never beside Stalled.
    if progressing["status"] == "True":
        reconciling = _cond("Reconciling", True, progressing["reason"], progressing["message"])
    else:
        reconciling = _cond("Reconciling", False, "AsExpected", "Nothing to do until something changes.")

    conditions = [_stamp(c, generation, previous, now) for c in (readiness, progressing, degraded, reconciling, stalled)]
    return {
        "observedGeneration": generation,
        "replicas": replicas,
        "desiredReplicas": desired,
        "readyReplicas": ready,
        "selector": naming.selector_string(service.ref.name),
        "url": url,
        "model": service.spec.served_model_name,
        "conditions": conditions,
    }


def invalid(generation: int, message: str, previous: dict[str, Any] | None, now: str) -> dict[str, Any]:
    """Status for a spec the operator cannot serve: nothing is applied until it is fixed."""
    return blocked(generation, Diagnosis("InvalidSpec", message, stalled=True), previous, now, progress="Waiting for a valid spec.")


def name_conflict(generation: int, message: str, previous: dict[str, Any] | None, now: str) -> dict[str, Any]:
    """Status while a child's name is held by an object that is not ours: nothing is applied."""
    return blocked(generation, Diagnosis("NameConflict", message, stalled=True), previous, now, progress="Waiting for the name to be free.")


def creating(generation: int, message: str, previous: dict[str, Any] | None, now: str) -> dict[str, Any]:
    """Status while a child's name is still held by the children of a deleted LLMService of the same name."""
    status = dict(previous or {})
    status["observedGeneration"] = generation
    conditions = (
        _cond("Ready", False, "Creating", message),
        _cond("Progressing", True, "Creating", message),
        _cond("Degraded", False, "AsExpected", "No failure observed."),
        _cond("Reconciling", True, "Creating", message),
        _cond("Stalled", False, "AsExpected", "Nothing is stuck."),
    )
    status["conditions"] = [_stamp(c, generation, previous, now) for c in conditions]
    return status


def apply_failed(generation: int, message: str, previous: dict[str, Any] | None, now: str) -> dict[str, Any]:
    """Status after the API server refused a write: the operator keeps retrying with backoff."""
    return blocked(generation, Diagnosis("ApplyFailed", message), previous, now, progress="Retrying with backoff.")


def blocked(generation: int, diagnosis: Diagnosis, previous: dict[str, Any] | None, now: str, *, progress: str) -> dict[str, Any]:
    """Status when the children could not be made as rendered; the other fields keep their last value."""
    status = dict(previous or {})
    status["observedGeneration"] = generation
    stuck = diagnosis.stalled
    conditions = (
        _cond("Ready", False, diagnosis.reason, diagnosis.message),
        _cond("Progressing", not stuck, diagnosis.reason, progress),
        _cond("Degraded", True, diagnosis.reason, diagnosis.message),
        _cond("Reconciling", not stuck, diagnosis.reason, progress)
        if not stuck
        else _cond("Reconciling", False, "AsExpected", "Nothing to do until something changes."),
        _cond("Stalled", True, diagnosis.reason, diagnosis.message)
        if stuck
        else _cond("Stalled", False, "AsExpected", "Nothing is stuck."),
    )
    status["conditions"] = [_stamp(c, generation, previous, now) for c in conditions]
    return status


def override(
    state: dict[str, Any],
    kind: str,
    ok: bool,
    reason: str,
    message: str,
    generation: int,
    previous: dict[str, Any] | None,
    now: str,
) -> dict[str, Any]:
    """`state` with its condition `kind` replaced, for checks made outside `compute` (the model cache)."""
    new = _stamp(_cond(kind, ok, reason, message), generation, previous, now)
    return {**state, "conditions": [new if c.get("type") == kind else c for c in state.get("conditions") or []]}


def cache_waiting(
    state: dict[str, Any],
    reason: str,
    message: str,
    *,
    failed: bool,
    serving: bool,
    generation: int,
    previous: dict[str, Any] | None,
    now: str,
) -> dict[str, Any]:
    """`state` while the model cache has no complete revision for the current spec.

    Replicas wait for it unless an older revision still serves. A failed fetch is not retried
    until the spec changes or its Job is deleted, so waiting will not fix it: Stalled.
    """
    changes: list[tuple[str, bool, str, str]] = []
    if not serving:
        changes += [("Ready", False, reason, message), ("Progressing", not failed, reason, message)]
    if failed:
        changes += [
            ("Degraded", True, reason, message),
            ("Stalled", True, reason, message),
            ("Reconciling", False, "AsExpected", "Nothing to do until something changes."),
        ]
    elif not serving:
        changes.append(("Reconciling", True, reason, message))
    for kind, ok, why, words in changes:
        state = override(state, kind, ok, why, words, generation, previous, now)
    return state


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


def recheck_after(service: LLMService, observed: Observed, now: str, policy: Policy = Policy()) -> float | None:
    """Seconds until the status would change with nothing else changing (a wait reaching its deadline)."""
    diagnosis = diagnose(service, observed, now, policy)
    return diagnosis.recheck_seconds if diagnosis is not None else None


def diagnose(service: LLMService, observed: Observed, now: str = "", policy: Policy = Policy()) -> Diagnosis | None:
    """The most actionable failure among the server pods and the Deployment, if any."""
    found: list[tuple[int, Diagnosis]] = []
    for pod in observed.pods:
        found.extend(_pod_failures(service, pod, now, policy))
    deployment = observed.deployment
    if deployment is not None:
        for condition in (deployment.get("status") or {}).get("conditions") or []:
            if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
                # The ReplicaSet could not create a pod: quota, Pod Security admission, a webhook.
                found.append(
                    (
                        5,
                        Diagnosis(
                            "PodCreationFailed",
                            f"Pods cannot be created ({condition.get('reason', 'FailedCreate')}): "
                            f"{str(condition.get('message', '')).strip()}. Fix what the message names (a ResourceQuota, "
                            "the namespace's Pod Security level, an admission webhook) or the spec field it points at.",
                        ),
                    )
                )
            if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
                found.append((9, Diagnosis("ProgressDeadlineExceeded", str(condition.get("message", "")), stalled=True)))
    return min(found, key=lambda item: item[0])[1] if found else None


def _pod_failures(service: LLMService, pod: Manifest, now: str, policy: Policy) -> list[tuple[int, Diagnosis]]:
    name = pod.get("metadata", {}).get("name", "?")
    status = pod.get("status") or {}
    failures: list[tuple[int, Diagnosis]] = []
    for container in status.get("containerStatuses") or []:
        state, last = container.get("state") or {}, container.get("lastState") or {}
        # A past termination explains nothing about a container that is ready now: a recovered
        # container's old OOMKilled must not be reported again on every rollout.
        past = {} if container.get("ready") else last.get("terminated") or {}
        terminated = state.get("terminated") or past
        waiting = state.get("waiting") or {}
        restarts = int(container.get("restartCount") or 0)
        if terminated.get("reason") == "OOMKilled":
            failures.append((0, _oom(service, name)))
        elif terminated.get("message") and terminated.get("exitCode") not in (None, 0):
            # The server writes why it gave up to /dev/termination-log before exiting non-zero.
            failures.append(
                (
                    1,
                    Diagnosis(
                        "ModelLoadFailed",
                        f"Pod {name}: the server exited with code {terminated.get('exitCode')} ({restarts} restarts): "
                        f"{str(terminated['message']).strip()[-600:]}. Fix spec.model (source, dtype, revision) or "
                        "spec.resources as the message says.",
                        stalled=restarts >= LOAD_RESTARTS_STALLED,
                    ),
                )
            )
        elif waiting.get("reason") in IMAGE_PULL_REASONS:
            failures.append(
                (
                    2,
                    Diagnosis(
                        "ImagePullFailed",
                        f"Pod {name} cannot pull image {container.get('image')}: {waiting.get('message', waiting['reason'])}. "
                        "Check spec.server.image and spec.server.imagePullSecrets.",
                    ),
                )
            )
        elif waiting.get("reason") in CONFIG_REASONS:
            failures.append(
                (
                    3,
                    Diagnosis(
                        "ContainerConfigError",
                        f"Pod {name} cannot start its container: {waiting.get('message', waiting['reason'])}.",
                    ),
                )
            )
        elif waiting.get("reason") == "CrashLoopBackOff":
            detail = terminated.get("message") or f"exit code {terminated.get('exitCode', '?')}"
            failures.append(
                (
                    4,
                    Diagnosis(
                        "CrashLoop",
                        f"Pod {name} keeps crashing ({restarts} restarts); last termination: {str(detail).strip()[-400:]}",
                    ),
                )
            )
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False" and condition.get("reason") == "Unschedulable":
            since = str(condition.get("lastTransitionTime") or now)
            failures.append((6, _unschedulable(service, name, str(condition.get("message", "")), since, now, policy)))
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


def _unschedulable(service: LLMService, pod: str, message: str, since: str, now: str, policy: Policy) -> Diagnosis:
    gpu = service.spec.resources.gpu
    if gpu.count and f"Insufficient {gpu.resource_name}" in message:
        waited = _seconds_between(since, now)
        left = policy.capacity_grace_seconds - waited
        if left > 0:
            return Diagnosis(
                "WaitingForCapacity",
                f"Pod {pod} waits for a node with {gpu.count} free {gpu.resource_name} ({message.strip()}); "
                f"a cluster autoscaler may add one. Reported as InsufficientGPU if none comes within "
                f"{policy.capacity_grace_seconds:.0f} s of the first attempt.",
                waiting=True,
                recheck_seconds=left,
            )
        return Diagnosis(
            "InsufficientGPU",
            f"Pod {pod} is unschedulable: no node has {gpu.count} free {gpu.resource_name} "
            f"({message.strip()}), and none was added for {waited:.0f} s. Add a GPU node (or a cluster "
            "autoscaler node group that provides one), or lower spec.resources.gpu.count.",
            stalled=True,
        )
    return Diagnosis("Unschedulable", f"Pod {pod} is unschedulable: {message.strip()}")


def _autoscaling_inactive(autoscaler: Manifest | None) -> str | None:
    """The HPA's own words when it cannot act: ScalingActive=False (no metric) or AbleToScale=False."""
    if autoscaler is None:
        return None
    for condition in (autoscaler.get("status") or {}).get("conditions") or []:
        if (
            condition.get("type") in ("ScalingActive", "AbleToScale")
            and condition.get("status") == "False"
            and condition.get("reason") not in HPA_BENIGN_REASONS
        ):
            name = (autoscaler.get("metadata") or {}).get("name", "?")
            return (
                f"HorizontalPodAutoscaler {name} reports {condition['type']}=False "
                f"({condition.get('reason', '')}): {str(condition.get('message', '')).strip()}. "
                "Until it can read its metric and scale, the replica count stays where it is."
            )
    return None


def _seconds_between(earlier: str, later: str) -> float:
    try:
        return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()
    except ValueError:
        return 0.0


def _cond(kind: str, status: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message}


def _stamp(condition: dict[str, Any], generation: int, previous: dict[str, Any] | None, now: str) -> dict[str, Any]:
    earlier = {c.get("type"): c for c in (previous or {}).get("conditions") or []}
    before = earlier.get(condition["type"])
    changed = before is None or before.get("status") != condition["status"]
    since = now if changed or not before else before.get("lastTransitionTime", now)
    return {**condition, "observedGeneration": generation, "lastTransitionTime": since}
