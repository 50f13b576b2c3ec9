"""Namespaced mode end to end: the chart's Role-per-namespace RBAC, two watched namespaces, a third ignored."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from devtools.controlplane import ControlPlane
from devtools.operator_harness import CHART, OperatorProcess, apply_manifest, get_json
from devtools.waiting import assert_stays, wait_for
from tests.e2e.test_operator import llmservice, wait_ready

RELEASE = "scoped"
RELEASE_NAMESPACE = "llmservice-scoped"
SERVICE_ACCOUNT = "llmservice-scoped-operator"
CPU_ONLY = {"gpu": {"count": 0}, "memory": {"limit": "2Gi"}}


@pytest.fixture
def namespaces(cluster: ControlPlane, chart: None) -> Iterator[tuple[str, str, str]]:
    """Two namespaces the scoped release watches and a third it does not, with the release installed."""
    suffix = secrets.token_hex(3)
    names = (f"e2e-team-a-{suffix}", f"e2e-team-b-{suffix}", f"e2e-other-{suffix}")
    for name in names:
        cluster.kubectl("create", "namespace", name)
    # The CRD belongs to the session's cluster-wide release; this one brings only an operator and its RBAC.
    cluster.helm(
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        RELEASE_NAMESPACE,
        "--create-namespace",
        "--set",
        f"serviceAccount.name={SERVICE_ACCOUNT}",
        "--set",
        "replicaCount=0",
        "--set",
        "crds.enabled=false",
        "--set",
        f"watchNamespaces={{{names[0]},{names[1]}}}",
        "--wait",
        "--timeout",
        "120s",
    )
    try:
        yield names
    finally:
        cluster.helm("uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, check=False)
        for name in names:
            cluster.kubectl("delete", "namespace", name, "--ignore-not-found", "--wait=false")


def kubeconfig_for(cluster: ControlPlane, path: Path) -> Path:
    token = cluster.kubectl("create", "token", SERVICE_ACCOUNT, "-n", RELEASE_NAMESPACE, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    entry = admin["clusters"][0]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [entry],
                "users": [{"name": SERVICE_ACCOUNT, "user": {"token": token}}],
                "contexts": [{"name": "scoped", "context": {"cluster": entry["name"], "user": SERVICE_ACCOUNT}}],
                "current-context": "scoped",
            }
        )
    )
    return path


def can(cluster: ControlPlane, verb: str, resource: str, namespace: str) -> bool:
    answer = cluster.kubectl(
        "auth", "can-i", verb, resource, "-n", namespace, f"--as=system:serviceaccount:{RELEASE_NAMESPACE}:{SERVICE_ACCOUNT}", check=False
    )
    return answer.stdout.strip() == "yes"


def test_two_watched_namespaces_are_served_and_a_third_is_ignored(
    cluster: ControlPlane, namespaces: tuple[str, str, str], tmp_path: Path
) -> None:
    team_a, team_b, other = namespaces
    assert can(cluster, "patch", "deployments.apps", team_a) and can(cluster, "patch", "deployments.apps", team_b)
    assert not can(cluster, "list", "deployments.apps", other), "the scoped operator must have no rights elsewhere"
    assert not can(cluster, "list", "llmservices.llmservice.io", other)

    role = next(
        r for r in get_json(cluster, "roles", "-n", RELEASE_NAMESPACE)["items"] if r["metadata"]["name"].endswith("-leader-election")
    )
    lease_name = next(rule["resourceNames"][0] for rule in role["rules"] if "resourceNames" in rule)
    operator = OperatorProcess(
        kubeconfig_for(cluster, tmp_path / "kubeconfig"),
        tmp_path / "operator.log",
        env={
            "LLMSERVICE_OPERATOR_NAMESPACES": f"{team_a},{team_b}",
            "LLMSERVICE_OPERATOR_LEADER_ELECTION": "true",
            "LLMSERVICE_OPERATOR_LEASE_NAME": lease_name,
            "LLMSERVICE_OPERATOR_LEASE_NAMESPACE": RELEASE_NAMESPACE,
        },
    )
    try:
        operator.start()
        for namespace in namespaces:
            apply_manifest(cluster, llmservice("chat", namespace, resources=CPU_ONLY))
        for namespace in (team_a, team_b):
            obj = wait_ready(cluster, operator, "chat", namespace)
            assert obj["status"]["url"] == f"http://chat.{namespace}.svc:8000"
        # The ignored one has had as long as both served ones; three seconds more, and still nothing.
        assert_stays(
            lambda: "status" not in get_json(cluster, "llmsvc", "chat", "-n", other),
            3,
            "no status on an LLMService outside the watched namespaces",
        )
        assert cluster.kubectl("get", "deployment", "chat", "-n", other, check=False).returncode != 0
        assert "Forbidden" not in operator.log_path.read_text(), operator.log_tail()
    finally:
        operator.stop()
    wait_for(lambda: not operator.running, 5, "the operator to stop")
