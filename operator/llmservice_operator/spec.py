"""The LLMService API as frozen pydantic models, parsed once at the edge.

The CRD in ``crds/`` is the contract the API server enforces; these models are the same contract
as the operator reads it (``tests/operator/test_crd_model_agree.py`` keeps the two in step). The
schema catches shape errors before the object is stored; the ``model_validator`` hooks here catch
the few rules that need values the schema cannot see, and they surface as a ``Ready=False``
condition rather than a crash.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

GROUP = "llmservice.io"
VERSION = "v1alpha1"
KIND = "LLMService"
PLURAL = "llmservices"
API_VERSION = f"{GROUP}/{VERSION}"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_QUANTITY = re.compile(r"^(\d+(\.\d+)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


class SpecError(ValueError):
    """A spec the operator cannot serve; the message is written for the user who wrote it."""


def quantity_value(quantity: str) -> float:
    """The numeric value of a Kubernetes quantity ("512Mi" -> 536870912.0)."""
    match = _QUANTITY.match(quantity)
    if match is None:
        raise SpecError(f"{quantity!r} is not a Kubernetes quantity (examples: 512Mi, 8Gi, 500m, 2)")
    number, suffix = float(match.group(1)), match.group(3) or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * _DECIMAL[suffix]
    return float(f"{number}{suffix}") if suffix else number


SHM_MESSAGE = (
    "spec.resources.shmSize (plus spec.server.prefixCacheSize per worker on CPU) must be below the memory "
    "limit: both are memory the container is charged for, and the model needs the rest"
)
GPU_ROLLOUT_MESSAGE = (
    "spec.rollout.maxUnavailable 0 on a GPU service needs spec.rollout.maxSurge above 0: with GPUs maxSurge "
    "defaults to 0 (a new pod would need a spare GPU), so the rollout could never start; set maxSurge (and have "
    "a spare GPU) or allow maxUnavailable 1"
)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SecretKeyRef(_Model):
    name: str = Field(min_length=1, max_length=253)
    key: str = Field(min_length=1)


class HuggingFaceSource(_Model):
    repo: str = Field(min_length=1)
    revision: str | None = None


class PVCSource(_Model):
    claim_name: str = Field(min_length=1)
    path: str = ""


class ImageSource(_Model):
    path: str = Field(pattern=r"^/")


class BundledSource(_Model):
    pass


class ModelSource(_Model):
    hugging_face: HuggingFaceSource | None = None
    pvc: PVCSource | None = None
    image: ImageSource | None = None
    bundled: BundledSource | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        chosen = [n for n in ("hugging_face", "pvc", "image", "bundled") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise SpecError("spec.model.source must set exactly one of huggingFace, pvc, image, bundled")
        return self


Dtype = Literal["auto", "float32", "float16", "bfloat16"]
AccessMode = Literal["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany", "ReadWriteOncePod"]
QUANTITY_PATTERN = r"^(\d+(\.\d+)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$"


class ModelCacheSpec(_Model):
    """A volume the model is downloaded to once, by a Job, and that every replica loads from."""

    size: str = Field(max_length=64, pattern=QUANTITY_PATTERN)
    storage_class_name: str | None = Field(default=None, max_length=253)
    access_mode: AccessMode = "ReadWriteOnce"


class ModelSpec(_Model):
    source: ModelSource
    gguf_file: str | None = None
    served_name: str | None = None
    dtype: Dtype = "auto"
    max_context_length: int | None = Field(default=None, ge=16)
    token_secret_ref: SecretKeyRef | None = None
    trust_remote_code: bool = False
    cache: ModelCacheSpec | None = None

    @model_validator(mode="after")
    def _cache_needs_the_hub(self) -> ModelSpec:
        if self.cache is not None and self.source.hugging_face is None:
            raise SpecError(
                "spec.model.cache fills a volume from a Hugging Face repository: it needs spec.model.source.huggingFace "
                "(a pvc or image source is already on disk)"
            )
        return self


class LocalObjectReference(_Model):
    name: str


class ServerSpec(_Model):
    image: str | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: tuple[LocalObjectReference, ...] = ()
    workers: int = Field(default=1, ge=1, le=64)
    max_num_seqs: int = Field(default=16, ge=1, le=4096)
    max_queue: int = Field(default=64, ge=0, le=100000)
    prefill_chunk_tokens: int = Field(default=512, ge=1, le=1048576)
    prefix_cache_size: int | str = "128Mi"  # a quantity: int-or-string in the CRD
    torch_threads: int | None = Field(default=None, ge=1, le=1024)
    request_timeout_seconds: int = Field(default=600, ge=1, le=86400)
    max_request_size: int | str = "16Mi"  # a quantity: int-or-string in the CRD
    request_read_timeout_seconds: int = Field(default=30, ge=1, le=3600)
    max_connections: int = Field(default=1024, ge=1, le=1048576)
    drain_seconds: int = Field(default=30, ge=0, le=3600)
    api_key_secret_ref: SecretKeyRef | None = None
    env: tuple[dict[str, Any], ...] = ()
    args: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _prefix_cache_quantity(self) -> ServerSpec:
        quantity_value(str(self.prefix_cache_size))
        return self

    @model_validator(mode="after")
    def _max_request_size_quantity(self) -> ServerSpec:
        if quantity_value(str(self.max_request_size)) < 1:
            raise SpecError(f"spec.server.maxRequestSize must be at least one byte, not {self.max_request_size!r}")
        return self

    @property
    def prefix_cache_mib(self) -> int:
        """The prefix cache in whole MiB, as the server takes it (below 1Mi: off)."""
        return int(quantity_value(str(self.prefix_cache_size)) // 2**20)

    @property
    def max_request_mib(self) -> float:
        """The request body limit in MiB, as the server takes it (fractions allowed: 512Ki is 0.5)."""
        return quantity_value(str(self.max_request_size)) / 2**20


AutoscalingMetric = Literal["requestsWaiting", "requestsRunning", "cpu"]


class AutoscalingSpec(_Model):
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(ge=1)
    metric: AutoscalingMetric = "requestsWaiting"
    target: int = Field(default=4, ge=1)
    behavior: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise SpecError(f"spec.autoscaling.minReplicas ({self.min_replicas}) must not exceed maxReplicas ({self.max_replicas})")
        if self.metric == "cpu" and self.target > 100:
            raise SpecError("spec.autoscaling.target is a CPU utilisation percentage for metric cpu: 1..100")
        return self


class GPUSpec(_Model):
    count: int = Field(default=1, ge=0, le=16)
    resource_name: str = "nvidia.com/gpu"
    type: str | None = None
    type_label: str | None = None  # None: the operator's default (RenderContext.gpu_type_label)


class RequestLimit(_Model):
    # Quantities are int-or-string in the CRD (like core's resources): `request: 2` arrives as an int.
    model_config = ConfigDict(coerce_numbers_to_str=True)

    request: str | None = None
    limit: str | None = None


class ResourcesSpec(_Model):
    model_config = ConfigDict(coerce_numbers_to_str=True)  # shmSize is int-or-string in the CRD

    gpu: GPUSpec = GPUSpec()
    cpu: RequestLimit = RequestLimit(request="1")
    memory: RequestLimit = RequestLimit(request="4Gi")
    shm_size: str = "1Gi"
    ephemeral_storage: str = "20Gi"

    @model_validator(mode="after")
    def _quantities(self) -> ResourcesSpec:
        for name, pair in (("cpu", self.cpu), ("memory", self.memory)):
            for which in ("request", "limit"):
                value = getattr(pair, which)
                if value is not None:
                    quantity_value(value)
            if pair.request is not None and pair.limit is not None and quantity_value(pair.limit) < quantity_value(pair.request):
                raise SpecError(f"spec.resources.{name}.limit ({pair.limit}) is below its request ({pair.request})")
        if self.memory.request is None and self.memory.limit is None:
            raise SpecError("spec.resources.memory needs a request or a limit: a model server is never unbounded")
        quantity_value(self.shm_size)
        quantity_value(self.ephemeral_storage)
        return self

    @property
    def memory_limit(self) -> str:
        """The memory limit, derived from the request when only that is given."""
        limit = self.memory.limit or self.memory.request
        assert limit is not None  # guaranteed by _quantities
        return limit

    @property
    def memory_request(self) -> str:
        return self.memory.request or self.memory_limit


class SchedulingSpec(_Model):
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    affinity: dict[str, Any] | None = None
    priority_class_name: str | None = None
    runtime_class_name: str | None = None


class ServiceSpec(_Model):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(default=8000, ge=1, le=65535)
    annotations: dict[str, str] = Field(default_factory=dict)


MonitoringMode = Literal["auto", "serviceMonitor", "podMonitor", "annotations", "none"]


class MonitoringSpec(_Model):
    mode: MonitoringMode = "auto"
    interval: str = Field(default="30s", pattern=r"^([0-9]+(ms|s|m|h))+$")
    labels: dict[str, str] = Field(default_factory=dict)


class RolloutSpec(_Model):
    max_surge: int | str | None = None
    max_unavailable: int | str | None = None


class LLMServiceSpec(_Model):
    model: ModelSpec
    server: ServerSpec = ServerSpec()
    replicas: int | None = Field(default=None, ge=0)
    autoscaling: AutoscalingSpec | None = None
    resources: ResourcesSpec = ResourcesSpec()
    scheduling: SchedulingSpec = SchedulingSpec()
    service: ServiceSpec = ServiceSpec()
    monitoring: MonitoringSpec = MonitoringSpec()
    rollout: RolloutSpec = RolloutSpec()

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> LLMServiceSpec:
        if self.replicas is not None and self.autoscaling is not None:
            raise SpecError("set spec.replicas or spec.autoscaling, not both: the HPA owns replicas when autoscaling")
        return self

    # The same two rules are CEL rules in the CRD; here they catch objects stored before those existed.
    @model_validator(mode="after")
    def _shared_memory_fits(self) -> LLMServiceSpec:
        resources = self.resources
        # /dev/shm is memory-backed, and on CPU each worker's prefix cache lives in host memory.
        prefix = 0.0 if resources.gpu.count else quantity_value(str(self.server.prefix_cache_size)) * self.server.workers
        if quantity_value(resources.shm_size) + prefix >= quantity_value(resources.memory_limit):
            raise SpecError(SHM_MESSAGE)
        return self

    @model_validator(mode="after")
    def _gpu_rollout_can_start(self) -> LLMServiceSpec:
        rollout = self.rollout
        if self.resources.gpu.count and rollout.max_surge is None and str(rollout.max_unavailable) in ("0", "0%"):
            raise SpecError(GPU_ROLLOUT_MESSAGE)
        return self

    @property
    def desired_replicas(self) -> int | None:
        """Replicas the operator sets; None when an HPA owns them."""
        if self.autoscaling is not None:
            return None
        return 1 if self.replicas is None else self.replicas

    @property
    def served_model_name(self) -> str:
        if self.model.served_name:
            return self.model.served_name
        source = self.model.source
        if source.hugging_face is not None:
            return source.hugging_face.repo
        if source.bundled is not None:
            return "SmolLM2-135M-Instruct"
        path = source.pvc.path if source.pvc is not None else source.image.path if source.image else ""
        return path.rstrip("/").rsplit("/", 1)[-1] or "model"


class ObjectRef(_Model):
    """Identity of one LLMService, the part of its metadata the operator needs."""

    namespace: str
    name: str
    uid: str
    generation: int


class LLMService(_Model):
    ref: ObjectRef
    spec: LLMServiceSpec


def parse(body: dict[str, Any]) -> LLMService:
    """Parse a raw LLMService into the model, or raise SpecError with a readable message."""
    metadata = body.get("metadata") or {}
    try:
        ref = ObjectRef(
            namespace=metadata["namespace"],
            name=metadata["name"],
            uid=metadata["uid"],
            generation=int(metadata.get("generation") or 0),
        )
        spec = LLMServiceSpec.model_validate(body.get("spec") or {})
    except SpecError:
        raise
    except KeyError as missing:
        raise SpecError(f"metadata.{missing.args[0]} is missing") from None
    except ValidationError as error:
        raise SpecError(_describe(error)) from None
    return LLMService(ref=ref, spec=spec)


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        location = ".".join(str(p) for p in item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        parts.append(f"spec.{location}: {message}" if location else message)
    return "; ".join(parts)
