"""The operator, as a process with the chart's RBAC, against a real API server with kwok nodes."""

from __future__ import annotations

import copy
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devtools.controlplane import ControlPlane
from devtools.operator_harness import (
    CHART,
    SYSTEM_NAMESPACE,
    OperatorProcess,
    apply_manifest,
    condition,
    get_json,
    helm_install,
    service_account_kubeconfig,
)
from devtools.waiting import assert_stays, wait_for

CHILD_KINDS = ("deployment", "service", "horizontalpodautoscaler", "poddisruptionbudget")
READY_TIMEOUT = 90
# Far shorter than the default, so every test runs with resyncs going on and the idle one sees several.
RESYNC_SECONDS = 5
# How long a GPU pod may wait for a node before InsufficientGPU: 15 minutes by default, seconds here.
CAPACITY_GRACE_SECONDS = 20
API_REQUESTS = "llmservice_operator_api_requests_total"


@pytest.fixture(scope="module")
def operator(cluster: ControlPlane, chart: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    workdir = tmp_path_factory.mktemp("operator")
    process = OperatorProcess(
        service_account_kubeconfig(cluster, workdir / "kubeconfig"),
        workdir / "operator.log",
        resync_seconds=RESYNC_SECONDS,
        env={"LLMSERVICE_OPERATOR_CAPACITY_GRACE_SECONDS": str(CAPACITY_GRACE_SECONDS)},
    )
    process.start()
    yield process
    process.stop()


def llmservice(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"source": {"bundled": {}}},
        "resources": {"gpu": {"count": 1}, "memory": {"limit": "2Gi"}},
    }
    body.update(spec)
    return {"apiVersion": "llmservice.io/v1alpha1", "kind": "LLMService", "metadata": {"name": name, "namespace": namespace}, "spec": body}


def wait_ready(
    cluster: ControlPlane, operator: OperatorProcess, name: str, namespace: str, timeout: float = READY_TIMEOUT
) -> dict[str, Any]:
    def ready() -> bool:
        obj = get_json(cluster, "llmsvc", name, "-n", namespace)
        return condition(obj, "Ready").get("status") == "True" and obj["status"].get("observedGeneration") == obj["metadata"]["generation"]

    try:
        wait_for(ready, timeout, f"LLMService {namespace}/{name} to become Ready")
    except Exception as error:
        obj = get_json(cluster, "llmsvc", name, "-n", namespace)
        raise AssertionError(f"{error}\nstatus: {obj.get('status')}\noperator log:\n{operator.log_tail()}") from error
    return get_json(cluster, "llmsvc", name, "-n", namespace)


def children(cluster: ControlPlane, namespace: str, name: str) -> dict[str, list[dict[str, Any]]]:
    found = {}
    for kind in CHILD_KINDS:
        items = get_json(cluster, kind, "-n", namespace, "-l", f"llmservice.io/name={name}")["items"]
        found[kind] = items
    return found


def versions(cluster: ControlPlane, namespace: str, name: str) -> dict[str, str]:
    seen = {f"llmservice/{name}": get_json(cluster, "llmsvc", name, "-n", namespace)["metadata"]["resourceVersion"]}
    for kind, items in children(cluster, namespace, name).items():
        for item in items:
            seen[f"{kind}/{item['metadata']['name']}"] = item["metadata"]["resourceVersion"]
    return seen


def wait_settled(cluster: ControlPlane, namespace: str, name: str, quiet: float = 3.0, timeout: float = 60.0) -> dict[str, str]:
    """The versions of an LLMService and its children once none has changed for `quiet` seconds."""
    last = {"versions": versions(cluster, namespace, name), "since": time.monotonic()}

    def quiet_for_long_enough() -> dict[str, str] | None:
        now = versions(cluster, namespace, name)
        if now != last["versions"]:
            last.update(versions=now, since=time.monotonic())
            return None
        return now if time.monotonic() - float(last["since"]) >= quiet else None  # type: ignore[arg-type]

    settled: dict[str, str] = wait_for(quiet_for_long_enough, timeout, f"LLMService {namespace}/{name} to settle", interval=0.5)
    return settled


