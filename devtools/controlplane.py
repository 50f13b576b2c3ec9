"""A local Kubernetes control plane for end-to-end tests, without Docker.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler run as plain processes bound to
127.0.0.1 on free ports; kwok plays the kubelets of fake GPU nodes, so pods bound to them go
Running and Ready. Every process is started in its own process group, recorded in the state
directory with its start time, and stopping kills exactly those groups.

Binaries come from ``scripts/build-cluster-tools.sh`` (fast when cached). This module uses the
standard library only (and `devtools.waiting`), so it also runs as a command::

    python -m devtools.controlplane up --state-dir DIR          # or scripts/cluster up
    python -m devtools.controlplane env --state-dir DIR         # KUBECONFIG=...
    python -m devtools.controlplane add-node NAME --gpus 8 --state-dir DIR
    python -m devtools.controlplane remove-node NAME --state-dir DIR
    python -m devtools.controlplane down --state-dir DIR
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from devtools.waiting import WaitTimeout, wait_for

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

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-cluster-tools.sh"
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
)

GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GPU_PRODUCT = "NVIDIA-A100"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_STATUS_ANNOTATION = "kwok.x-k8s.io/status"
FAKE_NODE_VALUE = "fake"
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
CLUSTER_NAME = "llmservice-e2e"
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.1/16"
NODE_IP = "10.240.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"

# Controllers that need a cloud or real networking; everything else (garbage collector,
# deployment, replicaset, HPA, namespace, service accounts and their tokens, disruption, node
# lifecycle -- which lifts the not-ready taint off fresh nodes -- ...) runs.
DISABLED_CONTROLLERS = (
    "cloud-node-lifecycle-controller",
    "node-ipam-controller",
    "node-route-controller",
    "service-lb-controller",
)

LOG_TAIL_LINES = 40
PORT_CLASH_ATTEMPTS = 3

T = TypeVar("T")


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started, or used."""


class ComponentFailed(ControlPlaneError):
    """A component exited or did not become healthy in time; the message carries its log tail."""


class CommandError(subprocess.CalledProcessError):
    """A kubectl/helm/openssl command failed; its string shows the command and its output."""

    def __str__(self) -> str:
        command = shlex.join(str(part) for part in self.cmd)
        return (
            f"{command} exited with {self.returncode}\n--- stdout ---\n{_tail_text(self.stdout)}\n--- stderr ---\n{_tail_text(self.stderr)}"
        )


@dataclass(frozen=True)
class _Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int

    @classmethod
    def allocate(cls) -> _Ports:
        """Pick six distinct free loopback ports (all held open until every one is chosen)."""
        with contextlib.ExitStack() as stack:
            ports: list[int] = []
            for _ in range(6):
                sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                sock.bind(("127.0.0.1", 0))
                ports.append(int(sock.getsockname()[1]))
        return cls(*ports)


@dataclass(frozen=True)
class _ProcessRecord:
    """A process we started: its pid (also its process group) and kernel start time."""

    name: str
    pid: int
    start_ticks: int

    def is_running(self) -> bool:
        stat = _proc_stat(self.pid)
        return stat is not None and stat[19] == str(self.start_ticks) and stat[0] != "Z"

    def owns_group(self) -> bool:
        stat = _proc_stat(self.pid)
        return stat is not None and stat[19] == str(self.start_ticks) and stat[2] == str(self.pid)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, ...]."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def _tail_text(text: object, lines: int = LOG_TAIL_LINES) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    if not isinstance(text, str) or not text.strip():
        return "(empty)"
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _tail_file(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return _tail_text(path.read_bytes(), lines)
    except OSError as error:
        return f"(cannot read {path}: {error})"


def _run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    check: bool = True,
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        list(argv),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else dict(env),
        check=False,
    )
    if check and completed.returncode != 0:
        raise CommandError(completed.returncode, list(argv), completed.stdout, completed.stderr)
    return completed


