"""Pure rendering: one parsed LLMService in, the children it should have out.

No client, no clock, no environment: everything that varies comes in as an argument, so the same
spec always renders the same objects, and tests can check them without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmservice_operator import cache, naming
from llmservice_operator.podsecurity import restricted_container
from llmservice_operator.spec import LLMService, LLMServiceSpec, quantity_value

Manifest = dict[str, Any]

MODEL_MOUNT = "/models"
CACHE_MOUNT = "/cache"
API_KEY_MOUNT = "/etc/llmservice/api-key"
PRESTOP_SECONDS = 5
# Time the kubelet allows beyond the drain for the process to exit after in-flight work ends.
EXIT_MARGIN_SECONDS = 10
# Startup budget: a large model can take many minutes to download and load.
STARTUP_PERIOD_SECONDS = 10
STARTUP_FAILURE_THRESHOLD = 180
GPU_TOLERATION_KEY = "nvidia.com/gpu"
DEFAULT_GPU_TYPE_LABEL = "nvidia.com/gpu.product"  # GPU feature discovery / the NVIDIA GPU Operator
SERVER_UID = 10001

# The custom metric each autoscaling mode targets, as the server exports it (vLLM names).
AUTOSCALING_METRICS = {
    "requestsWaiting": "vllm:num_requests_waiting",
    "requestsRunning": "vllm:num_requests_running",
}


@dataclass(frozen=True)
class Capabilities:
    """What the cluster offers, discovered by the adapter and passed in."""

    service_monitor: bool = False
    pod_monitor: bool = False
    custom_metrics: bool = False


@dataclass(frozen=True)
class RenderContext:
    default_image: str
    capabilities: Capabilities = field(default_factory=Capabilities)
    # The node label carrying the GPU type where spec.resources.gpu.typeLabel is unset.
    gpu_type_label: str = DEFAULT_GPU_TYPE_LABEL
    # Labels on every ServiceMonitor/PodMonitor, under spec.monitoring.labels (a Prometheus selector's).
    monitor_labels: tuple[tuple[str, str], ...] = ()
    # With spec.model.cache: the revision complete on the volume that replicas load
    # (cache.serving_revision); None holds them at zero until one is.
    model_revision: str | None = None


def held_for_cache(service: LLMService, context: RenderContext) -> bool:
    """Replicas wait at zero: the model cache has no complete revision to load yet."""
    return service.spec.model.cache is not None and context.model_revision is None


def render(service: LLMService, context: RenderContext) -> list[Manifest]:
    """Every child the LLMService should have, in apply order."""
    children = []
    if service.spec.model.cache is not None:
        children += [cache.persistent_volume_claim(service), cache.fetch_job(service, context.default_image)]
    children += [deployment(service, context), kubernetes_service(service)]
    if service.spec.autoscaling is not None and not held_for_cache(service, context):
        # An HPA does not scale a Deployment held at zero (it reads 0 as "scaling disabled").
        children.append(horizontal_pod_autoscaler(service))
    if _max_replicas(service.spec) > 1:
        children.append(pod_disruption_budget(service))
    mode = monitoring_mode(service.spec, context.capabilities)
    if mode == "serviceMonitor":
        children.append(service_monitor(service, context))
    elif mode == "podMonitor":
        children.append(pod_monitor(service, context))
    return children


def monitoring_mode(spec: LLMServiceSpec, capabilities: Capabilities) -> str:
    """The effective scrape mode: `auto` picks a ServiceMonitor when its CRD is installed."""
    if spec.monitoring.mode == "auto":
        return "serviceMonitor" if capabilities.service_monitor else "annotations"
    return spec.monitoring.mode


def _max_replicas(spec: LLMServiceSpec) -> int:
    if spec.autoscaling is not None:
        return spec.autoscaling.max_replicas
    return spec.desired_replicas or 0


def _metadata(service: LLMService, name: str | None = None, annotations: dict[str, str] | None = None) -> Manifest:
    metadata: Manifest = {
        "name": name or service.ref.name,
        "namespace": service.ref.namespace,
        "labels": naming.labels(service.ref.name),
        "ownerReferences": [naming.owner_reference(service)],
    }
    if annotations:
        metadata["annotations"] = dict(sorted(annotations.items()))
    return metadata


def deployment(service: LLMService, context: RenderContext) -> Manifest:
    spec = service.spec
    gpus = spec.resources.gpu.count
    pod_annotations = {}
    if monitoring_mode(spec, context.capabilities) == "annotations":
        pod_annotations = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(naming.SERVER_PORT),
            "prometheus.io/path": "/metrics",
        }
    if spec.model.cache is not None and context.model_revision is not None:
        pod_annotations[cache.REVISION_ANNOTATION] = context.model_revision
    deployment_spec: Manifest = {
        "selector": {"matchLabels": naming.selector_labels(service.ref.name)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": _rolling_update(spec)},
        "template": {
            "metadata": {"labels": naming.labels(service.ref.name), **({"annotations": pod_annotations} if pod_annotations else {})},
            "spec": _pod_spec(service, context),
        },
    }
    if held_for_cache(service, context):
        deployment_spec = {"replicas": 0, **deployment_spec}
    elif spec.desired_replicas is not None:
        # Left out under an HPA: applying it would fight the autoscaler on every reconcile.
        deployment_spec = {"replicas": spec.desired_replicas, **deployment_spec}
    if gpus:
        # A model load can outlast the default 10 minutes; give the rollout time to report progress.
        deployment_spec["progressDeadlineSeconds"] = STARTUP_PERIOD_SECONDS * STARTUP_FAILURE_THRESHOLD + 60
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _metadata(service), "spec": deployment_spec}


def _rolling_update(spec: LLMServiceSpec) -> Manifest:
    # GPU-aware defaults: a surge pod needs a spare GPU that a full node does not have, so with
    # GPUs we replace in place (one down, then up); without GPUs we surge and never go below.
    if spec.resources.gpu.count > 0:
        surge: int | str = 0 if spec.rollout.max_surge is None else spec.rollout.max_surge
        unavailable: int | str = 1 if spec.rollout.max_unavailable is None else spec.rollout.max_unavailable
    else:
        surge = "25%" if spec.rollout.max_surge is None else spec.rollout.max_surge
        unavailable = 0 if spec.rollout.max_unavailable is None else spec.rollout.max_unavailable
    return {"maxSurge": surge, "maxUnavailable": unavailable}


def _pod_spec(service: LLMService, context: RenderContext) -> Manifest:
    spec = service.spec
    scheduling = spec.scheduling
    node_selector = dict(scheduling.node_selector)
    if spec.resources.gpu.count and spec.resources.gpu.type:
        node_selector[spec.resources.gpu.type_label or context.gpu_type_label] = spec.resources.gpu.type
    tolerations = [dict(t) for t in scheduling.tolerations]
    if spec.resources.gpu.count and not any(t.get("key") == spec.resources.gpu.resource_name for t in tolerations):
        # GPU node pools are commonly tainted with the resource name; tolerate it so a cluster
        # autoscaler sees this pod as schedulable on the GPU pool it should grow.
        tolerations.append({"key": spec.resources.gpu.resource_name, "operator": "Exists", "effect": "NoSchedule"})
    pod: Manifest = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SERVER_UID,
            "runAsGroup": SERVER_UID,
            "fsGroup": SERVER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": PRESTOP_SECONDS + spec.server.drain_seconds + EXIT_MARGIN_SECONDS,
        "containers": [_container(service, context)],
        "volumes": _volumes(service),
    }
    if spec.server.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s.name} for s in spec.server.image_pull_secrets]
    if node_selector:
        pod["nodeSelector"] = dict(sorted(node_selector.items()))
    if tolerations:
        pod["tolerations"] = tolerations
    if scheduling.affinity:
        pod["affinity"] = scheduling.affinity
    if scheduling.priority_class_name:
        pod["priorityClassName"] = scheduling.priority_class_name
    if scheduling.runtime_class_name:
        pod["runtimeClassName"] = scheduling.runtime_class_name
    return pod


def _container(service: LLMService, context: RenderContext) -> Manifest:
    spec = service.spec
    container: Manifest = {
        "name": "server",
        "image": spec.server.image or context.default_image,
        "imagePullPolicy": spec.server.image_pull_policy,
        "ports": [{"name": naming.PORT_NAME, "containerPort": naming.SERVER_PORT, "protocol": "TCP"}],
        "env": server_env(service, context.model_revision),
        "resources": _resources(spec),
        "volumeMounts": _volume_mounts(spec),
        "startupProbe": _probe("/startupz", period=STARTUP_PERIOD_SECONDS, failures=STARTUP_FAILURE_THRESHOLD),
        "readinessProbe": _probe("/readyz", period=5, failures=3),
        "livenessProbe": _probe("/livez", period=10, failures=3),
        # The endpoints controller needs a moment to stop routing here before the drain starts.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SECONDS}}},
        "securityContext": restricted_container(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.server.args:
        container["args"] = list(spec.server.args)
    return container


def _probe(path: str, *, period: int, failures: int) -> Manifest:
    return {
        "httpGet": {"path": path, "port": naming.PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def server_env(service: LLMService, model_revision: str | None = None) -> list[Manifest]:
    """The server's settings as environment variables; user `env` entries win by name."""
    spec = service.spec
    model = spec.model
    values = _model_source_env(service, model_revision)
    if model.gguf_file:
        values["LLMSERVICE_GGUF_FILE"] = model.gguf_file
    values["LLMSERVICE_SERVED_MODEL_NAME"] = spec.served_model_name
    values["LLMSERVICE_DTYPE"] = model.dtype
    if model.max_context_length is not None:
        values["LLMSERVICE_MAX_MODEL_LEN"] = str(model.max_context_length)
    values["LLMSERVICE_TRUST_REMOTE_CODE"] = "true" if model.trust_remote_code else "false"
    values["LLMSERVICE_DEVICE"] = "cuda" if spec.resources.gpu.count else "cpu"
    if spec.server.torch_threads is not None:
        values["LLMSERVICE_TORCH_THREADS"] = str(spec.server.torch_threads)
    cpus = _worker_cpus(spec)
    if cpus is not None:
        values["LLMSERVICE_CPUS"] = str(cpus)
    values["LLMSERVICE_HOST"] = "0.0.0.0"
    values["LLMSERVICE_PORT"] = str(naming.SERVER_PORT)
    values["LLMSERVICE_WORKERS"] = str(spec.server.workers)
    values["LLMSERVICE_MAX_NUM_SEQS"] = str(spec.server.max_num_seqs)
    values["LLMSERVICE_MAX_QUEUE"] = str(spec.server.max_queue)
    values["LLMSERVICE_PREFILL_CHUNK_TOKENS"] = str(spec.server.prefill_chunk_tokens)
    values["LLMSERVICE_PREFIX_CACHE_MIB"] = str(spec.server.prefix_cache_mib)
    values["LLMSERVICE_REQUEST_TIMEOUT_SECONDS"] = str(spec.server.request_timeout_seconds)
    values["LLMSERVICE_MAX_REQUEST_MIB"] = f"{spec.server.max_request_mib:.12g}"
    values["LLMSERVICE_REQUEST_READ_TIMEOUT_SECONDS"] = str(spec.server.request_read_timeout_seconds)
    values["LLMSERVICE_MAX_CONNECTIONS"] = str(spec.server.max_connections)
    values["LLMSERVICE_DRAIN_SECONDS"] = str(spec.server.drain_seconds)
    values["LLMSERVICE_CACHE_DIR"] = f"{CACHE_MOUNT}/models"
    values["HF_HOME"] = f"{CACHE_MOUNT}/huggingface"
    if spec.server.api_key_secret_ref is not None:
        values["LLMSERVICE_API_KEY_FILE"] = f"{API_KEY_MOUNT}/{spec.server.api_key_secret_ref.key}"
    env: dict[str, Manifest] = {name: {"name": name, "value": value} for name, value in values.items()}
    if model.token_secret_ref is not None:
        env["HF_TOKEN"] = {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": model.token_secret_ref.name, "key": model.token_secret_ref.key}},
        }
    for extra in spec.server.env:
        # Server-side apply keys env by name; a duplicate would fail the apply, so replace.
        env[str(extra["name"])] = dict(extra)
    return list(env.values())


