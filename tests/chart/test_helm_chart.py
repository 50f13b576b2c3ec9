"""The operator chart: lint, render with the values people use, validate every object.

These tests need the helm binary that scripts/build-cluster-tools.sh builds into the project's
cache. Without it they fail (never skip) and say how to build it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from llmservice_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "llmservice-operator"
BUILD_SCRIPT = ROOT / "scripts" / "build-cluster-tools.sh"
RELEASE = "llmservice"
NAMESPACE = "llmservice-system"
KUBE_VERSION = "1.36.0"
HELM_TIMEOUT = 120

# RBAC the operator needs on namespaced resources (docs/security.md has the same table).
NAMESPACED_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["llmservice.io"], "resources": ["llmservices"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["llmservice.io"], "resources": ["llmservices/status"], "verbs": ["get", "patch", "update"]},
    *(
        {
            "apiGroups": [group],
            "resources": resources,
            "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"],
        }
        for group, resources in (
            ("apps", ["deployments"]),
            ("", ["services"]),
            ("", ["persistentvolumeclaims"]),
            ("batch", ["jobs"]),
            ("autoscaling", ["horizontalpodautoscalers"]),
            ("policy", ["poddisruptionbudgets"]),
            ("monitoring.coreos.com", ["servicemonitors", "podmonitors"]),
        )
    ),
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
]
CRD_RULE = {
    "apiGroups": ["apiextensions.k8s.io"],
    "resources": ["customresourcedefinitions"],
    "verbs": ["get", "list", "watch"],
}
NAMESPACES_RULE = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}


def _cache_bin_dir() -> Path:
    """The directory scripts/build-cluster-tools.sh prints as its last line."""
    text = BUILD_SCRIPT.read_text()
    match = re.search(r'K8S_VERSION="\$\{K8S_VERSION:-(v[0-9.]+)\}"', text)
    assert match, f"cannot read the default K8S_VERSION from {BUILD_SCRIPT}"
    version = os.environ.get("K8S_VERSION", match.group(1))
    cache = Path(os.environ.get("LLMSERVICE_CACHE", Path.home() / ".cache" / "llmservice"))
    return cache / "bin" / f"k8s-{version}"


def find_helm() -> Path | None:
    explicit = os.environ.get("LLMSERVICE_HELM")
    candidates = [Path(explicit)] if explicit else []
    candidates.append(_cache_bin_dir() / "helm")
    on_path = shutil.which("helm")
    if on_path:
        candidates.append(Path(on_path))
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="session")
def helm() -> Path:
    found = find_helm()
    if found is None:
        pytest.fail(
            f"the helm binary is missing (looked in {_cache_bin_dir()}, $LLMSERVICE_HELM and PATH): "
            "bash scripts/build-cluster-tools.sh builds it (its last output line is the directory)",
            pytrace=False,
        )
    return found


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), *args],
        capture_output=True,
        text=True,
        timeout=HELM_TIMEOUT,
        check=False,
        env={**os.environ, "HELM_CACHE_HOME": "/tmp/helm-cache", "HELM_CONFIG_HOME": "/tmp/helm-config"},
    )


def _set_args(values: Mapping[str, str]) -> list[str]:
    """--set for each key; a value starting with "json:" goes through --set-json."""
    args: list[str] = []
    for key, value in values.items():
        if value.startswith("json:"):
            args += ["--set-json", f"{key}={value.removeprefix('json:')}"]
        else:
            args += ["--set", f"{key}={value}"]
    return args


@dataclass(frozen=True)
class Rendered:
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
        return found[0]

    @property
    def kinds(self) -> list[str]:
        return sorted(o["kind"] for o in self.objects)


def render(helm: Path, values: Mapping[str, str] | None = None, chart: Path = CHART) -> Rendered:
    result = run_helm(
        helm,
        "template",
        RELEASE,
        str(chart),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
        *_set_args(values or {}),
    )
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert objects, "helm template rendered nothing"
    return Rendered(objects)


VARIANTS: dict[str, dict[str, str]] = {
    "defaults": {},
    "watch-namespaces": {"watchNamespaces": "{team-a,team-b}"},
    "no-crds": {"crds.enabled": "false"},
    "crds-not-kept": {"crds.keep": "false"},
    "no-rbac-existing-sa": {"rbac.create": "false", "serviceAccount.create": "false", "serviceAccount.name": "ops"},
    "everything-on": {
        "metrics.serviceMonitor.enabled": "true",
        "metrics.serviceMonitor.labels.release": "prometheus",
        "grafanaDashboard.enabled": "true",
        "grafanaDashboard.namespace": "monitoring",
        "replicaCount": "2",
        "priorityClassName": "system-cluster-critical",
        "podAnnotations.example\\.com/team": "ml",
        "nodeSelector.kubernetes\\.io/os": "linux",
        "imagePullSecrets[0].name": "registry",
        "serviceAccount.annotations.example\\.com/role": "operator",
        "tolerations[0].key": "dedicated",
        "tolerations[0].operator": "Exists",
        "tolerations[0].effect": "NoSchedule",
        "affinity": "json:"
        + json.dumps(
            {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]
                    }
                },
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 100,
                            "podAffinityTerm": {
                                "topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "llmservice-operator"}},
                            },
                        }
                    ]
                },
            }
        ),
        "resources": 'json:{"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": 1, "memory": "512Mi"}}',
    },
}


CASES = [pytest.param(values, id=name) for name, values in VARIANTS.items()]


# --- lint -------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", CASES)
def test_helm_lint_is_clean(helm: Path, values: dict[str, str]) -> None:
    result = run_helm(helm, "lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION, *_set_args(values))
    assert result.returncode == 0, f"helm lint failed:\n{result.stdout}\n{result.stderr}"
    assert "0 chart(s) failed" in result.stdout


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "llmservice-operator"
    assert (chart["version"], chart["appVersion"]) == ("0.1.0", "0.1.0")


# --- every object is a valid Kubernetes object ------------------------------------------------


def _newest_supported_version() -> str:
    """1.36 (the control plane the project builds) or, failing that, the newest one known."""
    known = {tuple(int(p) for p in str(v).split(".")[:2]): str(v) for v in kubernetes_validate.utils.all_versions()}
    assert known, "kubernetes_validate knows no Kubernetes versions"
    usable = [v for v in known if v <= (1, 36)] or list(known)
    return known[max(usable)]


VALIDATE_VERSION = _newest_supported_version()


def _check_service_monitor(obj: dict[str, Any]) -> None:
    """kubernetes_validate carries no prometheus-operator schema: check the fields we set."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    spec = obj["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
    assert set(spec["selector"]) == {"matchLabels"}
    assert set(spec["namespaceSelector"]) == {"matchNames"}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval"}
        assert re.fullmatch(r"([0-9]+(ms|s|m|h))+", endpoint["interval"])


