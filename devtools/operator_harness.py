"""Run the real operator process against the local control plane, as the chart's ServiceAccount.

The chart is installed with Helm; the operator then runs on this machine (kwok pods do not run
containers) with a kubeconfig holding a token of the chart's ServiceAccount, so a permission the
chart forgot fails the test exactly as it would fail in a cluster.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from devtools import prometheus
from devtools.controlplane import ControlPlane
from devtools.ports import free_port
from devtools.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "llmservice-operator"
RELEASE = "llmservice"
SYSTEM_NAMESPACE = "llmservice-system"
SERVICE_ACCOUNT = "llmservice-operator"


def helm_install(cluster: ControlPlane, *extra: str, chart: Path = CHART, verb: str = "install") -> None:
    cluster.helm(
        verb,
        RELEASE,
        str(chart),
        "--namespace",
        SYSTEM_NAMESPACE,
        "--create-namespace",
        "--set",
        f"serviceAccount.name={SERVICE_ACCOUNT}",
        "--set",
        "replicaCount=0",
        "--wait",
        "--timeout",
        "120s",
        *extra,
    )


def service_account_kubeconfig(cluster: ControlPlane, path: Path) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount with a fresh token."""
    token = cluster.kubectl("create", "token", SERVICE_ACCOUNT, "-n", SYSTEM_NAMESPACE, "--duration=4h").stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    cluster_entry = admin["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster_entry],
        "users": [{"name": SERVICE_ACCOUNT, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster_entry["name"], "user": SERVICE_ACCOUNT}}],
        "current-context": "operator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


class OperatorProcess:
    """`llmservice-operator` as a child process, with its log kept for failure messages."""

    def __init__(
        self,
        kubeconfig: Path,
        log_path: Path,
        *,
        watch_timeout: int = 20,
        resync_seconds: float | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.watch_timeout = watch_timeout
        self.resync_seconds = resync_seconds  # None: the operator's default
        self.env = dict(env or {})  # more LLMSERVICE_OPERATOR_* settings
        self.health_port = free_port()
        self.metrics_port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The operator's process id (it runs in its own session); for benchmarks reading /proc."""
        if self._process is None:
            raise RuntimeError("the operator has not been started")
        return self._process.pid

    def start(self) -> None:
        env = {
            **os.environ,
            "LLMSERVICE_OPERATOR_SERVER_IMAGE": "registry.local/llmservice-server:e2e",
            "LLMSERVICE_OPERATOR_HEALTH_PORT": str(self.health_port),
            "LLMSERVICE_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "LLMSERVICE_OPERATOR_WATCH_TIMEOUT_SECONDS": str(self.watch_timeout),
            "LLMSERVICE_OPERATOR_LOG_LEVEL": "INFO",
        }
        if self.resync_seconds is not None:
            env["LLMSERVICE_OPERATOR_RESYNC_SECONDS"] = str(self.resync_seconds)
        env.update(self.env)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "llmservice_operator.main", "--kubeconfig", str(self.kubeconfig)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        wait_for(self._healthy, 60, f"the operator's /healthz (log: {self.log_path})")

    def _healthy(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise AssertionError(f"the operator exited with {self._process.returncode}:\n{self.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", self.health_port), timeout=1):
                return True
        except OSError:
            return False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye, like a node dying."""
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(10)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples (those with these labels) from the operator's /metrics."""
        return prometheus.total(prometheus.scrape(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5), name, **labels)


def get_json(cluster: ControlPlane, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)
    return result


def apply_manifest(cluster: ControlPlane, manifest: dict[str, Any], *, manager: str = "gitops") -> str:
    return cluster.kubectl("apply", "--server-side", f"--field-manager={manager}", "-f", "-", input=yaml.safe_dump(manifest)).stdout


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for entry in (obj.get("status") or {}).get("conditions") or []:
        if entry.get("type") == kind:
            return dict(entry)
    return {}