def test_helm_installed_the_crd_and_rbac(cluster: ControlPlane, chart: None) -> None:
    crd = get_json(cluster, "crd", "llmservices.llmservice.io")
    assert condition(crd, "Established").get("status") == "True"
    assert cluster.kubectl("get", "serviceaccount", "llmservice-operator", "-n", SYSTEM_NAMESPACE).returncode == 0
    can = cluster.kubectl(
        "auth",
        "can-i",
        "patch",
        "deployments.apps",
        "-n",
        "default",
        "--as=system:serviceaccount:llmservice-system:llmservice-operator",
        check=False,
    )
    assert can.stdout.strip() == "yes"
    cannot = cluster.kubectl(
        "auth",
        "can-i",
        "delete",
        "secrets",
        "-n",
        "default",
        "--as=system:serviceaccount:llmservice-system:llmservice-operator",
        check=False,
    )
    assert cannot.stdout.strip() == "no", "the operator must not be able to touch secrets"


def test_helm_upgrade_updates_the_crd(cluster: ControlPlane, chart: None, tmp_path: Path) -> None:
    changed = tmp_path / "chart"
    shutil.copytree(CHART, changed)
    crd_file = changed / "templates" / "crds" / "llmservice.io_llmservices.yaml"
    text = crd_file.read_text()
    marker = "e2e-upgrade-marker"
    # An extra short name is a visible, harmless change to the CRD.
    line = next(line for line in text.splitlines() if line.strip() == "- llmsvc")
    crd_file.write_text(text.replace(line, f"{line}\n{line.replace('llmsvc', marker)}", 1))
    helm_install(cluster, chart=changed, verb="upgrade")
    try:
        crd = get_json(cluster, "crd", "llmservices.llmservice.io")
        assert marker in crd["spec"]["names"]["shortNames"], "helm upgrade must upgrade the CRD"
    finally:
        helm_install(cluster, verb="upgrade")
    assert marker not in get_json(cluster, "crd", "llmservices.llmservice.io")["spec"]["names"]["shortNames"]


def test_llmservice_gets_its_children_and_becomes_ready(cluster: ControlPlane, operator: OperatorProcess, namespace: str) -> None:
    apply_manifest(
        cluster,
        llmservice("chat", namespace, server={"maxNumSeqs": 8, "drainSeconds": 20}, autoscaling={"minReplicas": 1, "maxReplicas": 3}),
    )
    obj = wait_ready(cluster, operator, "chat", namespace)
    assert obj["status"]["url"] == f"http://chat.{namespace}.svc:8000"
    assert obj["status"]["selector"] == "app.kubernetes.io/name=llmservice-server,llmservice.io/name=chat"

    deployment = get_json(cluster, "deployment", "chat", "-n", namespace)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"memory": "2Gi", "nvidia.com/gpu": "1"}
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LLMSERVICE_MAX_NUM_SEQS"] == "8" and env["LLMSERVICE_DRAIN_SECONDS"] == "20"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    owner = deployment["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("LLMService", "chat", True)
    assert get_json(cluster, "service", "chat", "-n", namespace)["spec"]["ports"][0]["port"] == 8000
    hpa = get_json(cluster, "hpa", "chat", "-n", namespace)
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 3)
    # No custom-metrics adapter in this cluster: the status must say the HPA cannot act.
    assert condition(obj, "Degraded")["reason"] == "MetricsAPIMissing"

    def announced() -> bool:
        events = get_json(cluster, "events.events.k8s.io", "-n", namespace)["items"]
        return any(e["regarding"]["kind"] == "LLMService" and e["reason"] == "Available" for e in events)

    wait_for(announced, 30, "a Normal Event saying the LLMService is Available")

    table = cluster.kubectl("get", "llmsvc", "-n", namespace, "-o", "wide").stdout
    header = table.splitlines()[0]
    for column in ("MODEL", "READY", "GPUS", "URL", "AGE"):
        assert column in header, f"printer column {column} missing from:\n{table}"
    assert "SmolLM2-135M-Instruct" in table


