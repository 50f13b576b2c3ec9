"""Names, labels and selectors shared by rendering, observing and the kopf wiring."""

from __future__ import annotations

from llmservice_operator.spec import API_VERSION, KIND, LLMService

MANAGED_BY = "llmservice-operator"
SERVER_APP = "llmservice-server"
NAME_LABEL = "llmservice.io/name"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
SERVER_PORT = 8000
PORT_NAME = "http"


def selector_labels(name: str) -> dict[str, str]:
    """The Deployment selector: minimal and immutable, so it never changes with the spec."""
    return {"app.kubernetes.io/name": SERVER_APP, NAME_LABEL: name}


def labels(name: str) -> dict[str, str]:
    return {
        **selector_labels(name),
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "inference-server",
        "app.kubernetes.io/part-of": "llmservice",
        MANAGED_BY_LABEL: MANAGED_BY,
    }


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(name).items()))


def managed_selector() -> str:
    """Selects everything this operator made for any LLMService: what its watches and resync follow."""
    return f"{MANAGED_BY_LABEL}={MANAGED_BY},{NAME_LABEL}"


def owner_reference(service: LLMService) -> dict[str, object]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": service.ref.name,
        "uid": service.ref.uid,
        "controller": True,
    }


def url(service: LLMService) -> str:
    return f"http://{service.ref.name}.{service.ref.namespace}.svc:{service.spec.service.port}"
