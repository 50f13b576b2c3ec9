"""The pure renderer: every valid spec renders valid, deterministic, self-consistent children."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
from hypothesis import HealthCheck, given, settings

from llmservice_operator import naming
from llmservice_operator.render import Capabilities, RenderContext, render, server_env
from llmservice_operator.spec import SpecError
from tests.operator.specs import MINIMAL, UID, service, specs

CONTEXT = RenderContext(default_image="registry.local/llmservice-server:test")
KUBERNETES_VERSION = "1.35"


def by_kind(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {child["kind"]: child for child in children}


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs())
def test_any_valid_spec_renders_deterministically_and_consistently(spec: dict[str, Any]) -> None:
    svc = service(spec)
    capabilities = Capabilities(service_monitor=True, pod_monitor=True, custom_metrics=True)
    context = RenderContext("img:1", capabilities)
    first = render(svc, context)
    assert json.dumps(first, sort_keys=True) == json.dumps(render(svc, context), sort_keys=True)

    kinds = by_kind(first)
    deployment = kinds["Deployment"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template_labels.items(), "the Deployment selector must match its pods"
    assert kinds["Service"]["spec"]["selector"].items() <= template_labels.items()
    for child in first:
        owner = child["metadata"]["ownerReferences"]
        assert owner == [{"apiVersion": "llmservice.io/v1alpha1", "kind": "LLMService", "name": "chat", "uid": UID, "controller": True}]
        assert child["metadata"]["labels"][naming.NAME_LABEL] == "chat"
    if "autoscaling" in spec:
        assert "replicas" not in deployment["spec"], "an HPA owns replicas; applying them would fight it"
        assert kinds["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] == spec["autoscaling"]["maxReplicas"]
    else:
        assert deployment["spec"]["replicas"] == spec.get("replicas", 1)
        assert "HorizontalPodAutoscaler" not in kinds
    for child in first:
        if child["kind"] not in ("ServiceMonitor", "PodMonitor"):  # CRDs: no built-in schema to check against
            kubernetes_validate.validate(child, KUBERNETES_VERSION, strict=True)


def test_deployment_carries_gpu_memory_env_probes_and_security() -> None:
    svc = service(
        {
            "model": {"source": {"huggingFace": {"repo": "org/model", "revision": "v1"}}, "tokenSecretRef": {"name": "hf", "key": "token"}},
            "resources": {"gpu": {"count": 2, "type": "NVIDIA-L4"}, "memory": {"request": "24Gi", "limit": "32Gi"}, "shmSize": "8Gi"},
            "server": {
                "maxNumSeqs": 32,
                "maxQueue": 100,
                "prefillChunkTokens": 256,
                "drainSeconds": 45,
                "workers": 2,
                "requestTimeoutSeconds": 120,
            },
        }
    )
    deployment = by_kind(render(svc, CONTEXT))["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # A Hugging Face download lands on node disk: the default 20Gi of ephemeral storage is asked for.
    assert container["resources"] == {
        "requests": {"memory": "24Gi", "cpu": "1", "nvidia.com/gpu": "2", "ephemeral-storage": "20Gi"},
        "limits": {"memory": "32Gi", "nvidia.com/gpu": "2", "ephemeral-storage": "20Gi"},
    }
    expected_env = {
        "LLMSERVICE_MODEL": "org/model",
        "LLMSERVICE_REVISION": "v1",
        "LLMSERVICE_MAX_NUM_SEQS": "32",
        "LLMSERVICE_MAX_QUEUE": "100",
        "LLMSERVICE_PREFILL_CHUNK_TOKENS": "256",
        "LLMSERVICE_DRAIN_SECONDS": "45",
        "LLMSERVICE_WORKERS": "2",
        "LLMSERVICE_REQUEST_TIMEOUT_SECONDS": "120",
        "LLMSERVICE_SERVED_MODEL_NAME": "org/model",
        "LLMSERVICE_DEVICE": "cuda",
        "HF_TOKEN": {"secretKeyRef": {"name": "hf", "key": "token"}},
    }
    assert expected_env.items() <= env_of(deployment).items()
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {p: container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} == {
        "startupProbe": "/startupz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/livez",
    }
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800, "a model load needs a long startup budget"
    assert pod["terminationGracePeriodSeconds"] > 45 + container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_cpu_service_surges_and_derives_memory_limit_from_request() -> None:
    deployment = by_kind(render(service({**MINIMAL, "resources": {"gpu": {"count": 0}, "memory": {"request": "2Gi"}}}), CONTEXT))[
        "Deployment"
    ]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"memory": "2Gi"}
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": "25%", "maxUnavailable": 0}
    assert env_of(deployment)["LLMSERVICE_MODEL"] == "bundled"
    assert container["image"] == "registry.local/llmservice-server:test"


def test_pvc_model_is_mounted_read_only_and_addressed_by_path() -> None:
    deployment = by_kind(render(service({"model": {"source": {"pvc": {"claimName": "models", "path": "llama/8b"}}}}), CONTEXT))[
        "Deployment"
    ]
    pod = deployment["spec"]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert env_of(deployment)["LLMSERVICE_MODEL"] == "/models/llama/8b"


def test_monitoring_auto_picks_service_monitor_only_when_the_crd_exists() -> None:
    svc = service(MINIMAL)
    without = by_kind(render(svc, CONTEXT))
    annotations = without["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert "ServiceMonitor" not in without
    with_crd = by_kind(render(svc, RenderContext("img", Capabilities(service_monitor=True))))
    assert with_crd["ServiceMonitor"]["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    assert "annotations" not in with_crd["Deployment"]["spec"]["template"]["metadata"]


def test_monitors_carry_the_operators_and_the_specs_labels() -> None:
    svc = service({**MINIMAL, "monitoring": {"mode": "podMonitor", "labels": {"release": "kps-team", "team": "ml"}}})
    context = RenderContext("img", Capabilities(pod_monitor=True), monitor_labels=(("release", "kps"), ("tier", "x")))
    monitor = by_kind(render(svc, context))["PodMonitor"]
    labels = monitor["metadata"]["labels"]
    assert (labels["release"], labels["team"], labels["tier"]) == ("kps-team", "ml", "x"), "the spec wins on a clash"
    assert labels[naming.NAME_LABEL] == "chat" and labels[naming.MANAGED_BY_LABEL] == naming.MANAGED_BY
    hijack = service({**MINIMAL, "monitoring": {"mode": "serviceMonitor", "labels": {naming.NAME_LABEL: "other"}}})
    assert by_kind(render(hijack, context))["ServiceMonitor"]["metadata"]["labels"][naming.NAME_LABEL] == "chat"


def test_the_gpu_type_label_comes_from_the_spec_or_the_operators_default() -> None:
    gke = RenderContext("img", gpu_type_label="cloud.google.com/gke-accelerator")
    typed = service({**MINIMAL, "resources": {"gpu": {"count": 1, "type": "nvidia-l4"}, "memory": {"limit": "8Gi"}}})
    pod = by_kind(render(typed, gke))["Deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert by_kind(render(typed, CONTEXT))["Deployment"]["spec"]["template"]["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.product": "nvidia-l4"
    }
    own = service(
        {
            **MINIMAL,
            "resources": {
                "gpu": {"count": 1, "type": "L4", "typeLabel": "karpenter.k8s.aws/instance-gpu-name"},
                "memory": {"limit": "8Gi"},
            },
        }
    )
    assert by_kind(render(own, gke))["Deployment"]["spec"]["template"]["spec"]["nodeSelector"] == {
        "karpenter.k8s.aws/instance-gpu-name": "L4"
    }


def test_only_replicas_that_download_ask_for_ephemeral_storage() -> None:
    downloads = service(
        {
            **MINIMAL,
            "model": {"source": {"huggingFace": {"repo": "org/m"}}},
            "resources": {"gpu": {"count": 0}, "memory": {"limit": "4Gi"}, "ephemeralStorage": "50Gi"},
        }
    )
    pod = by_kind(render(downloads, CONTEXT))["Deployment"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["ephemeral-storage"] == resources["limits"]["ephemeral-storage"] == "50Gi"
    assert {v["name"]: v for v in pod["volumes"]}["cache"]["emptyDir"] == {"sizeLimit": "50Gi"}
    bundled = by_kind(render(service(MINIMAL), CONTEXT))["Deployment"]["spec"]["template"]["spec"]
    assert "ephemeral-storage" not in bundled["containers"][0]["resources"]["requests"]
    assert {v["name"]: v for v in bundled["volumes"]}["cache"]["emptyDir"] == {}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({**MINIMAL, "resources": {"gpu": {"count": 0}, "memory": {"limit": "1Gi"}}}, "must be below the memory limit"),
        (
            {
                **MINIMAL,
                "resources": {"gpu": {"count": 0}, "memory": {"request": "2Gi"}, "shmSize": "256Mi"},
                "server": {"workers": 4, "prefixCacheSize": "512Mi"},
            },
            "must be below the memory limit",
        ),
        (
            {**MINIMAL, "resources": {"gpu": {"count": 1}, "memory": {"limit": "8Gi"}}, "rollout": {"maxUnavailable": "0%"}},
            "needs spec.rollout.maxSurge above 0",
        ),
    ],
)
def test_what_the_crd_rules_refuse_the_model_refuses(spec: dict[str, Any], message: str) -> None:
    """For objects stored before a CEL rule existed: InvalidSpec, not a broken rollout."""
    with pytest.raises(SpecError, match=message):
        service(spec)


def test_pdb_only_with_more_than_one_replica() -> None:
    assert "PodDisruptionBudget" not in by_kind(render(service(MINIMAL), CONTEXT))
    assert "PodDisruptionBudget" in by_kind(render(service({**MINIMAL, "replicas": 2}), CONTEXT))


def test_hpa_targets_the_servers_queue_metric() -> None:
    hpa = by_kind(render(service({**MINIMAL, "autoscaling": {"maxReplicas": 4, "target": 8}}), CONTEXT))["HorizontalPodAutoscaler"]
    assert hpa["spec"]["metrics"] == [
        {"type": "Pods", "pods": {"metric": {"name": "vllm:num_requests_waiting"}, "target": {"type": "AverageValue", "averageValue": "8"}}}
    ]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat"}


def test_user_env_replaces_ours_by_name() -> None:
    env = server_env(service({**MINIMAL, "server": {"env": [{"name": "LLMSERVICE_MAX_QUEUE", "value": "7"}]}}))
    assert [e for e in env if e["name"] == "LLMSERVICE_MAX_QUEUE"] == [{"name": "LLMSERVICE_MAX_QUEUE", "value": "7"}]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({**MINIMAL, "replicas": 2, "autoscaling": {"maxReplicas": 3}}, "not both"),
        ({**MINIMAL, "autoscaling": {"minReplicas": 5, "maxReplicas": 3}}, "must not exceed"),
        ({"model": {"source": {"bundled": {}, "image": {"path": "/m"}}}}, "exactly one"),
        ({"model": {"source": {}}}, "exactly one"),
        ({**MINIMAL, "resources": {"memory": {"request": "8Gi", "limit": "4Gi"}}}, "below its request"),
        ({**MINIMAL, "resources": {"memory": {"limit": "lots"}}}, "not a Kubernetes quantity"),
        ({**MINIMAL, "server": {"prefixCacheSize": "some"}}, "not a Kubernetes quantity"),
        ({**MINIMAL, "server": {"maxRequestSize": "0"}}, "at least one byte"),
        ({**MINIMAL, "server": {"maxRequestSize": "16 MiB"}}, "not a Kubernetes quantity"),
    ],
)
def test_specs_we_cannot_serve_are_refused_with_a_readable_message(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        service(spec)


def test_servers_are_told_the_pods_cpu_per_worker_not_the_nodes() -> None:
    cpu = {"gpu": {"count": 0}, "cpu": {"request": "2", "limit": "8"}, "memory": {"limit": "4Gi"}}
    env = env_of(by_kind(render(service({**MINIMAL, "resources": cpu}), CONTEXT))["Deployment"])
    assert env["LLMSERVICE_CPUS"] == "8"
    assert "LLMSERVICE_TORCH_THREADS" not in env  # the server sizes torch per step from the cores
    two_workers = {**MINIMAL, "resources": cpu, "server": {"workers": 2}}
    assert env_of(by_kind(render(service(two_workers), CONTEXT))["Deployment"])["LLMSERVICE_CPUS"] == "4"
    half = {"gpu": {"count": 0}, "cpu": {"request": "500m"}, "memory": {"limit": "4Gi"}}
    assert env_of(by_kind(render(service({**MINIMAL, "resources": half}), CONTEXT))["Deployment"])["LLMSERVICE_CPUS"] == "1"


def test_an_explicit_torch_thread_count_wins_over_the_pods_cpu() -> None:
    # A fixed count for every step, e.g. to hold one core back for a sidecar.
    cpu = {"gpu": {"count": 0}, "cpu": {"request": "2"}, "memory": {"limit": "4Gi"}}
    whole = {**MINIMAL, "resources": cpu, "server": {"torchThreads": 2}}
    assert env_of(by_kind(render(service(whole), CONTEXT))["Deployment"])["LLMSERVICE_TORCH_THREADS"] == "2"
    gpu = {"model": {"source": {"bundled": {}}}, "resources": {"gpu": {"count": 1}}, "server": {"torchThreads": 4}}
    assert env_of(by_kind(render(service(gpu), CONTEXT))["Deployment"])["LLMSERVICE_TORCH_THREADS"] == "4"


@pytest.mark.parametrize(("size", "mib"), [(None, "128"), ("1Gi", "1024"), ("100M", "95"), (0, "0"), ("512Ki", "0")])
def test_the_prefix_cache_size_reaches_the_server_in_whole_mib(size: int | str | None, mib: str) -> None:
    spec = MINIMAL if size is None else {**MINIMAL, "server": {"prefixCacheSize": size}}
    assert env_of(by_kind(render(service(spec), CONTEXT))["Deployment"])["LLMSERVICE_PREFIX_CACHE_MIB"] == mib


@pytest.mark.parametrize(("size", "mib"), [(None, "16"), ("1Gi", "1024"), ("512Ki", "0.5"), (1048576, "1"), ("100M", "95.3674316406")])
def test_the_request_size_limit_reaches_the_server_in_mib(size: int | str | None, mib: str) -> None:
    spec = MINIMAL if size is None else {**MINIMAL, "server": {"maxRequestSize": size}}
    assert env_of(by_kind(render(service(spec), CONTEXT))["Deployment"])["LLMSERVICE_MAX_REQUEST_MIB"] == mib


def test_the_connection_limits_reach_the_server_with_the_servers_defaults() -> None:
    env = env_of(by_kind(render(service(MINIMAL), CONTEXT))["Deployment"])
    assert (env["LLMSERVICE_REQUEST_READ_TIMEOUT_SECONDS"], env["LLMSERVICE_MAX_CONNECTIONS"]) == ("30", "1024")
    tight = {**MINIMAL, "server": {"requestReadTimeoutSeconds": 5, "maxConnections": 64}}
    env = env_of(by_kind(render(service(tight), CONTEXT))["Deployment"])
    assert (env["LLMSERVICE_REQUEST_READ_TIMEOUT_SECONDS"], env["LLMSERVICE_MAX_CONNECTIONS"]) == ("5", "64")