@pytest.mark.parametrize("values", CASES)
def test_every_object_is_valid_kubernetes(helm: Path, values: dict[str, str]) -> None:
    rendered = render(helm, values)
    for obj in rendered.objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "ServiceMonitor":
            with pytest.raises(SchemaNotFoundError):
                kubernetes_validate.validate(obj, VALIDATE_VERSION, strict=True)
            _check_service_monitor(obj)
            continue
        try:
            kubernetes_validate.validate(obj, VALIDATE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{where} is not a valid Kubernetes {VALIDATE_VERSION} object: {error.message}")


@pytest.mark.parametrize("values", CASES)
def test_namespaced_objects_live_in_the_release_namespace(helm: Path, values: dict[str, str]) -> None:
    rendered = render(helm, values)
    for kind in ("Deployment", "Service", "ServiceAccount", "ServiceMonitor"):
        for obj in rendered.of_kind(kind):
            assert obj["metadata"]["namespace"] == NAMESPACE, f"{kind} outside the release namespace"


# --- the default render ------------------------------------------------------------------------


def test_default_render(helm: Path) -> None:
    rendered = render(helm)
    assert rendered.kinds == sorted(
        ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"]
    )
    deployment = rendered.one("Deployment")
    assert deployment["spec"]["replicas"] == 1
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/llmservice/llmservice-operator:0.1.0"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LLMSERVICE_OPERATOR_NAMESPACES"] == ""
    assert env["LLMSERVICE_OPERATOR_SERVER_IMAGE"] == "ghcr.io/llmservice/llmservice-server:0.1.0"
    assert env["LLMSERVICE_OPERATOR_LOG_LEVEL"] == "INFO"
    assert env["LLMSERVICE_OPERATOR_WORKERS"] == "8"
    assert env["LLMSERVICE_OPERATOR_RESYNC_SECONDS"] == "600"
    assert env["LLMSERVICE_OPERATOR_CAPACITY_GRACE_SECONDS"] == "900"
    assert env["LLMSERVICE_OPERATOR_GPU_TYPE_LABEL"] == "nvidia.com/gpu.product"
    assert env["LLMSERVICE_OPERATOR_MONITOR_LABELS"] == "{}"
    assert env["LLMSERVICE_OPERATOR_HEALTH_PORT"] == "8080"
    assert env["LLMSERVICE_OPERATOR_METRICS_PORT"] == "9090"
    sa_name = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert rendered.one("ServiceAccount")["metadata"]["name"] == sa_name
    binding = rendered.one("ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": NAMESPACE}]
    assert binding["roleRef"]["name"] == rendered.one("ClusterRole")["metadata"]["name"]