_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
[dn]
[ext_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[ext_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = @server_names
authorityKeyIdentifier = keyid
[ext_client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
[server_names]
DNS.1 = localhost
DNS.2 = kubernetes
DNS.3 = kubernetes.default
DNS.4 = kubernetes.default.svc
DNS.5 = kubernetes.default.svc.cluster.local
IP.1 = 127.0.0.1
IP.2 = 10.96.0.1
"""


def _generate_pki(pki: Path) -> None:
    """CAs, the API server's serving cert, client certs and a service-account key pair.

    ``ca`` signs the serving cert and the admin client cert (CN admin, O system:masters);
    ``front-proxy-ca`` signs the client cert the API server presents to aggregated API servers.
    EC P-256 keys throughout: generating them takes milliseconds.
    """
    pki.mkdir(parents=True, exist_ok=True)
    config = pki / "openssl.cnf"
    config.write_text(_OPENSSL_CONFIG)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        _run(["openssl", *args], timeout=30)

    for ca, subject in (("ca", "/CN=llmservice-e2e-ca"), ("front-proxy-ca", "/CN=llmservice-e2e-front-proxy-ca")):
        openssl(
            "req", "-x509", "-new", *ec, "-keyout", str(pki / f"{ca}.key"), "-out", str(pki / f"{ca}.crt"),
            "-days", "3650", "-subj", subject, "-config", str(config), "-extensions", "ext_ca",
        )  # fmt: skip
    leaves = {
        "apiserver": ("ca", "/CN=kube-apiserver", "ext_server"),
        "admin": ("ca", "/O=system:masters/CN=admin", "ext_client"),
        "front-proxy-client": ("front-proxy-ca", "/CN=front-proxy-client", "ext_client"),
    }
    for name, (ca, subject, extensions) in leaves.items():
        csr = pki / f"{name}.csr"
        openssl(
            "req", "-new", *ec, "-keyout", str(pki / f"{name}.key"), "-out", str(csr),
            "-subj", subject, "-config", str(config),
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(pki / f"{ca}.crt"),
            "-CAkey", str(pki / f"{ca}.key"), "-set_serial", f"0x{secrets.token_hex(16)}",
            "-days", "365", "-out", str(pki / f"{name}.crt"),
            "-extfile", str(config), "-extensions", extensions,
        )  # fmt: skip
        csr.unlink()
    openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-out", str(pki / "sa.key"),
    )  # fmt: skip
    openssl("pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))


def gpu_node_manifest(name: str, gpus: int, *, product: str = DEFAULT_GPU_PRODUCT) -> dict[str, Any]:
    """A fake node managed by kwok: 32 cpu, 256Gi memory, 110 pods and ``gpus`` nvidia.com/gpu."""
    resources = {
        "cpu": "32",
        "memory": "256Gi",
        "pods": "110",
        "ephemeral-storage": "1Ti",
        GPU_RESOURCE: str(gpus),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {FAKE_NODE_ANNOTATION: FAKE_NODE_VALUE},
            "labels": {
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "node.kubernetes.io/instance-type": f"fake-gpu-{gpus}x",
                "nvidia.com/gpu.count": str(gpus),
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": product,
                "type": "kwok",
            },
        },
        "spec": {},
        "status": {
            "allocatable": resources,
            "capacity": resources,
        },
    }


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok, on loopback.

    ``ControlPlane()`` uses a fresh temporary state directory (removed by :meth:`stop`);
    ``ControlPlane(state_dir)`` uses the given one (kept). :meth:`attach` reconnects to one a
    previous process started (the command-line ``env``/``down``).
    """

    def __init__(
        self,
        state_dir: Path | None = None,
        *,
        bin_dir: Path | None = None,
        gpu_nodes: int = 2,
        gpus_per_node: int = 4,
        gpu_product: str = DEFAULT_GPU_PRODUCT,
        start_timeout: float = 90.0,
    ) -> None:
        self._owns_state_dir = state_dir is None
        self.state_dir: Path = Path(tempfile.mkdtemp(prefix="llmservice-cluster-")) if state_dir is None else state_dir.resolve()
        self._bin_dir = bin_dir
        self.gpu_node_names: tuple[str, ...] = tuple(f"gpu-node-{i}" for i in range(gpu_nodes))
        self._gpus_per_node = gpus_per_node
        self._gpu_product = gpu_product
        self._start_timeout = start_timeout
        self._ports: _Ports | None = None
        self._records: dict[str, _ProcessRecord] = {}
        self._popens: dict[str, subprocess.Popen[bytes]] = {}
        self.started_in: float | None = None

    # -- paths and addresses -------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    def log_path(self, component: str) -> Path:
        return self.logs_dir / f"{component}.log"

    @property
    def server(self) -> str:
        if self._ports is None:
            raise ControlPlaneError("the control plane has not been started")
        return f"https://127.0.0.1:{self._ports.apiserver}"

    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            self._bin_dir = self._obtain_binaries()
        return self._bin_dir

    @property
    def _state_file(self) -> Path:
        return self.state_dir / "state.json"

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        """Start every component and wait until the nodes are Ready; raise with logs if not."""
        began = time.monotonic()
        for attempt in range(1, PORT_CLASH_ATTEMPTS + 1):
            self._prepare_state_dir()
            bin_dir = self.bin_dir
            try:
                self._launch(bin_dir)
            except ComponentFailed as error:
                self._terminate()
                # A free port picked here can be taken (by anyone's outgoing connection) before
                # the component binds it; that alone is worth another try with fresh ports.
                if "address already in use" not in str(error) or attempt == PORT_CLASH_ATTEMPTS:
                    raise
                log.warning("port clash, starting again with other ports: %s", error)
            except ControlPlaneError:
                self._terminate()
                raise
            except Exception as error:
                self._terminate()
                raise ControlPlaneError(f"starting the control plane in {self.state_dir} failed: {error}") from error
            except BaseException:
                self._terminate()
                raise
            else:
                break
        self.started_in = time.monotonic() - began
        log.info("control plane ready at %s in %.1fs (state %s)", self.server, self.started_in, self.state_dir)
        return self

    def _launch(self, bin_dir: Path) -> None:
        _generate_pki(self.pki_dir)
        self._ports = _Ports.allocate()
        self._write_kubeconfig()
        self._save_state()
        self._start_etcd(bin_dir)
        self._start_apiserver(bin_dir)
        self._spawn("kube-controller-manager", self._controller_manager_argv(bin_dir))
        self._spawn("kube-scheduler", self._scheduler_argv(bin_dir))
        self._spawn("kwok", self._kwok_argv(bin_dir))
        for name in self.gpu_node_names:
            self._create_node(gpu_node_manifest(name, self._gpus_per_node, product=self._gpu_product))
        self._wait_healthy("kube-controller-manager", self._https_probe("controller_manager"))
        self._wait_healthy("kube-scheduler", self._https_probe("scheduler"))
        self._wait_healthy("kwok", self._http_probe(self._port("kwok"), "/healthz"))
        self._wait_nodes_schedulable(self.gpu_node_names, component="kwok")
        self._wait_healthy(
            "kube-controller-manager",
            lambda: self._api_exists("/api/v1/namespaces/default/serviceaccounts/default"),
            what="the default ServiceAccount (service account controller)",
        )

    def stop(self, *, keep_state: bool = False) -> None:
        """Kill the process groups this control plane started; remove a temporary state dir."""
        self._terminate()
        if self._owns_state_dir and not keep_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    @classmethod
    def attach(cls, state_dir: Path) -> ControlPlane:
        """A handle on a control plane started earlier (possibly by another process)."""
        plane = cls(state_dir)
        try:
            state = json.loads(plane._state_file.read_text())
        except (OSError, ValueError) as error:
            raise ControlPlaneError(f"no control plane state in {state_dir}: {error}") from error
        plane._bin_dir = Path(state["bin_dir"])
        plane._ports = _Ports(**state["ports"])
        plane.gpu_node_names = tuple(state["gpu_node_names"])
        plane._records = {name: _ProcessRecord(name, int(rec["pid"]), int(rec["start_ticks"])) for name, rec in state["processes"].items()}
        return plane

    def is_running(self) -> bool:
        return any(record.is_running() for record in self._records.values())

    # -- clients -------------------------------------------------------------------------------

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        as_user: str | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl as the admin (or impersonating ``as_user``) against this control plane."""
        argv = [
            str(self.bin_dir / "kubectl"),
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.state_dir / 'kube-cache'}",
        ]
        if as_user is not None:
            argv.append(f"--as={as_user}")
        return _run([*argv, *args], input=input, check=check, timeout=timeout)

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run helm against this control plane, with its config/cache/data inside the state dir."""
        helm_home = self.state_dir / "helm"
        env = {
            **os.environ,
            "HELM_CACHE_HOME": str(helm_home / "cache"),
            "HELM_CONFIG_HOME": str(helm_home / "config"),
            "HELM_DATA_HOME": str(helm_home / "data"),
            "KUBECONFIG": str(self.kubeconfig),
        }
        argv = [str(self.bin_dir / "helm"), f"--kubeconfig={self.kubeconfig}", *args]
        return _run(argv, check=check, timeout=timeout, env=env)

    def add_gpu_node(
        self,
        name: str,
        gpus: int,
        *,
        product: str = DEFAULT_GPU_PRODUCT,
        timeout: float = 60,
    ) -> None:
        """Register a fake node with ``gpus`` GPUs and wait until it is Ready and schedulable."""
        self._create_node(gpu_node_manifest(name, gpus, product=product))
        self._wait_nodes_schedulable((name,), component="kwok", timeout=timeout)

    def remove_node(self, name: str, *, timeout: float = 60) -> None:
        """Delete a node and wait until it is gone (pods bound to it are left to pod GC)."""
        self.kubectl("delete", "node", name, "--ignore-not-found", "--wait=true", f"--timeout={timeout:g}s")

    # -- internals: state ----------------------------------------------------------------------

    def _obtain_binaries(self) -> Path:
        override = os.environ.get("LLMSERVICE_CLUSTER_BIN")
        if override:
            bin_dir = Path(override)
        else:
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            build_log = self.log_path("build-cluster-tools")
            log.info("obtaining binaries via %s (the first build takes ~20 min; log %s)", BUILD_SCRIPT.name, build_log)
            with build_log.open("wb") as stderr:
                completed = subprocess.run(
                    ["bash", str(BUILD_SCRIPT)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    check=False,
                )
            lines = completed.stdout.decode(errors="replace").strip().splitlines()
            if completed.returncode != 0 or not lines:
                raise ControlPlaneError(
                    f"{BUILD_SCRIPT} failed with exit code {completed.returncode} (log {build_log}):\n{_tail_file(build_log)}"
                )
            bin_dir = Path(lines[-1])
        missing = [name for name in BINARIES if not os.access(bin_dir / name, os.X_OK)]
        if missing:
            raise ControlPlaneError(f"missing executables in {bin_dir}: {', '.join(missing)}")
        return bin_dir

    def _prepare_state_dir(self) -> None:
        if self._state_file.exists():
            previous = ControlPlane.attach(self.state_dir)
            if previous.is_running():
                raise ControlPlaneError(f"a control plane from {self.state_dir} is still running; stop it first")
        for stale in ("etcd", "pki", "logs", "kube-cache", "helm", "certs", "kubeconfig", "state.json"):
            path = self.state_dir / stale
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        self.logs_dir.mkdir(parents=True)
        self._records = {}
        self._popens = {}

    def _save_state(self) -> None:
        assert self._ports is not None
        state = {
            "bin_dir": str(self.bin_dir),
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "ports": vars(self._ports),
            "gpu_node_names": list(self.gpu_node_names),
            "processes": {name: {"pid": rec.pid, "start_ticks": rec.start_ticks} for name, rec in self._records.items()},
        }
        scratch = self._state_file.with_suffix(".tmp")
        scratch.write_text(json.dumps(state, indent=2, sort_keys=True))
        scratch.replace(self._state_file)

    def _write_kubeconfig(self) -> None:
        def b64(name: str) -> str:
            return base64.b64encode((self.pki_dir / name).read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": CLUSTER_NAME,
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": b64("ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate-data": b64("admin.crt"),
                        "client-key-data": b64("admin.key"),
                    },
                }
            ],
            "contexts": [
                {
                    "name": CLUSTER_NAME,
                    "context": {"cluster": CLUSTER_NAME, "user": "admin", "namespace": "default"},
                }
            ],
            "current-context": CLUSTER_NAME,
            "preferences": {},
        }
        self.kubeconfig.write_text(json.dumps(config, indent=2))
        self.kubeconfig.chmod(0o600)

    # -- internals: processes ------------------------------------------------------------------

    def _port(self, component: str) -> int:
        assert self._ports is not None
        return int(getattr(self._ports, component))

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        with self.log_path(name).open("ab") as log_file:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                start_new_session=True,
            )
        stat = _proc_stat(popen.pid)
        start_ticks = int(stat[19]) if stat is not None else 0
        self._popens[name] = popen
        self._records[name] = _ProcessRecord(name, popen.pid, start_ticks)
        self._save_state()
        log.info("started %s (pid %d)", name, popen.pid)

    def _terminate(self, grace: float = 5.0) -> None:
        """Stop the recorded process groups in stages: clients, then the API server, then etcd.

        Each stage gets SIGTERM and ``grace`` seconds, then SIGKILL. (Terminating everything at
        once leaves the API server waiting on a dying etcd for many seconds.)
        """
        servers = ("kube-apiserver", "etcd")
        clients = [name for name in self._records if name not in servers]
        stages = [clients, *([name] for name in servers if name in self._records)]
        for stage in stages:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
                for name in stage:
                    record = self._records[name]
                    if record.owns_group():
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(record.pid, sig)
                if self._all_exited(stage, wait):
                    break
        survivors = [name for name in self._records if self._records[name].is_running()]
        if survivors:
            raise ControlPlaneError(f"could not stop: {', '.join(survivors)}")

    def _all_exited(self, names: Sequence[str], grace: float) -> bool:
        def exited() -> bool:
            for popen in self._popens.values():
                popen.poll()  # reap our own children so they do not linger as zombies
            return not any(self._records[name].is_running() for name in names)

        try:
            wait_for(exited, grace, "the control plane processes to exit", interval=0.05)
        except WaitTimeout:
            return False
        return True

    def _check_alive(self, name: str) -> None:
        popen = self._popens.get(name)
        code = popen.poll() if popen is not None else None
        record = self._records.get(name)
        if code is not None or (record is not None and not record.is_running()):
            raise ComponentFailed(
                f"{name} exited (code {code}) while the control plane was starting; "
                f"log {self.log_path(name)}, last lines:\n{_tail_file(self.log_path(name))}"
            )

    def _wait_healthy(
        self,
        name: str,
        probe: Callable[[], bool],
        *,
        what: str | None = None,
        timeout: float | None = None,
    ) -> None:
        began = time.monotonic()
        limit = self._start_timeout if timeout is None else timeout

        def healthy() -> bool:
            self._check_alive(name)
            return probe()

        try:
            wait_for(
                healthy,
                limit,
                what or f"{name} to become healthy",
                interval=0.1,
                ignore=(OSError, urllib.error.URLError, ValueError, CommandError),
            )
        except WaitTimeout as timeout_error:
            raise ComponentFailed(f"{timeout_error}; log {self.log_path(name)}, last lines:\n{_tail_file(self.log_path(name))}") from None
        log.info("waited %.1fs for %s", time.monotonic() - began, what or f"{name} to become healthy")

    def _start_etcd(self, bin_dir: Path) -> None:
        client = f"http://127.0.0.1:{self._port('etcd_client')}"
        peer = f"http://127.0.0.1:{self._port('etcd_peer')}"
        self._spawn(
            "etcd",
            [
                str(bin_dir / "etcd"),
                f"--name={CLUSTER_NAME}",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster={CLUSTER_NAME}={peer}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )

        def etcd_health() -> bool:
            body = self._http_get(f"{client}/health")
            return bool(json.loads(body).get("health") == "true")

        self._wait_healthy("etcd", etcd_health)

    def _start_apiserver(self, bin_dir: Path) -> None:
        pki = self.pki_dir
        self._spawn(
            "kube-apiserver",
            [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self._port('etcd_client')}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self._port('apiserver')}",
                f"--cert-dir={self.state_dir / 'certs' / 'apiserver'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                # The only address is loopback, which Endpoints may not hold; nothing in this
                # cluster dials the kubernetes Service anyway.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
            ],
        )
        self._wait_healthy("kube-apiserver", lambda: self._api_get("/readyz") == "ok")

    def _component_common_argv(self, name: str, port: int) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.state_dir / 'certs' / name}",
            "--leader-elect=false",
        ]

    def _controller_manager_argv(self, bin_dir: Path) -> list[str]:
        pki = self.pki_dir
        controllers = ",".join(["*", *(f"-{name}" for name in DISABLED_CONTROLLERS)])
        return [
            str(bin_dir / "kube-controller-manager"),
            *self._component_common_argv("kube-controller-manager", self._port("controller_manager")),
            f"--controllers={controllers}",
            f"--cluster-name={CLUSTER_NAME}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--horizontal-pod-autoscaler-sync-period=5s",
        ]

    def _scheduler_argv(self, bin_dir: Path) -> list[str]:
        return [
            str(bin_dir / "kube-scheduler"),
            *self._component_common_argv("kube-scheduler", self._port("scheduler")),
        ]

    def _kwok_argv(self, bin_dir: Path) -> list[str]:
        config = self.state_dir / "kwok.json"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
                    "kind": "KwokConfiguration",
                    # A test that plays the kubelet (a crash loop, a termination message) annotates
                    # its pod so that kwok leaves the status it writes alone.
                    "options": {"disregardStatusWithAnnotationSelector": f"{KWOK_STATUS_ANNOTATION}=custom"},
                }
            )
        )
        return [
            str(bin_dir / "kwok"),
            f"--config={config}",
            f"--kubeconfig={self.kubeconfig}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}={FAKE_NODE_VALUE}",
            f"--cidr={POD_CIDR}",
            f"--node-ip={NODE_IP}",
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{self._port('kwok')}",
        ]

    # -- internals: HTTP -----------------------------------------------------------------------

    def _http_get(self, url: str, context: ssl.SSLContext | None = None) -> str:
        return self._http_request(urllib.request.Request(url), context)

    def _http_request(self, request: urllib.request.Request, context: ssl.SSLContext | None = None) -> str:
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        opener = urllib.request.build_opener(*handlers)
        with opener.open(request, timeout=5) as response:
            return str(response.read().decode())

    def _create_node(self, manifest: dict[str, Any]) -> None:
        """POST a Node straight to the API server (no kubectl process, no discovery round trips)."""
        request = urllib.request.Request(
            f"{self.server}/api/v1/nodes",
            data=json.dumps(manifest).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            self._http_request(request, self._admin_context())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise ControlPlaneError(f"creating node {manifest['metadata']['name']} failed: {error}: {detail}") from None

    def _admin_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki_dir / "ca.crt"))
        context.load_cert_chain(self.pki_dir / "admin.crt", self.pki_dir / "admin.key")
        return context

    def _api_get(self, path: str) -> str:
        return self._http_get(f"{self.server}{path}", self._admin_context())

    def _api_json(self, path: str) -> Any:
        return json.loads(self._api_get(path))

    def _api_exists(self, path: str) -> bool:
        try:
            self._api_get(path)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return False
            raise
        return True

    def _http_probe(self, port: int, path: str) -> Callable[[], bool]:
        return lambda: self._http_get(f"http://127.0.0.1:{port}{path}").strip() == "ok"

    def _https_probe(self, component: str) -> Callable[[], bool]:
        # These components serve a self-signed certificate of their own making.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        port = self._port(component)
        return lambda: self._http_get(f"https://127.0.0.1:{port}/healthz", context) == "ok"

    def _wait_nodes_schedulable(self, names: Sequence[str], *, component: str, timeout: float | None = None) -> None:
        def schedulable() -> bool:
            for name in names:
                node = self._api_json(f"/api/v1/nodes/{name}")
                conditions = node.get("status", {}).get("conditions", [])
                ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
                taints = node.get("spec", {}).get("taints", [])
                if not ready or any(t["key"] == NOT_READY_TAINT for t in taints):
                    return False
            return True

        self._wait_healthy(
            component,
            schedulable,
            what=f"node(s) {', '.join(names)} to be Ready without the not-ready taint",
            timeout=timeout,
        )


