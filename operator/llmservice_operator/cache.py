"""The model cache (spec.model.cache): its volume, the Job that fills it, and what they say.

Pure: manifests and observed objects in, manifests and status out. The Job runs the server
image's `llmservice-fetch` once per revision; the volume keeps each revision in a directory of
its own (the layout of `llmservice_server.model_cache`, which a test keeps in step with
`model_dir` here), so a new revision is fetched beside the one being served.

Replicas wait by being held at zero, not by an init container that polls for the marker: a
waiting pod would hold its GPU (and make a cluster autoscaler add GPU nodes) for the whole
download, and a failed fetch would leave pods stuck in Init instead of one Job with a reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from llmservice_operator import naming
from llmservice_operator.podsecurity import restricted_container
from llmservice_operator.spec import LLMService

Manifest = dict[str, Any]
Phase = Literal["Pending", "Fetching", "Ready", "Failed"]

FETCH_APP = "llmservice-fetch"
FETCH_CONTAINER = "fetch"
REVISION_ANNOTATION = "llmservice.io/model-revision"
DEFAULT_REVISION = "main"
JOB_CACHE_MOUNT = "/cache"
# Failures a retry cannot fix (401/403, gated, 404, disk full) exit with this code and fail the
# Job at once; anything else (the network, a corrupt download) is retried up to the backoff limit.
PERMANENT_EXIT = 2
FETCH_BACKOFF_LIMIT = 6
RUN_AS = 10001


def pvc_name(name: str) -> str:
    return f"{name}-model"


def job_name(name: str) -> str:
    return f"{name}-fetch"


def revision(service: LLMService) -> str:
    source = service.spec.model.source.hugging_face
    return (source.revision if source is not None else None) or DEFAULT_REVISION


def model_dir(mount: str, repo: str, rev: str) -> str:
    """The directory of one revision on the volume: `<mount>/<owner>--<name>/<revision>`."""
    return f"{mount}/{repo.replace('/', '--')}/{rev.replace('/', '--')}"


def fetch_labels(name: str) -> dict[str, str]:
    # Our managed-by and name labels, so the watches and the store see the Job and its pods; not
    # the server's selector labels, so the Service and the PDB never count the fetch pod.
    return {
        "app.kubernetes.io/name": FETCH_APP,
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "model-fetch",
        "app.kubernetes.io/part-of": "llmservice",
        naming.MANAGED_BY_LABEL: naming.MANAGED_BY,
        naming.NAME_LABEL: name,
    }


def _metadata(service: LLMService, name: str, labels: dict[str, str], annotations: dict[str, str] | None = None) -> Manifest:
    metadata: Manifest = {
        "name": name,
        "namespace": service.ref.namespace,
        "labels": labels,
        "ownerReferences": [naming.owner_reference(service)],
    }
    if annotations:
        metadata["annotations"] = annotations
    return metadata


def persistent_volume_claim(service: LLMService) -> Manifest:
    cache = service.spec.model.cache
    assert cache is not None
    spec: Manifest = {"accessModes": [cache.access_mode], "resources": {"requests": {"storage": cache.size}}}
    if cache.storage_class_name:
        spec["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(service, pvc_name(service.ref.name), fetch_labels(service.ref.name)),
        "spec": spec,
    }


def fetch_job(service: LLMService, image: str) -> Manifest:
    spec = service.spec
    source = spec.model.source.hugging_face
    assert source is not None and spec.model.cache is not None
    rev = revision(service)
    env: dict[str, Manifest] = {"HF_HOME": {"name": "HF_HOME", "value": "/tmp/huggingface"}}  # noqa: S108 - an emptyDir
    if spec.model.token_secret_ref is not None:
        ref = spec.model.token_secret_ref
        env["HF_TOKEN"] = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
    for extra in spec.server.env:  # HF_ENDPOINT, proxies: the fetch reaches the Hub the way the server would
        env[str(extra["name"])] = dict(extra)
    container: Manifest = {
        "name": FETCH_CONTAINER,
        "image": spec.server.image or image,
        "imagePullPolicy": spec.server.image_pull_policy,
        "command": ["llmservice-fetch"],
        "args": ["--repo", source.repo, "--revision", rev, "--cache-dir", JOB_CACHE_MOUNT],
        "env": list(env.values()),
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [
            {"name": "cache", "mountPath": JOB_CACHE_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a writable /tmp under a read-only root
        ],
        "securityContext": restricted_container(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod: Manifest = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "cache", "persistentVolumeClaim": {"claimName": pvc_name(service.ref.name)}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if spec.server.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s.name} for s in spec.server.image_pull_secrets]
    labels = fetch_labels(service.ref.name)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(service, job_name(service.ref.name), labels, {REVISION_ANNOTATION: rev}),
        "spec": {
            "backoffLimit": FETCH_BACKOFF_LIMIT,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": FETCH_CONTAINER, "operator": "In", "values": [PERMANENT_EXIT]},
                    }
                ]
            },
            "template": {"metadata": {"labels": labels, "annotations": {REVISION_ANNOTATION: rev}}, "spec": pod},
        },
    }


@dataclass(frozen=True)
class CacheState:
    """What the fetch Job of the current revision says."""

    phase: Phase
    revision: str
    message: str
    commit: str | None = None
    bytes: int | None = None
    files: int | None = None

    def to_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"phase": self.phase, "revision": self.revision, "message": self.message}
        if self.commit:
            status["commit"] = self.commit
        if self.bytes is not None:
            status["bytes"] = self.bytes
        if self.files is not None:
            status["files"] = self.files
        return status


def observe(service: LLMService, job: Manifest | None, pods: list[Manifest]) -> CacheState:
    """The cache's phase from its Job (for the current revision only) and the result its pods reported."""
    rev = revision(service)
    if job is None or (job["metadata"].get("annotations") or {}).get(REVISION_ANNOTATION) != rev:
        return CacheState("Pending", rev, f"Creating the Job {job_name(service.ref.name)} to fetch revision {rev}.")
    uid = job["metadata"].get("uid")
    ours = [p for p in pods if any(ref.get("uid") == uid for ref in p["metadata"].get("ownerReferences") or [])]
    result = _latest_result(ours)
    conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}
    counts = _counts(result)
    if "Complete" in conditions or "SuccessCriteriaMet" in conditions:
        message = str(result.get("message")) if result and result.get("ok") else f"Revision {rev} is on the volume."
        return CacheState("Ready", rev, message, _commit(result), *counts)
    if "Failed" in conditions or "FailureTarget" in conditions:
        if result and not result.get("ok"):
            message = f"{result.get('reason')}: {result.get('message')}"
        else:
            message = f"The fetch Job failed: {conditions.get('Failed', conditions.get('FailureTarget', {})).get('message', '')}".strip()
        return CacheState("Failed", rev, message, None, *counts)
    if any((p.get("status") or {}).get("phase") == "Running" for p in ours):
        return CacheState("Fetching", rev, f"Downloading {_repo(service)}@{rev} into {pvc_name(service.ref.name)}.")
    if result and not result.get("ok"):  # a retryable failure: the Job runs another pod
        return CacheState("Fetching", rev, f"Retrying after {result.get('reason')}: {result.get('message')}", None, *counts)
    return CacheState("Pending", rev, _pending_message(service, ours))


