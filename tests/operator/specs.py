"""Builders and hypothesis strategies for valid LLMService objects, shared by operator tests."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from llmservice_operator.spec import LLMService, parse, quantity_value

UID = "7a1c9a52-5f2e-4b8e-9d57-0c1f5d1f1a01"


def body(spec: dict[str, Any], name: str = "chat", namespace: str = "team-a", generation: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "llmservice.io/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": name, "namespace": namespace, "uid": UID, "generation": generation},
        "spec": spec,
    }


def service(spec: dict[str, Any], **meta: Any) -> LLMService:
    return parse(body(spec, **meta))


MINIMAL: dict[str, Any] = {"model": {"source": {"bundled": {}}}, "resources": {"gpu": {"count": 0}}}

_names = st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True)
_memory = st.sampled_from(["512Mi", "1Gi", "4Gi", "16Gi", "80Gi"])

sources = st.one_of(
    st.builds(
        lambda repo, rev: {"huggingFace": {"repo": repo, **({"revision": rev} if rev else {})}},
        st.sampled_from(["HuggingFaceTB/SmolLM2-135M-Instruct", "meta-llama/Llama-3.1-8B-Instruct"]),
        st.sampled_from([None, "main", "a1b2c3"]),
    ),
    st.builds(lambda claim, path: {"pvc": {"claimName": claim, "path": path}}, _names, st.sampled_from(["", "llama/8b"])),
    st.just({"image": {"path": "/opt/models/smollm2"}}),
    st.just({"bundled": {}}),
)


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": {"source": draw(sources), "dtype": draw(st.sampled_from(["auto", "float16"]))}}
    if draw(st.booleans()):
        low = draw(st.integers(1, 4))
        spec["autoscaling"] = {
            "minReplicas": low,
            "maxReplicas": draw(st.integers(low, 10)),
            "metric": draw(st.sampled_from(["requestsWaiting", "requestsRunning", "cpu"])),
            "target": draw(st.integers(1, 100)),
        }
    elif draw(st.booleans()):
        spec["replicas"] = draw(st.integers(0, 5))
    spec["resources"] = {
        "gpu": {"count": draw(st.integers(0, 8)), **({"type": "NVIDIA-A100"} if draw(st.booleans()) else {})},
        "memory": {"limit": draw(_memory)},
        "shmSize": draw(st.sampled_from(["64Mi", "256Mi", "1Gi"])),
    }
    spec["server"] = {
        "maxNumSeqs": draw(st.integers(1, 256)),
        "maxQueue": draw(st.integers(0, 1000)),
        "drainSeconds": draw(st.integers(0, 600)),
        "workers": draw(st.integers(1, 4)),
        "prefixCacheSize": draw(st.sampled_from([0, "0", "64Mi", "1Gi", "500M"])),
        "maxRequestSize": draw(st.sampled_from([1, "512Ki", "16Mi", "1Gi", "100M"])),
        "requestReadTimeoutSeconds": draw(st.integers(1, 3600)),
        "maxConnections": draw(st.integers(1, 100000)),
    }
    # /dev/shm and, on CPU, every worker's prefix cache must fit below the memory limit (a CEL rule).
    shared = quantity_value(spec["resources"]["shmSize"]) + (
        0 if spec["resources"]["gpu"]["count"] else quantity_value(str(spec["server"]["prefixCacheSize"])) * spec["server"]["workers"]
    )
    if shared >= quantity_value(spec["resources"]["memory"]["limit"]):
        spec["resources"]["memory"]["limit"] = "80Gi"
    if draw(st.booleans()):
        spec["server"]["apiKeySecretRef"] = {"name": "api-keys", "key": "key"}
        spec["server"]["env"] = [{"name": "LLMSERVICE_LOG_LEVEL", "value": "DEBUG"}]
    spec["monitoring"] = {"mode": draw(st.sampled_from(["auto", "serviceMonitor", "podMonitor", "annotations", "none"]))}
    spec["service"] = {"type": draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))}
    return spec
