"""A local Kubernetes control plane (etcd, API server, controllers, scheduler, kwok) for tests."""

from tests.cluster.controlplane import (
    DEFAULT_GPU_PRODUCT,
    FAKE_NODE_ANNOTATION,
    GPU_RESOURCE,
    CommandError,
    ComponentFailed,
    ControlPlane,
    ControlPlaneError,
    WaitTimeout,
    wait_for,
)

__all__ = [
    "DEFAULT_GPU_PRODUCT",
    "FAKE_NODE_ANNOTATION",
    "GPU_RESOURCE",
    "CommandError",
    "ComponentFailed",
    "ControlPlane",
    "ControlPlaneError",
    "WaitTimeout",
    "wait_for",
]
