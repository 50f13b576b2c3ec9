"""The LLMService CRD against a real API server: accepted, Established, and enforcing its rules.

The schema's bounds and enums and the CEL rules are only truly checked by the API server: every
invalid object below must be refused with the message a user would need, every example must be
accepted, and a minimal object must come back with the documented defaults filled in.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from devtools.controlplane import ControlPlane
from devtools.waiting import wait_for

from llmservice_operator import spec as api

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "llmservice.io_llmservices.yaml"
CRD_NAME = f"{api.PLURAL}.{api.GROUP}"
MINIMAL: dict[str, Any] = {"model": {"source": {"bundled": {}}}}


def manifest(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": spec}


def apply(cluster: ControlPlane, namespace: str, obj: dict[str, Any], *, check: bool = True) -> str:
    """Server-side apply; returns stdout and stderr with whitespace collapsed (messages wrap)."""
    result = cluster.kubectl(
        "apply",
        "--server-side",
        "--field-manager=test",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps(obj),
        check=check,
    )
    if not check:
        assert result.returncode != 0, f"the API server accepted {json.dumps(obj)}"
    return " ".join(f"{result.stdout} {result.stderr}".split())


def get(cluster: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(cluster.kubectl("get", api.PLURAL, name, "-n", namespace, "-o", "json").stdout)
    return obj


def with_changes(*changes: tuple[str, Any]) -> dict[str, Any]:
    """MINIMAL with dotted paths set (a value of None deletes the key)."""
    spec = copy.deepcopy(MINIMAL)
    for path, value in changes:
        *parents, last = path.split(".")
        target = spec
        for key in parents:
            target = target.setdefault(key, {})
        if value is None:
            target.pop(last, None)
        else:
            target[last] = value
    return spec


@pytest.fixture(scope="module")
def crd(cluster: ControlPlane, chart: None) -> ControlPlane:
    """The cluster with the CRD installed by the chart (a proven copy of crds/) and Established."""
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    return cluster


def test_crd_is_accepted_and_established(crd: ControlPlane) -> None:
    obj = json.loads(crd.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    assert conditions.get("NonStructuralSchema") is None
    assert obj["status"]["acceptedNames"]["shortNames"] == ["llmsvc"]
    assert obj["status"]["acceptedNames"]["categories"] == ["llm"]


INVALID = [
    (
        "replicas-and-autoscaling",
        with_changes(("replicas", 2), ("autoscaling", {"maxReplicas": 3})),
        "set spec.replicas or spec.autoscaling, not both",
    ),
    (
        "min-above-max",
        with_changes(("autoscaling", {"minReplicas": 3, "maxReplicas": 2})),
        "spec.autoscaling.minReplicas must not exceed maxReplicas",
    ),
    (
        "min-replicas-zero",
        with_changes(("autoscaling", {"minReplicas": 0, "maxReplicas": 2})),
        "cannot wake a service from zero replicas",
    ),
    (
        "cpu-target-above-100",
        with_changes(("autoscaling", {"maxReplicas": 2, "metric": "cpu", "target": 150})),
        "CPU utilisation percentage",
    ),
    (
        "two-model-sources",
        with_changes(("model.source", {"bundled": {}, "huggingFace": {"repo": "HuggingFaceTB/SmolLM2-135M"}})),
        "set exactly one model source",
    ),
    ("no-model-source", with_changes(("model.source", {})), "set exactly one model source"),
    ("no-model", {"replicas": 1}, "spec.model: Required value"),
    ("bad-dtype", with_changes(("model.dtype", "int4")), 'spec.model.dtype: Unsupported value: "int4"'),
    (
        "bad-metric",
        with_changes(("autoscaling", {"maxReplicas": 2, "metric": "gpu"})),
        'spec.autoscaling.metric: Unsupported value: "gpu"',
    ),
    (
        "memory-limit-below-request",
        with_changes(("resources.memory", {"request": "8Gi", "limit": "4Gi"})),
        "spec.resources.memory.limit must be greater than or equal to the memory request",
    ),
    (
        "memory-limit-below-integer-request",
        with_changes(("resources.memory", {"request": 8589934592, "limit": "4Gi"})),
        "spec.resources.memory.limit must be greater than or equal to the memory request",
    ),
    ("memory-unbounded", with_changes(("resources.memory", {})), "spec.resources.memory needs a request or a limit"),
    (
        "cpu-limit-below-request",
        with_changes(("resources.cpu", {"request": "2", "limit": "500m"})),
        "spec.resources.cpu.limit must be greater than or equal to the CPU request",
    ),
    ("not-a-quantity", with_changes(("resources.memory", {"request": "lots"})), "spec.resources.memory.request"),
    ("negative-quantity", with_changes(("resources.memory", {"request": -1})), "a quantity cannot be negative"),
    ("prefix-cache-not-a-quantity", with_changes(("server.prefixCacheSize", "big")), "spec.server.prefixCacheSize"),
    ("prefix-cache-negative", with_changes(("server.prefixCacheSize", "-1Gi")), "a quantity cannot be negative"),
    ("request-size-not-a-quantity", with_changes(("server.maxRequestSize", "16 MiB")), "spec.server.maxRequestSize"),
    ("request-size-negative", with_changes(("server.maxRequestSize", "-1Mi")), "a quantity cannot be negative"),
    ("read-timeout-zero", with_changes(("server.requestReadTimeoutSeconds", 0)), "spec.server.requestReadTimeoutSeconds"),
    ("max-connections-zero", with_changes(("server.maxConnections", 0)), "spec.server.maxConnections"),
    ("negative-gpu-count", with_changes(("resources.gpu", {"count": -1})), "should be greater than or equal to 0"),
    ("too-many-gpus", with_changes(("resources.gpu", {"count": 17})), "should be less than or equal to 16"),
    ("max-num-seqs-zero", with_changes(("server.maxNumSeqs", 0)), "should be greater than or equal to 1"),
    ("torch-threads-zero", with_changes(("server.torchThreads", 0)), "spec.server.torchThreads"),
    (
        "relative-image-path",
        with_changes(("model.source", {"image": {"path": "models/x"}})),
        "spec.model.source.image.path",
    ),
    (
        "pvc-path-escapes",
        with_changes(("model.source", {"pvc": {"claimName": "models", "path": "a/../../etc"}})),
        "path must stay inside the volume",
    ),
    (
        "rollout-cannot-progress",
        with_changes(("rollout", {"maxSurge": 0, "maxUnavailable": "0%"})),
        "cannot both be 0",
    ),
    (
        "shm-fills-the-memory-limit",
        with_changes(("resources", {"gpu": {"count": 1}, "memory": {"limit": "1Gi"}})),
        "spec.resources.shmSize (plus spec.server.prefixCacheSize per worker on CPU) must be below the memory limit",
    ),
    (
        "cpu-prefix-caches-fill-the-memory-limit",
        with_changes(
            ("resources", {"gpu": {"count": 0}, "memory": {"request": "2Gi"}, "shmSize": "256Mi"}),
            ("server", {"workers": 4, "prefixCacheSize": "512Mi"}),
        ),
        "must be below the memory limit",
    ),
    (
        "gpu-rollout-never-starts",
        with_changes(("resources.gpu", {"count": 1}), ("rollout", {"maxUnavailable": 0})),
        "spec.rollout.maxUnavailable 0 on a GPU service needs spec.rollout.maxSurge above 0",
    ),
    (
        "env-value-and-value-from",
        with_changes(("server.env", [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}])),
        "an env entry sets value or valueFrom, not both",
    ),
    ("unknown-field", with_changes(("model.sauce", "tomato")), "sauce"),
]


@pytest.mark.parametrize(("case", "spec", "message"), INVALID, ids=[case for case, _, _ in INVALID])
def test_invalid_llmservice_is_rejected_with_a_clear_message(
    crd: ControlPlane, namespace: str, case: str, spec: dict[str, Any], message: str
) -> None:
    output = apply(crd, namespace, manifest(case, spec), check=False)
    assert message in output


@pytest.mark.parametrize(
    ("case", "spec"),
    [
        (
            "gpu-prefix-cache-on-the-device",
            with_changes(("resources", {"gpu": {"count": 1}, "memory": {"limit": "2Gi"}}), ("server", {"prefixCacheSize": "8Gi"})),
        ),
        ("cpu-zero-unavailable-surges", with_changes(("resources.gpu", {"count": 0}), ("rollout", {"maxUnavailable": 0}))),
        ("gpu-zero-unavailable-with-surge", with_changes(("rollout", {"maxUnavailable": 0, "maxSurge": 1}))),
    ],
)
def test_what_the_new_rules_allow(crd: ControlPlane, namespace: str, case: str, spec: dict[str, Any]) -> None:
    apply(crd, namespace, manifest(case, spec))
    assert get(crd, namespace, case)["metadata"]["name"] == case


def test_name_must_be_a_dns_1035_label(crd: ControlPlane, namespace: str) -> None:
    output = apply(crd, namespace, manifest("7b-model", MINIMAL), check=False)
    assert "metadata.name must be a DNS-1035 label" in output


def test_minimal_llmservice_is_accepted_and_defaulted(crd: ControlPlane, namespace: str) -> None:
    apply(crd, namespace, manifest("minimal", MINIMAL))
    stored = get(crd, namespace, "minimal")
    spec = stored["spec"]
    assert spec["server"] == {
        "imagePullPolicy": "IfNotPresent",
        "workers": 1,
        "maxNumSeqs": 16,
        "maxQueue": 64,
        "prefillChunkTokens": 512,
        "prefixCacheSize": "128Mi",
        "requestTimeoutSeconds": 600,
        "maxRequestSize": "16Mi",
        "requestReadTimeoutSeconds": 30,
        "maxConnections": 1024,
        "drainSeconds": 30,
    }
    assert spec["resources"] == {
        # No typeLabel: unset means the operator's default (chart value gpuTypeLabel).
        "gpu": {"count": 1, "resourceName": "nvidia.com/gpu"},
        "cpu": {"request": "1"},
        "memory": {"request": "4Gi"},
        "shmSize": "1Gi",
        "ephemeralStorage": "20Gi",
    }
    assert spec["model"] == {"source": {"bundled": {}}, "dtype": "auto", "trustRemoteCode": False}
    assert spec["service"] == {"type": "ClusterIP", "port": 8000}
    assert spec["monitoring"] == {"mode": "auto", "interval": "30s"}
    assert "replicas" not in spec
    # What the API server stores is what the operator reads, with the same meaning.
    assert api.parse(stored).spec == api.LLMServiceSpec.model_validate(MINIMAL)


def test_integer_quantities_are_accepted(crd: ControlPlane, namespace: str) -> None:
    spec = with_changes(("resources.memory", {"request": 1073741824, "limit": "2Gi"}), ("resources.cpu", {"request": 2}))
    apply(crd, namespace, manifest("integers", spec))
    stored = get(crd, namespace, "integers")
    assert stored["spec"]["resources"]["memory"]["request"] == 1073741824
    assert api.parse(stored).spec.resources.memory_request == "1073741824"


def example_services() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None and doc.get("kind") == api.KIND:
                found.append((path.name, doc))
    return found


EXAMPLES = example_services()


@pytest.mark.parametrize(("name", "doc"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_example_is_accepted(crd: ControlPlane, namespace: str, name: str, doc: dict[str, Any]) -> None:
    apply(crd, namespace, doc)
    stored = get(crd, namespace, doc["metadata"]["name"])
    assert api.parse(stored).spec == api.LLMServiceSpec.model_validate(doc["spec"])


def test_scale_subresource_sets_replicas_and_respects_autoscaling(crd: ControlPlane, namespace: str) -> None:
    apply(crd, namespace, manifest("fixed", with_changes(("replicas", 1))))
    crd.kubectl("scale", f"{api.PLURAL}/fixed", "-n", namespace, "--replicas=3")
    assert get(crd, namespace, "fixed")["spec"]["replicas"] == 3

    apply(crd, namespace, manifest("unset", MINIMAL))
    result = crd.kubectl("scale", f"{api.PLURAL}/unset", "-n", namespace, "--replicas=2", check=False)
    assert result.returncode == 0, result.stderr
    assert get(crd, namespace, "unset")["spec"]["replicas"] == 2

    apply(crd, namespace, manifest("autoscaled", with_changes(("autoscaling", {"maxReplicas": 3}))))
    result = crd.kubectl("scale", f"{api.PLURAL}/autoscaled", "-n", namespace, "--replicas=2", check=False)
    assert result.returncode != 0
    assert "set spec.replicas or spec.autoscaling, not both" in " ".join(result.stderr.split())


def test_status_and_printer_columns(crd: ControlPlane, namespace: str) -> None:
    # The scale subresource reads .spec.replicas: the API server cannot serve it while that is unset.
    apply(crd, namespace, manifest("shown", with_changes(("replicas", 1))))
    generation = get(crd, namespace, "shown")["metadata"]["generation"]
    status = {
        "observedGeneration": generation,
        "replicas": 2,  # mid-rollout: a surge pod beside the one wanted; DESIRED still shows 1
        "desiredReplicas": 1,
        "readyReplicas": 1,
        "selector": "app.kubernetes.io/instance=shown",
        "url": f"http://shown.{namespace}.svc:8000",
        "model": "SmolLM2-135M-Instruct",
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "ModelServing",
                "message": "1 of 1 replicas serve the model",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
                "observedGeneration": generation,
            }
        ],
    }
    crd.kubectl(
        "patch",
        f"{api.PLURAL}/shown",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )
    table = crd.kubectl("get", "llmsvc", "shown", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert table[0].split() == ["NAME", "MODEL", "READY", "DESIRED", "GPUS", "STATUS", "REASON", "URL", "AGE"]
    assert table[1].split()[:8] == [
        "shown",
        "SmolLM2-135M-Instruct",
        "1",
        "1",
        "1",
        "True",
        "ModelServing",
        status["url"],
    ]
    # `kubectl get llm` lists it through the category.
    assert "shown" in crd.kubectl("get", "llm", "-n", namespace).stdout
    scale = json.loads(crd.kubectl("get", f"{api.PLURAL}/shown", "-n", namespace, "--subresource=scale", "-o", "json").stdout)
    assert scale["spec"] == {"replicas": 1}
    assert scale["status"] == {"replicas": 2, "selector": "app.kubernetes.io/instance=shown"}

    bad = {
        "conditions": [
            {
                "type": "Ready",
                "status": "Maybe",
                "reason": "X",
                "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        ]
    }
    result = crd.kubectl(
        "patch",
        f"{api.PLURAL}/shown",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": bad}),
        check=False,
    )
    assert result.returncode != 0
    assert 'Unsupported value: "Maybe"' in result.stderr


def test_kubectl_explain_teaches_the_fields(crd: ControlPlane) -> None:
    schema = yaml.safe_load(CRD_PATH.read_text(encoding="utf-8"))["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    model = schema["properties"]["spec"]["properties"]["model"]
    first_sentence = " ".join(model["description"].split()).split(". ")[0]

    def explained() -> str:
        result = crd.kubectl("explain", "llmservice.spec.model", check=False)
        return " ".join(result.stdout.split()) if result.returncode == 0 else ""

    # The OpenAPI document the API server publishes picks the new CRD up a few seconds later.
    text = wait_for(explained, 60, "kubectl explain llmservice.spec.model", interval=1)
    assert first_sentence in text
    for field in model["properties"]:
        assert field in text