def _model_source_env(service: LLMService, model_revision: str | None) -> dict[str, str]:
    """Where the server finds its model: LLMSERVICE_MODEL and what goes with the source."""
    model = service.spec.model
    source = model.source
    if source.hugging_face is not None and model.cache is not None:
        # The revision's directory on the cache volume: loaded from disk, never from the network.
        revision = model_revision or cache.revision(service)
        return {"LLMSERVICE_MODEL": cache.model_dir(MODEL_MOUNT, source.hugging_face.repo, revision), "HF_HUB_OFFLINE": "1"}
    if source.hugging_face is not None:
        values = {"LLMSERVICE_MODEL": source.hugging_face.repo}
        if source.hugging_face.revision:
            values["LLMSERVICE_REVISION"] = source.hugging_face.revision
        return values
    if source.pvc is not None:
        return {"LLMSERVICE_MODEL": f"{MODEL_MOUNT}/{source.pvc.path.lstrip('/')}".rstrip("/")}
    if source.image is not None:
        return {"LLMSERVICE_MODEL": source.image.path}
    return {"LLMSERVICE_MODEL": "bundled"}


def _worker_cpus(spec: LLMServiceSpec) -> int | None:
    """The CPU cores each server worker may use: the pod's, not the node's - a container sees every
    core of its node, and torch threads beyond its quota only wait on each other."""
    cpu = spec.resources.cpu.limit or spec.resources.cpu.request
    if cpu is None:
        return None
    return max(1, int(quantity_value(cpu)) // spec.server.workers)


def _resources(spec: LLMServiceSpec) -> Manifest:
    resources = spec.resources
    requests: dict[str, str] = {"memory": resources.memory_request}
    limits: dict[str, str] = {"memory": resources.memory_limit}
    if resources.cpu.request:
        requests["cpu"] = resources.cpu.request
    if resources.cpu.limit:
        limits["cpu"] = resources.cpu.limit
    if resources.gpu.count:
        # Extended resources cannot be overcommitted: request and limit must be equal.
        requests[resources.gpu.resource_name] = str(resources.gpu.count)
        limits[resources.gpu.resource_name] = str(resources.gpu.count)
    if _downloads(spec):
        # The download fills node disk: the scheduler must find room for it, and the kubelet evicts
        # this pod, not its neighbours, when it outgrows it (rather than the node hitting DiskPressure).
        requests["ephemeral-storage"] = resources.ephemeral_storage
        limits["ephemeral-storage"] = resources.ephemeral_storage
    return {"requests": dict(sorted(requests.items())), "limits": dict(sorted(limits.items()))}


def _downloads(spec: LLMServiceSpec) -> bool:
    """Whether a replica downloads its model into the cache emptyDir at start (not from a cache volume)."""
    return spec.model.source.hugging_face is not None and spec.model.cache is None


def _volumes(service: LLMService) -> list[Manifest]:
    spec = service.spec
    volumes: list[Manifest] = [
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm_size}},
        {"name": "cache", "emptyDir": {"sizeLimit": spec.resources.ephemeral_storage} if _downloads(spec) else {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if spec.model.source.pvc is not None:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": spec.model.source.pvc.claim_name, "readOnly": True}})
    elif spec.model.cache is not None:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": cache.pvc_name(service.ref.name), "readOnly": True}})
    if spec.server.api_key_secret_ref is not None:
        ref = spec.server.api_key_secret_ref
        volumes.append(
            {"name": "api-key", "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": ref.key}], "defaultMode": 0o440}}
        )
    return volumes