def _repo(service: LLMService) -> str:
    source = service.spec.model.source.hugging_face
    return source.repo if source is not None else ""


def _pending_message(service: LLMService, pods: list[Manifest]) -> str:
    for pod in pods:
        for condition in (pod.get("status") or {}).get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                return (
                    f"The fetch pod {pod['metadata']['name']} is not scheduled: {condition.get('message', '').strip()} "
                    f"(is the volume {pvc_name(service.ref.name)} bound? check its storage class)"
                )
    return f"Waiting for the fetch Job's pod to start (volume {pvc_name(service.ref.name)})."


def _latest_result(pods: list[Manifest]) -> dict[str, Any] | None:
    """The JSON result of the most recently finished fetch container, from its termination message."""
    latest: tuple[str, dict[str, Any]] | None = None
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or {}
            if status.get("name") != FETCH_CONTAINER or not terminated.get("message"):
                continue
            try:
                result = json.loads(terminated["message"])
            except ValueError:
                continue
            if isinstance(result, dict) and (latest is None or str(terminated.get("finishedAt", "")) >= latest[0]):
                latest = (str(terminated.get("finishedAt", "")), result)
    return latest[1] if latest else None


def _counts(result: dict[str, Any] | None) -> tuple[int | None, int | None]:
    if not result:
        return None, None
    return _int(result.get("bytes")), _int(result.get("files"))


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _commit(result: dict[str, Any] | None) -> str | None:
    commit = (result or {}).get("commit")
    return str(commit) if commit else None


def serving_revision(service: LLMService, state: CacheState, deployment: Manifest | None) -> str | None:
    """The revision the replicas load: the current one once cached, else the one they already serve.

    None holds the replicas at zero: nothing complete to load yet. The Deployment's pod template
    carries the revision it serves, set only ever to a revision whose fetch completed.
    """
    if service.spec.model.cache is None:
        return None
    if state.phase == "Ready":
        return state.revision
    template = ((deployment or {}).get("spec") or {}).get("template") or {}
    served = (template.get("metadata") or {}).get("annotations", {}).get(REVISION_ANNOTATION)
    return str(served) if served else None


def readiness(state: CacheState, serving: str | None) -> tuple[str, str, bool] | None:
    """(reason, message, degraded) for the Ready condition while the cache is not Ready, or None.

    While an older revision keeps serving, the service is Ready; the cache's state is in
    status.cache and, for a failure, in Degraded.
    """
    if state.phase == "Ready":
        return None
    if state.phase == "Failed":
        return "CacheFailed", f"The model cache could not be filled: {state.message}", True
    if serving is not None:
        return None
    return "CacheFetching", f"Replicas wait for the model cache: {state.message}", False