def test_scale_subresource_and_hpa_owned_replicas(cluster: ControlPlane, operator: OperatorProcess, namespace: str) -> None:
    apply_manifest(cluster, llmservice("fixed", namespace, resources={"gpu": {"count": 0}, "memory": {"limit": "2Gi"}}))
    wait_ready(cluster, operator, "fixed", namespace)
    cluster.kubectl("scale", "llmsvc", "fixed", "-n", namespace, "--replicas=3")
    wait_for(
        lambda: get_json(cluster, "deployment", "fixed", "-n", namespace)["spec"]["replicas"] == 3,
        60,
        "the Deployment to follow kubectl scale llmsvc",
    )
    obj = wait_ready(cluster, operator, "fixed", namespace)
    assert obj["status"]["readyReplicas"] == 3
    assert get_json(cluster, "pdb", "fixed", "-n", namespace)["spec"]["maxUnavailable"] == 1

    apply_manifest(
        cluster,
        llmservice(
            "auto",
            namespace,
            autoscaling={"minReplicas": 1, "maxReplicas": 4, "metric": "cpu"},
            resources={"gpu": {"count": 0}, "memory": {"limit": "2Gi"}},
        ),
    )
    wait_ready(cluster, operator, "auto", namespace)
    # What the HPA controller does: write the Deployment's replicas through the scale subresource.
    cluster.kubectl("scale", "deployment", "auto", "-n", namespace, "--replicas=2")
    wait_ready(cluster, operator, "auto", namespace)
    # A wrongly-fighting operator would revert it within a reconcile; it has five seconds of them.
    assert_stays(
        lambda: get_json(cluster, "deployment", "auto", "-n", namespace)["spec"]["replicas"] == 2, 5, "the replicas the HPA's scale wrote"
    )