def _volume_mounts(spec: LLMServiceSpec) -> list[Manifest]:
    mounts: list[Manifest] = [
        {"name": "shm", "mountPath": "/dev/shm"},  # noqa: S108 - a mount point, not a temp file
        {"name": "cache", "mountPath": CACHE_MOUNT},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a writable /tmp under a read-only root
    ]
    if spec.model.source.pvc is not None or spec.model.cache is not None:
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    if spec.server.api_key_secret_ref is not None:
        mounts.append({"name": "api-key", "mountPath": API_KEY_MOUNT, "readOnly": True})
    return mounts


def kubernetes_service(service: LLMService) -> Manifest:
    spec = service.spec
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(service, annotations=dict(spec.service.annotations)),
        "spec": {
            "type": spec.service.type,
            "selector": naming.selector_labels(service.ref.name),
            "ports": [{"name": naming.PORT_NAME, "port": spec.service.port, "targetPort": naming.PORT_NAME, "protocol": "TCP"}],
        },
    }


def horizontal_pod_autoscaler(service: LLMService) -> Manifest:
    autoscaling = service.spec.autoscaling
    assert autoscaling is not None
    if autoscaling.metric == "cpu":
        metric: Manifest = {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": autoscaling.target}},
        }
    else:
        metric = {
            "type": "Pods",
            "pods": {
                "metric": {"name": AUTOSCALING_METRICS[autoscaling.metric]},
                "target": {"type": "AverageValue", "averageValue": str(autoscaling.target)},
            },
        }
    spec: Manifest = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": service.ref.name},
        "minReplicas": autoscaling.min_replicas,
        "maxReplicas": autoscaling.max_replicas,
        "metrics": [metric],
    }
    if autoscaling.behavior:
        spec["behavior"] = autoscaling.behavior
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _metadata(service), "spec": spec}


