"""Two operator processes with leader election on the chart's Lease: one acts; kill -9 it and the other takes over."""

from __future__ import annotations

import time
from pathlib import Path

from devtools.controlplane import ControlPlane
from devtools.operator_harness import (
    SYSTEM_NAMESPACE,
    OperatorProcess,
    apply_manifest,
    get_json,
    service_account_kubeconfig,
)
from devtools.waiting import wait_for
from tests.e2e.test_operator import llmservice, wait_ready

TAKEOVER_SECONDS = 30  # the bound; a 15 s Lease hands over in about 17 s
LEADER = "llmservice_operator_leader"
RECONCILES = "llmservice_operator_reconciles_total"
CPU_ONLY = {"gpu": {"count": 0}, "memory": {"limit": "2Gi"}}


def chart_lease_name(cluster: ControlPlane) -> str:
    """The one Lease the chart's Role lets the operator write."""
    roles = get_json(cluster, "roles", "-n", SYSTEM_NAMESPACE)["items"]
    role = next(r for r in roles if r["metadata"]["name"].endswith("-leader-election"))
    names: list[str] = next(rule["resourceNames"] for rule in role["rules"] if "resourceNames" in rule)
    return names[0]


def test_one_of_two_operators_acts_and_a_killed_leader_is_replaced(
    cluster: ControlPlane, chart: None, namespace: str, tmp_path: Path
) -> None:
    lease_name = chart_lease_name(cluster)
    kubeconfig = service_account_kubeconfig(cluster, tmp_path / "kubeconfig")
    settings = {
        "LLMSERVICE_OPERATOR_LEADER_ELECTION": "true",
        "LLMSERVICE_OPERATOR_LEASE_NAME": lease_name,
        "LLMSERVICE_OPERATOR_LEASE_NAMESPACE": SYSTEM_NAMESPACE,
        "LLMSERVICE_OPERATOR_LEASE_DURATION_SECONDS": "15",
    }
    processes = {
        identity: OperatorProcess(kubeconfig, tmp_path / f"{identity}.log", env={**settings, "LLMSERVICE_OPERATOR_IDENTITY": identity})
        for identity in ("operator-a", "operator-b")
    }
    try:
        for process in processes.values():
            process.start()
        wait_for(lambda: sum(p.metric(LEADER) for p in processes.values()) == 1, TAKEOVER_SECONDS, "exactly one leader")
        leader_id = next(identity for identity, p in processes.items() if p.metric(LEADER) == 1)
        leader = processes[leader_id]
        standby_id, standby = next((i, p) for i, p in processes.items() if i != leader_id)
        lease = get_json(cluster, "lease", lease_name, "-n", SYSTEM_NAMESPACE)
        assert lease["spec"]["holderIdentity"] == leader_id

        apply_manifest(cluster, llmservice("first", namespace, resources=CPU_ONLY))
        wait_ready(cluster, leader, "first", namespace)
        assert leader.metric(RECONCILES) > 0
        assert standby.metric(RECONCILES) == 0, "the standby must not reconcile"
        assert standby.metric(LEADER) == 0

        leader.kill()
        killed = time.monotonic()
        wait_for(lambda: standby.metric(LEADER) == 1, TAKEOVER_SECONDS, f"{standby_id} to take over the Lease")
        took = time.monotonic() - killed
        lease = get_json(cluster, "lease", lease_name, "-n", SYSTEM_NAMESPACE)
        assert lease["spec"]["holderIdentity"] == standby_id
        assert lease["spec"]["leaseTransitions"] >= 1

        apply_manifest(cluster, llmservice("second", namespace, resources=CPU_ONLY))
        wait_ready(cluster, standby, "second", namespace, timeout=TAKEOVER_SECONDS)
        assert took < TAKEOVER_SECONDS, f"took over after {took:.1f} s"
        print(f"leader election: {standby_id} took over {took:.1f} s after kill -9 of {leader_id}")  # noqa: T201 - -s output
    finally:
        for process in processes.values():
            process.stop()


def test_a_stopped_leader_hands_over_at_once(cluster: ControlPlane, chart: None, tmp_path: Path) -> None:
    lease_name = chart_lease_name(cluster)
    kubeconfig = service_account_kubeconfig(cluster, tmp_path / "kubeconfig")
    settings = {
        "LLMSERVICE_OPERATOR_LEADER_ELECTION": "true",
        "LLMSERVICE_OPERATOR_LEASE_NAME": lease_name,
        "LLMSERVICE_OPERATOR_LEASE_NAMESPACE": SYSTEM_NAMESPACE,
    }
    first = OperatorProcess(kubeconfig, tmp_path / "first.log", env={**settings, "LLMSERVICE_OPERATOR_IDENTITY": "first"})
    second = OperatorProcess(kubeconfig, tmp_path / "second.log", env={**settings, "LLMSERVICE_OPERATOR_IDENTITY": "second"})
    try:
        first.start()
        # The previous test's killed leader may still hold the Lease until it expires.
        wait_for(lambda: first.metric(LEADER) == 1, TAKEOVER_SECONDS, "the first operator to lead")
        second.start()
        first.stop()  # SIGTERM: a clean shutdown releases the Lease
        stopped = time.monotonic()
        wait_for(lambda: second.metric(LEADER) == 1, TAKEOVER_SECONDS, "the second operator to lead")
        assert time.monotonic() - stopped < 10, "a released Lease must not be waited out"
    finally:
        first.stop()
        second.stop()