def test_drift_is_repaired_and_deletion_collects_children(cluster: ControlPlane, operator: OperatorProcess, namespace: str) -> None:
    apply_manifest(cluster, llmservice("drift", namespace))
    wait_ready(cluster, operator, "drift", namespace)
    cluster.kubectl("set", "image", "deployment/drift", "server=evil/image:1", "-n", namespace)
    wait_for(
        lambda: (
            get_json(cluster, "deployment", "drift", "-n", namespace)["spec"]["template"]["spec"]["containers"][0]["image"]
            == "registry.local/llmservice-server:e2e"
        ),
        60,
        "the edited image to be put back",
    )
    cluster.kubectl("delete", "service", "drift", "-n", namespace)
    wait_for(
        lambda: cluster.kubectl("get", "service", "drift", "-n", namespace, check=False).returncode == 0,
        60,
        "the deleted Service to be recreated",
    )

    cluster.kubectl("delete", "llmsvc", "drift", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for(lambda: not any(children(cluster, namespace, "drift").values()), 60, "the garbage collector to delete the children")


def test_sigkill_mid_reconcile_converges_to_one_of_each(cluster: ControlPlane, operator: OperatorProcess, namespace: str) -> None:
    for index in range(5):
        apply_manifest(
            cluster, llmservice(f"burst-{index}", namespace, replicas=2, resources={"gpu": {"count": 0}, "memory": {"limit": "2Gi"}})
        )
    wait_for(lambda: any(children(cluster, namespace, "burst-0").values()), 30, "the operator to start writing children")
    operator.kill()  # in the middle of the burst: some LLMServices have children, some not yet
    operator.start()
    for index in range(5):
        wait_ready(cluster, operator, f"burst-{index}", namespace)
        found = children(cluster, namespace, f"burst-{index}")
        assert {kind: len(items) for kind, items in found.items()} == {
            "deployment": 1,
            "service": 1,
            "horizontalpodautoscaler": 0,
            "poddisruptionbudget": 1,
        }


def test_more_gpus_than_any_node_says_so_then_recovers(cluster: ControlPlane, operator: OperatorProcess, namespace: str) -> None:
    apply_manifest(cluster, llmservice("big", namespace, resources={"gpu": {"count": 8}, "memory": {"limit": "2Gi"}}))

    def reason_is(reason: str) -> Any:
        return lambda: condition(get_json(cluster, "llmsvc", "big", "-n", namespace), "Ready").get("reason") == reason

    # First a wait a cluster autoscaler may end: progress, not degradation.
    wait_for(reason_is("WaitingForCapacity"), 60, "the status to report WaitingForCapacity")
    obj = get_json(cluster, "llmsvc", "big", "-n", namespace)
    assert "nvidia.com/gpu" in condition(obj, "Ready")["message"]
    assert condition(obj, "Degraded")["status"] == "False"
    assert (condition(obj, "Reconciling")["status"], condition(obj, "Stalled")["status"]) == ("True", "False")
    # Past the grace period, with no event to wake the operator, it says the wait failed.
    wait_for(reason_is("InsufficientGPU"), CAPACITY_GRACE_SECONDS + 30, "the status to report InsufficientGPU")
    obj = get_json(cluster, "llmsvc", "big", "-n", namespace)
    assert "nvidia.com/gpu" in condition(obj, "Ready")["message"]
    assert (condition(obj, "Degraded")["status"], condition(obj, "Stalled")["status"]) == ("True", "True")
    cluster.add_gpu_node("e2e-big-gpu-node", gpus=8)
    try:
        wait_ready(cluster, operator, "big", namespace, timeout=120)
    finally:
        cluster.kubectl("delete", "llmsvc", "big", "-n", namespace, "--wait=true", "--timeout=60s", check=False)
        cluster.remove_node("e2e-big-gpu-node")


def test_gitops_reapply_changes_nothing_and_spec_is_never_written(cluster: ControlPlane, operator: OperatorProcess, namespace: str) -> None:
    manifest = llmservice("git", namespace, replicas=2)
    apply_manifest(cluster, manifest)
    wait_ready(cluster, operator, "git", namespace)
    before = wait_settled(cluster, namespace, "git")
    generation = get_json(cluster, "llmsvc", "git", "-n", namespace)["metadata"]["generation"]
    apply_manifest(cluster, copy.deepcopy(manifest))
    assert_stays(lambda: versions(cluster, namespace, "git") == before, 5, "re-applying the same manifest changing nothing")
    after = get_json(cluster, "llmsvc", "git", "-n", namespace, "--show-managed-fields")
    assert after["metadata"]["generation"] == generation
    managers = {entry["manager"]: entry for entry in after["metadata"]["managedFields"]}
    operator_fields = [e for e in after["metadata"]["managedFields"] if e["manager"] == "llmservice-operator"]
    assert all(e.get("subresource") == "status" for e in operator_fields), managers
    assert "f:spec" in str(managers["gitops"]["fieldsV1"])


def test_settled_llmservice_sees_no_writes_across_resyncs(cluster: ControlPlane, operator: OperatorProcess, namespace: str) -> None:
    apply_manifest(cluster, llmservice("quiet", namespace, replicas=2))
    wait_ready(cluster, operator, "quiet", namespace)
    before = wait_settled(cluster, namespace, "quiet")
    log_before = operator.log_path.read_text(errors="replace")
    lists_before = operator.metric(API_REQUESTS, verb="list", code="200")
    window = float(os.environ.get("LLMSERVICE_E2E_IDLE_SECONDS", "75"))
    # Watch timeouts (20 s each) and resyncs (every 5 s) happen meanwhile.
    assert_stays(lambda: versions(cluster, namespace, "quiet") == before, window, "zero writes to a settled LLMService", interval=5.0)
    assert operator.metric(API_REQUESTS, verb="list", code="200") > lists_before, "no resync ran"
    # Other tests' namespaces are still being deleted, so the operator as a whole may write: this one's lines only.
    during = operator.log_path.read_text(errors="replace")[len(log_before) :]
    writes = re.findall(rf"^.*(?:Applied|Pruned|Deleted) \w+ {re.escape(namespace)}/.*$", during, flags=re.M)
    assert not writes, f"the operator wrote to a settled LLMService's children: {writes}"