def pod_disruption_budget(service: LLMService) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(service),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": naming.selector_labels(service.ref.name)}},
    }


def _endpoint(service: LLMService) -> Manifest:
    return {"port": naming.PORT_NAME, "path": "/metrics", "interval": service.spec.monitoring.interval}


def _monitor_metadata(service: LLMService, context: RenderContext) -> Manifest:
    metadata = _metadata(service)
    extra = {**dict(context.monitor_labels), **service.spec.monitoring.labels}
    # Ours last: a selector label must not take the object out of the operator's own watch.
    metadata["labels"] = dict(sorted({**extra, **metadata["labels"]}.items()))
    return metadata


def service_monitor(service: LLMService, context: RenderContext) -> Manifest:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _monitor_metadata(service, context),
        "spec": {
            "selector": {"matchLabels": naming.selector_labels(service.ref.name)},
            "endpoints": [_endpoint(service)],
            # Series carry the LLMService name (as llmservice_io_name) for dashboards and KEDA.
            "podTargetLabels": [naming.NAME_LABEL],
        },
    }


def pod_monitor(service: LLMService, context: RenderContext) -> Manifest:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _monitor_metadata(service, context),
        "spec": {
            "selector": {"matchLabels": naming.selector_labels(service.ref.name)},
            "podMetricsEndpoints": [_endpoint(service)],
            "podTargetLabels": [naming.NAME_LABEL],
        },
    }