def test_operator_deployment_security(helm: Path) -> None:
    pod = render(helm).one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert isinstance(pod["securityContext"]["runAsUser"], int) and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    assert probe["port"] == "health"


def test_cluster_role_is_least_privilege(helm: Path) -> None:
    rules = render(helm).one("ClusterRole")["rules"]
    assert rules == [*NAMESPACED_RULES, CRD_RULE, NAMESPACES_RULE]
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]


def test_leader_election_is_on_with_a_role_for_its_one_lease(helm: Path) -> None:
    rendered = render(helm)
    container = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    lease_name = env["LLMSERVICE_OPERATOR_LEASE_NAME"]["value"]
    assert env["LLMSERVICE_OPERATOR_LEADER_ELECTION"]["value"] == "true"
    assert env["LLMSERVICE_OPERATOR_LEASE_NAMESPACE"]["value"] == NAMESPACE
    assert env["LLMSERVICE_OPERATOR_LEASE_DURATION_SECONDS"]["value"] == "15"
    assert env["LLMSERVICE_OPERATOR_IDENTITY"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    role = rendered.one("Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [lease_name], "verbs": ["get", "update"]},
    ]
    binding = rendered.one("RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == rendered.one("ServiceAccount")["metadata"]["name"]

    off = render(helm, {"leaderElection.enabled": "false"})
    assert off.of_kind("Role") == [] and off.of_kind("RoleBinding") == []
    container = off.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in container["env"]}["LLMSERVICE_OPERATOR_LEADER_ELECTION"] == "false"


@pytest.mark.parametrize(
    ("value", "label"),
    [
        ("gpu-operator", "nvidia.com/gpu.product"),
        ("gke", "cloud.google.com/gke-accelerator"),
        ("eks-karpenter", "karpenter.k8s.aws/instance-gpu-name"),
        ("example.com/accelerator", "example.com/accelerator"),
    ],
)
def test_gpu_type_label_presets_and_monitor_labels_reach_the_operator(
    helm: Path, monkeypatch: pytest.MonkeyPatch, value: str, label: str
) -> None:
    rendered = render(helm, {"gpuTypeLabel": value, "monitorLabels.release": "kube-prometheus-stack"})
    container = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LLMSERVICE_OPERATOR_GPU_TYPE_LABEL"] == label
    for name, setting in env.items():
        if name.startswith("LLMSERVICE_OPERATOR_") and setting is not None:
            monkeypatch.setenv(name, setting)
    settings = OperatorSettings()
    assert (settings.gpu_type_label, settings.monitor_labels) == (label, {"release": "kube-prometheus-stack"})


def test_metrics_service_selects_the_operator(helm: Path) -> None:
    rendered = render(helm)
    service = rendered.one("Service")
    pod_labels = rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]


def test_crd_is_installed_and_kept_by_default(helm: Path) -> None:
    crd = render(helm).one("CustomResourceDefinition")
    assert crd["metadata"]["name"] == "llmservices.llmservice.io"
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


# --- variants ------------------------------------------------------------------------------------