@contextlib.contextmanager
def _cli_errors() -> Iterator[None]:
    try:
        yield
    except (ControlPlaneError, CommandError) as error:
        log.error("%s", error)
        raise SystemExit(1) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="controlplane", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "up": "start a control plane and leave it running",
        "down": "stop the control plane started from STATE_DIR",
        "env": "print KUBECONFIG=... (and the binaries' directory) for a running control plane",
        "add-node": "add a fake GPU node and wait until it is schedulable",
        "remove-node": "delete a node",
    }
    parsers = {name: sub.add_parser(name, help=text) for name, text in commands.items()}
    for sub_parser in parsers.values():
        sub_parser.add_argument("--state-dir", type=Path, required=True)
    parsers["up"].add_argument("--gpu-nodes", type=int, default=2)
    parsers["up"].add_argument("--gpus-per-node", type=int, default=4)
    parsers["up"].add_argument("--timeout", type=float, default=90.0)
    parsers["add-node"].add_argument("name")
    parsers["add-node"].add_argument("--gpus", type=int, required=True)
    parsers["add-node"].add_argument("--product", default=DEFAULT_GPU_PRODUCT)
    parsers["remove-node"].add_argument("name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[cluster] %(message)s", stream=sys.stderr)

    with _cli_errors():
        state_dir: Path = args.state_dir
        if args.command == "up":
            state_dir.mkdir(parents=True, exist_ok=True)
            plane = ControlPlane(
                state_dir,
                gpu_nodes=args.gpu_nodes,
                gpus_per_node=args.gpus_per_node,
                start_timeout=args.timeout,
            ).start()
            sys.stdout.write(f"KUBECONFIG={shlex.quote(str(plane.kubeconfig))}\n")
        elif args.command == "down":
            ControlPlane.attach(state_dir).stop()
        elif args.command == "env":
            plane = ControlPlane.attach(state_dir)
            if not plane.is_running():
                raise ControlPlaneError(f"the control plane from {state_dir} is not running")
            sys.stdout.write(f"KUBECONFIG={shlex.quote(str(plane.kubeconfig))}\n")
            sys.stdout.write(f"LLMSERVICE_CLUSTER_BIN={shlex.quote(str(plane.bin_dir))}\n")
        elif args.command == "add-node":
            ControlPlane.attach(state_dir).add_gpu_node(args.name, args.gpus, product=args.product)
        elif args.command == "remove-node":
            ControlPlane.attach(state_dir).remove_node(args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
