"""Operator settings, read once at startup from the environment and the command line."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SERVER_IMAGE = "ghcr.io/llmservice/llmservice-server:0.1.0"


class OperatorSettings(BaseSettings):
    """How this operator process runs; every field is also `LLMSERVICE_OPERATOR_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="LLMSERVICE_OPERATOR_", frozen=True)

    namespaces: Annotated[tuple[str, ...], NoDecode] = Field(default=(), description="Namespaces to watch; empty watches all namespaces.")
    server_image: str = Field(default=DEFAULT_SERVER_IMAGE, description="Inference server image used when spec.server.image is unset.")
    field_manager: str = Field(default="llmservice-operator", description="Server-side apply field manager.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    health_port: int = Field(default=8080, description="Port of the /healthz liveness endpoint; 0 disables it.")
    metrics_port: int = Field(default=9090, description="Port of the /metrics endpoint; 0 disables it.")
    workers: int = Field(default=8, ge=1, description="LLMServices reconciled concurrently.")
    retry_base_seconds: float = Field(default=1.0, gt=0, description="First delay before retrying a failed reconcile.")
    retry_max_seconds: float = Field(default=300.0, gt=0, description="Longest delay between retries.")
    resync_seconds: float = Field(
        default=600.0,
        ge=0,
        description="Re-list every watched kind this often, to repair deletions a watch missed; 0 disables.",
    )
    probe_pods: bool = Field(
        default=False,
        description="Ask each server pod that becomes ready for its fetch/load/warmup stages (GET /startupz on the"
        " pod IP) for status.startup; needs the operator to reach pod IPs. Off outside the chart.",
    )
    gpu_type_label: str = Field(
        default="nvidia.com/gpu.product",
        description="Node label carrying the GPU type, for LLMServices that set resources.gpu.type but no typeLabel.",
    )
    monitor_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels on every ServiceMonitor/PodMonitor (JSON object in the environment), for a Prometheus selector.",
    )
    capacity_grace_seconds: float = Field(
        default=900.0,
        ge=0,
        description="How long a GPU pod may wait for a node (a cluster autoscaler adding one) before the "
        "LLMService says InsufficientGPU and Stalled.",
    )
    leader_election: bool = Field(
        default=False,
        description="Reconcile only while holding a coordination.k8s.io Lease, so several replicas may run.",
    )
    lease_name: str = Field(default="llmservice-operator", description="Name of the leader election Lease.")
    lease_namespace: str = Field(default="default", description="Namespace of the leader election Lease.")
    lease_duration_seconds: int = Field(
        default=15,
        ge=3,
        description="How long a Lease that is not renewed stays with its holder; a standby takes over after it.",
    )
    identity: str = Field(default="", description="This process in the Lease; empty: the host name and a random suffix.")
    watch_timeout_seconds: int | None = Field(
        default=None, ge=1, description="Ask the API server to end each watch after this long (kopf then re-lists)."
    )

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value