def test_watch_namespaces_uses_roles(helm: Path) -> None:
    rendered = render(helm, VARIANTS["watch-namespaces"])
    roles = {r["metadata"]["namespace"]: r for r in rendered.of_kind("Role") if not r["metadata"]["name"].endswith("-leader-election")}
    bindings = {
        b["metadata"]["namespace"]: b for b in rendered.of_kind("RoleBinding") if not b["metadata"]["name"].endswith("-leader-election")
    }
    assert sorted(roles) == sorted(bindings) == ["team-a", "team-b"]
    sa_name = rendered.one("ServiceAccount")["metadata"]["name"]
    for namespace, role in roles.items():
        assert role["rules"] == NAMESPACED_RULES
        binding = bindings[namespace]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": NAMESPACE}]
    # The only cluster-wide grant is reading CRDs: nothing namespaced, not even namespaces.
    assert rendered.one("ClusterRole")["rules"] == [CRD_RULE]
    assert rendered.one("ClusterRoleBinding")["roleRef"]["name"] == rendered.one("ClusterRole")["metadata"]["name"]
    container = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LLMSERVICE_OPERATOR_NAMESPACES"] == "team-a,team-b"


def test_crds_disabled_renders_no_crd(helm: Path) -> None:
    rendered = render(helm, VARIANTS["no-crds"])
    assert rendered.of_kind("CustomResourceDefinition") == []
    assert rendered.one("Deployment")


def test_crds_not_kept(helm: Path) -> None:
    crd = render(helm, VARIANTS["crds-not-kept"]).one("CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in crd["metadata"]["annotations"]


def test_rbac_off_and_existing_service_account(helm: Path) -> None:
    rendered = render(helm, VARIANTS["no-rbac-existing-sa"])
    assert not {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & set(rendered.kinds)
    assert rendered.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


def test_existing_service_account_needs_a_name(helm: Path) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION, "--set", "serviceAccount.create=false")
    assert result.returncode != 0
    assert "serviceAccount.name must name an existing ServiceAccount" in result.stderr


def test_service_monitor_and_dashboard(helm: Path) -> None:
    rendered = render(helm, VARIANTS["everything-on"])
    monitor = rendered.one("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    service = rendered.one("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    dashboard = rendered.one("ConfigMap")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["llmservice.json"]) == json.loads((CHART / "dashboards" / "llmservice.json").read_text())
    deployment = rendered.one("Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["spec"]["priorityClassName"] == "system-cluster-critical"
    assert deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": 1, "memory": "512Mi"}


def test_values_override_images(helm: Path) -> None:
    rendered = render(helm, {"image.tag": "dev", "serverImage": "registry.local/server:cpu", "logLevel": "DEBUG"})
    container = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/llmservice/llmservice-operator:dev"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LLMSERVICE_OPERATOR_SERVER_IMAGE"] == "registry.local/server:cpu"
    assert env["LLMSERVICE_OPERATOR_LOG_LEVEL"] == "DEBUG"
    assert env["LLMSERVICE_OPERATOR_PROBE_PODS"] == "true"  # on by default where the chart runs it


def test_values_tune_the_reconciler_and_the_operator_reads_them(helm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rendered = render(helm, {"reconcileWorkers": "32", "resyncSeconds": "0", "capacityGraceSeconds": "120", "probePods": "false"})
    container = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert (env["LLMSERVICE_OPERATOR_WORKERS"], env["LLMSERVICE_OPERATOR_RESYNC_SECONDS"]) == ("32", "0")
    assert env["LLMSERVICE_OPERATOR_PROBE_PODS"] == "false"
    assert env["LLMSERVICE_OPERATOR_CAPACITY_GRACE_SECONDS"] == "120"
    # The rendered variables are the operator's own settings, read as the operator reads them.
    for name, value in env.items():
        if name.startswith("LLMSERVICE_OPERATOR_") and value is not None:  # None: from the downward API
            monkeypatch.setenv(name, value)
    settings = OperatorSettings()
    assert (settings.workers, settings.resync_seconds, settings.capacity_grace_seconds, settings.probe_pods) == (32, 0.0, 120.0, False)


# --- the schema rejects typos and nonsense ----------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({"imagee.tag": "x"}, id="top-level-typo"),
        pytest.param({"crds.enable": "false"}, id="nested-typo"),
        pytest.param({"metrics.serviceMonitor.enabeld": "true"}, id="deep-typo"),
        pytest.param({"grafanaDashboard.label.x": "1"}, id="dashboard-typo"),
    ],
)
def test_schema_rejects_unknown_keys(helm: Path, values: dict[str, str]) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), *_set_args(values))
    assert result.returncode != 0, "a misspelt key was accepted"
    assert "additional properties" in result.stderr.lower() or "additionalproperties" in result.stderr.lower(), result.stderr


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({"logLevel": "LOUD"}, id="log-level-enum"),
        pytest.param({"image.pullPolicy": "Sometimes"}, id="pull-policy-enum"),
        pytest.param({"replicaCount": "-1"}, id="negative-replicas"),
        pytest.param({"reconcileWorkers": "0"}, id="no-workers"),
        pytest.param({"resyncSeconds": "-5"}, id="negative-resync"),
        pytest.param({"watchNamespaces": "{Not_A_Namespace}"}, id="namespace-name"),
        pytest.param({"metrics.serviceMonitor.interval": "soon"}, id="interval"),
    ],
)
def test_schema_rejects_bad_values(helm: Path, values: dict[str, str]) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), *_set_args(values))
    assert result.returncode != 0, f"{values} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr


def _object_schemas(schema: Any, path: str = "$") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(schema, dict):
        if "properties" in schema:
            yield path, schema
        for key, value in schema.items():
            yield from _object_schemas(value, f"{path}.{key}")
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            yield from _object_schemas(value, f"{path}[{index}]")


def test_schema_closes_every_object() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    closed = list(_object_schemas(schema))
    assert len(closed) > 10
    for path, node in closed:
        assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"


def _value_keys(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{prefix}{key}"
            if isinstance(value, dict) and value:
                yield from _value_keys(value, f"{prefix}{key}.")


def test_every_value_is_in_the_schema() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    for dotted in _value_keys(values):
        node = schema
        for part in dotted.split("."):
            properties = node.get("properties")
            if properties is None:  # a free-form map (labels, requests, ...)
                break
            assert part in properties, f"values.yaml key {dotted} is not in values.schema.json"
            node = properties[part]


def _schema_node(schema: dict[str, Any], dotted: str) -> dict[str, Any] | None:
    """The schema of a chart key, or None for a key inside a free-form map (labels, requests)."""
    node = schema
    for part in dotted.split("."):
        properties = node.get("properties")
        if properties is None or part not in properties:
            return None
        node = properties[part]
    return node


def test_every_value_is_documented() -> None:
    """Each chart key in values.yaml has a comment line right above it."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    undocumented: list[str] = []
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z_][\w.-]*):", line)
        if match is None:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        dotted = ".".join(k for _, k in stack)
        if _schema_node(schema, dotted) is None:
            continue
        if not (index and lines[index - 1].strip().startswith("#")):
            undocumented.append(dotted)
    assert undocumented == [], f"values.yaml keys without a comment right above them: {undocumented}"


def test_replica_count_is_explained() -> None:
    text = (CHART / "values.yaml").read_text()
    for phrase in ("server-side apply", "field manager", "converge", "duplicate API traffic", "1 is recommended"):
        assert phrase in text, f"values.yaml does not explain replicaCount ({phrase!r})"


# --- the dashboard ------------------------------------------------------------------------------


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def test_dashboard_plots_each_llmservice() -> None:
    dashboard = json.loads((CHART / "dashboards" / "llmservice.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "llmservice", "model"} <= variables.keys()
    assert "llmservice_io_name" in variables["llmservice"]["query"]["query"]
    assert "model_name" in variables["model"]["query"]["query"]
    exprs = _exprs(dashboard)
    wanted = [
        r"rate\(vllm:generation_tokens_total\{",
        r"rate\(vllm:request_success_total\{",
        r"histogram_quantile\(0\.5, .*vllm:time_to_first_token_seconds_bucket",
        r"histogram_quantile\(0\.99, .*vllm:time_to_first_token_seconds_bucket",
        r"histogram_quantile\(0\.5, .*vllm:e2e_request_latency_seconds_bucket",
        r"histogram_quantile\(0\.99, .*vllm:e2e_request_latency_seconds_bucket",
        r"vllm:num_requests_waiting\{",
        r"vllm:num_requests_running\{",
        r"llmservice:requests_rejected_total\{.*by \(.*reason|by \(.*reason.*llmservice:requests_rejected_total\{",
        r"kube_deployment_status_replicas_available\{",
    ]
    for pattern in wanted:
        assert any(re.search(pattern, e) for e in exprs), f"no panel plots {pattern}"
    for expr in exprs:
        assert '$namespace"' in expr, f"panel query ignores the namespace variable: {expr}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_selectors_are_balanced() -> None:
    for expr in _exprs(json.loads((CHART / "dashboards" / "llmservice.json").read_text())):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr


# --- a CRD whose text contains template braces survives the template engine ------------------


def test_crd_braces_survive_helm(helm: Path, tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_chart_crd_for_helm", ROOT / "scripts" / "sync-chart-crd.py")
    assert spec is not None and spec.loader is not None
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    description = 'Uses {{ .Values.image }} and {{- "quoted" }} literally; }} too.'
    source: dict[str, Any] = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "names": {"kind": "Widget", "plural": "widgets"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "description": description}},
                }
            ],
        },
    }
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    for stale in (chart / "templates" / "crds").glob("*.yaml"):
        stale.unlink()
    (chart / "templates" / "crds" / "widgets.yaml").write_text(sync.render_template(yaml.safe_dump(source), "crds/widgets.yaml"))
    crd = render(helm, {}, chart=chart).one("CustomResourceDefinition")
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert schema["description"] == description
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def _render_notes(helm: Path, tmp_path: Path, values: Mapping[str, str]) -> str:
    """NOTES.txt as `helm install` prints it (helm template skips NOTES, install needs a cluster).

    A copy of the chart renders the same text through `tpl` into a ConfigMap.
    """
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "notes.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "zz-notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n'
    )
    rendered = render(helm, values, chart=chart)
    notes = [o for o in rendered.of_kind("ConfigMap") if o["metadata"]["name"] == "notes"]
    assert len(notes) == 1
    return str(notes[0]["data"]["notes"])


def test_notes_tell_the_next_command(helm: Path, tmp_path: Path) -> None:
    notes = _render_notes(helm, tmp_path, {})
    assert "kubectl apply -f examples/minimal-cpu.yaml" in notes
    assert (ROOT / "examples" / "minimal-cpu.yaml").is_file(), "NOTES.txt points at an example that does not exist"
    assert "kubectl get llmsvc" in notes
    assert f"installed in namespace {NAMESPACE} and watches every namespace." in notes
    assert "rollout status deployment/llmservice-llmservice-operator" in notes
    assert "crds.enabled is false" not in notes


def test_notes_follow_the_values(helm: Path, tmp_path: Path) -> None:
    notes = _render_notes(helm, tmp_path, {"watchNamespaces": "{team-a,team-b}", "crds.enabled": "false"})
    assert "watches the namespaces team-a, team-b." in notes
    assert "crds.enabled is false" in notes


# --- docs/security.md tells the truth about RBAC ----------------------------------------------


def _docs_rbac_table(marker: str) -> list[dict[str, list[str]]]:
    text = (ROOT / "docs" / "security.md").read_text()
    match = re.search(rf"<!-- rbac-table: {marker} -->\n(.*?)<!-- /rbac-table -->", text, re.DOTALL)
    assert match, f"docs/security.md has no rbac-table: {marker} block"
    rules: list[dict[str, list[str]]] = []
    for row in match.group(1).strip().splitlines()[2:]:
        group, resources, verbs = (cell.strip() for cell in row.strip("|").split("|")[:3])
        rules.append(
            {
                "apiGroups": ["" if group.startswith("core") else group.strip("`")],
                "resources": [r.strip().strip("`") for r in resources.split(",")],
                "verbs": [v.strip() for v in verbs.split(",")],
            }
        )
    return rules


def test_security_doc_rbac_table_matches_the_chart(helm: Path) -> None:
    assert _docs_rbac_table("namespaced") == NAMESPACED_RULES
    assert _docs_rbac_table("cluster") == [CRD_RULE, NAMESPACES_RULE]
    cluster_role = render(helm).one("ClusterRole")["rules"]
    assert cluster_role == _docs_rbac_table("namespaced") + _docs_rbac_table("cluster")
