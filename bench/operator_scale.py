"""The operator at scale: N LLMServices on the local control plane (kube-apiserver + kwok nodes).

For each size N it starts a fresh control plane, installs the chart, runs the real operator as the
chart's ServiceAccount, creates N CPU-only LLMServices in batches (server-side apply, sent by
this process over one HTTP/1.1 connection pool, or by `kubectl apply` processes), and records:

- per object, the time from creation to its Deployment existing and to ``Ready=True`` (p50/p99),
  and the time until the last one is Ready;
- the operator's API requests by verb (its ``llmservice_operator_api_requests_total``), per
  LLMService, with the writes split into child applies, status applies and Events;
- writes during an idle window (resourceVersions of every LLMService and child before/after, and
  the operator's own request counters), with at least one watch restart inside the window, then
  a deleted child re-created to show the watches still work;
- the operator's RSS and CPU seconds, the control plane's CPU seconds for context, and this
  harness's own (creating, watching), which shares the same cores.

It never fails on a missed target: it writes the numbers to bench/results/ and prints a table.

    .venv/bin/python -m bench.operator_scale --sizes 10 100 1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from devtools import prometheus
from devtools.controlplane import ControlPlane, gpu_node_manifest
from devtools.operator_harness import OperatorProcess, helm_install, service_account_kubeconfig
from devtools.waiting import WaitTimeout, wait_for
from prometheus_client import CollectorRegistry

from bench.plots import pyplot
from llmservice_operator.kube import Kube, http_client, load_credentials
from llmservice_operator.metrics import OperatorMetrics

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench.operator_scale")

RESULTS_DIR = REPO / "bench" / "results"
NAME_LABEL = "llmservice.io/name"
CHILD_KINDS = ("deployments", "services", "horizontalpodautoscalers", "poddisruptionbudgets")
OTHER_KINDS = ("replicasets", "pods")
WRITE_VERBS = ("apply", "delete", "create")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL = 0.5
COMMAND = (".venv/bin/python", "-m", "bench.operator_scale")
TARGETS = {
    "ready_all_seconds_at_1000": 120.0,
    "writes_per_new_llmservice": 5.0,
    "idle_writes": 0,
    "rss_mb_at_1000": 200.0,
}


# -- the cluster -------------------------------------------------------------------------------


class BenchControlPlane(ControlPlane):
    """The test control plane, optionally with a higher client QPS for kube-controller-manager.

    kube-controller-manager's default client limit (20 QPS, burst 30) paces the Deployment and
    ReplicaSet controllers: with several of their writes per new Deployment, that limit rather than
    the operator would be the bottleneck at N=1000. ``controller_qps`` raises it so the operator is what is measured.
    """

    def __init__(self, state_dir: Path, *, controller_qps: int, gpu_nodes: int) -> None:
        super().__init__(state_dir, gpu_nodes=gpu_nodes, gpus_per_node=0)
        self.controller_qps = controller_qps

    def _controller_manager_argv(self, bin_dir: Path) -> list[str]:
        argv = super()._controller_manager_argv(bin_dir)
        if self.controller_qps > 0:
            argv += [f"--kube-api-qps={self.controller_qps}", f"--kube-api-burst={2 * self.controller_qps}"]
        return argv

    def component_pids(self) -> dict[str, int]:
        state = json.loads((self.state_dir / "state.json").read_text())
        return {name: int(record["pid"]) for name, record in state["processes"].items()}


def cpu_node_manifest(name: str, pods: int) -> dict[str, Any]:
    """A kwok node without GPUs, sized for ``pods`` pods of 1 cpu / 1Gi each (and some slack)."""
    node = gpu_node_manifest(name, 0)
    capacity = {"cpu": str(pods + 8), "memory": f"{2 * pods}Gi", "pods": str(pods), "ephemeral-storage": "10Ti"}
    node["status"]["capacity"] = dict(capacity)
    node["status"]["allocatable"] = dict(capacity)
    labels: dict[str, str] = node["metadata"]["labels"]
    for key in [key for key in labels if key.startswith("nvidia.com/")]:
        del labels[key]
    labels["node.kubernetes.io/instance-type"] = "fake-cpu"
    return node


def add_nodes(cluster: ControlPlane, count: int, pods: int, timeout: float = 120) -> list[str]:
    names = [f"cpu-node-{i}" for i in range(count)]
    manifests = [cpu_node_manifest(name, pods) for name in names]
    cluster.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}))

    def schedulable() -> bool:
        nodes = kubectl_json(cluster, "get", "nodes")["items"]
        usable = set()
        for node in nodes:
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", []))
            tainted = any(t["key"] == "node.kubernetes.io/not-ready" for t in node.get("spec", {}).get("taints") or [])
            if ready and not tainted:
                usable.add(node["metadata"]["name"])
        return usable.issuperset(names)

    wait_for(schedulable, timeout, f"{count} kwok CPU nodes to be Ready and schedulable", interval=1.0)
    return names


def kubectl_json(cluster: ControlPlane, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(cluster.kubectl(*args, "-o", "json", timeout=300).stdout)
    return result


def llmservice(name: str, namespace: str) -> dict[str, Any]:
    """The benchmark's LLMService: CPU only, one replica, 1Gi memory limit."""
    return {
        "apiVersion": "llmservice.io/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"source": {"bundled": {}}},
            "replicas": 1,
            "resources": {"gpu": {"count": 0}, "memory": {"limit": "2Gi"}},
        },
    }


Batch = list[dict[str, Any]]


def apply_batches_with_kubectl(cluster: ControlPlane, chunks: list[Batch], parallelism: int, origin: float) -> list[dict[str, Any]]:
    """`kubectl apply --server-side` per batch, `parallelism` processes at once (kubectl applies one object at a time)."""

    def apply(chunk: Batch) -> dict[str, Any]:
        began = time.monotonic() - origin
        cluster.kubectl("apply", "--server-side", "--field-manager=bench", "-f", "-", input=yaml.safe_dump_all(chunk), timeout=600)
        return {"size": len(chunk), "start": round(began, 2), "end": round(time.monotonic() - origin, 2)}

    with ThreadPoolExecutor(max_workers=parallelism) as pool:
        return list(pool.map(apply, chunks))


def apply_batches_over_http(cluster: ControlPlane, chunks: list[Batch], parallelism: int, origin: float) -> list[dict[str, Any]]:
    """The same server-side applies, one object at a time per batch and `parallelism` batches at
    once, sent from this process: no Go process per batch taking CPU from the system measured."""

    async def run() -> list[dict[str, Any]]:
        credentials = load_credentials(str(cluster.kubeconfig))
        async with http_client(credentials) as session:
            kube = Kube(session, credentials.server, "bench", OperatorMetrics(CollectorRegistry()))
            slots = asyncio.Semaphore(parallelism)

            async def apply(chunk: Batch) -> dict[str, Any]:
                async with slots:
                    began = time.monotonic() - origin
                    for manifest in chunk:
                        await kube.apply(manifest)
                    return {"size": len(chunk), "start": round(began, 2), "end": round(time.monotonic() - origin, 2)}

            return list(await asyncio.gather(*(apply(chunk) for chunk in chunks)))

    return asyncio.run(run())


CREATORS = {"http": apply_batches_over_http, "kubectl": apply_batches_with_kubectl}


def harness_cpu_seconds() -> dict[str, float]:
    """CPU seconds of this process (all its threads: the watches, the HTTP creator) and of its exited kubectl processes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    # Waited-for children only: the kubectl calls. The operator and the control plane are children
    # too, but still running, so not in this figure; they are measured on their own.
    exited = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "self": own.ru_utime + own.ru_stime,
        "kubectl": exited.ru_utime + exited.ru_stime,
    }


# -- observation -------------------------------------------------------------------------------


class Watcher:
    """A watch stream in a thread: when each object was first seen, and first seen Ready.

    A watch (one stream for all N objects) instead of polling: the timestamps are as precise as
    the event delivery, and it costs the API server one watch instead of N-sized lists a second.
    It runs in this process (one JSON decode per event) rather than as `kubectl get --watch`,
    whose per-event formatting cost 6 CPU-seconds at N=1000 - taken from the cores measured.
    """

    def __init__(
        self,
        cluster: ControlPlane,
        path: str,
        key: Callable[[dict[str, Any]], str | None],
        *,
        selector: str | None = None,
        metadata_only: bool = False,
    ) -> None:
        self._cluster = cluster
        self._path = path
        self._selector = selector
        self._key = key  # the LLMService an object stands for
        # Deployments are only timed: their metadata is all the watch needs to carry.
        self._accept = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1" if metadata_only else "application/json"
        self.seen: dict[str, float] = {}
        self.ready: dict[str, float] = {}
        self.restarts = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task[None] | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"watch-{path}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError(f"the watch on {self._path} did not start (see the log above)")

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return len(self.seen), len(self.ready)

    def _serve(self) -> None:
        try:
            self._loop.run_until_complete(self._run())
            # aiohttp closes TLS connections asynchronously: give their transports time to let go of the sockets.
            self._loop.run_until_complete(asyncio.sleep(0.25))
        finally:
            self._loop.close()

    async def _run(self) -> None:
        self._task = asyncio.current_task()
        credentials = load_credentials(str(self._cluster.kubeconfig))
        version = ""
        try:
            async with http_client(credentials) as session:
                while True:
                    params = {"watch": "1", "allowWatchBookmarks": "true", "timeoutSeconds": "600"}
                    if self._selector:
                        params["labelSelector"] = self._selector
                    if version:
                        params["resourceVersion"] = version
                    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
                    async with session.get(
                        credentials.server + self._path, params=params, headers={"Accept": self._accept}, timeout=timeout
                    ) as response:
                        response.raise_for_status()
                        self._started.set()
                        async for line in response.content:
                            event = json.loads(line)
                            if event["type"] == "ERROR":  # e.g. 410 Gone: start over from the current state
                                version = ""
                                break
                            version = event["object"]["metadata"].get("resourceVersion", version)
                            if event["type"] in ("ADDED", "MODIFIED"):
                                self._record(event["object"], time.monotonic())
                    self.restarts += 1  # the server ended the watch; resumed from the last version, nothing is lost
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("The watch on %s failed", self._path)
            raise

    def _record(self, body: dict[str, Any], now: float) -> None:
        name = self._key(body)
        if name is None:
            return
        conditions = (body.get("status") or {}).get("conditions") or []
        with self._lock:
            self.seen.setdefault(name, now)
            if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
                self.ready.setdefault(name, now)

    def stop(self) -> None:
        if self._task is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def proc_memory_mb(pid: int) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024  # kB -> MiB
    return values


@dataclass
class Sampler:
    """The operator's RSS and CPU seconds every half second, in a thread."""

    pid: int
    origin: float
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # (t, rss MiB, cpu s)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                rss = proc_memory_mb(self.pid)["VmRSS"]
                cpu = proc_cpu_seconds(self.pid)
            except (OSError, KeyError):
                return  # the operator is gone; the run reports it
            self.samples.append((round(time.monotonic() - self.origin, 2), round(rss, 1), round(cpu, 2)))
            self._stopping.wait(SAMPLE_INTERVAL)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)


@dataclass(frozen=True)
class Snapshot:
    """The operator's counters and process figures at one moment."""

    at: float
    requests: dict[str, float]  # "verb/code" -> count
    reconciles: dict[str, float]  # result -> count
    reconcile_seconds: float
    cpu_seconds: float
    rss_mb: float
    hwm_mb: float
    components_cpu: dict[str, float]

    def requests_by_verb(self) -> dict[str, float]:
        by_verb: dict[str, float] = {}
        for key, value in self.requests.items():
            verb = key.split("/", 1)[0]
            by_verb[verb] = by_verb.get(verb, 0.0) + value
        return by_verb


def scrape(port: int) -> tuple[dict[str, float], dict[str, float], float]:
    requests: dict[str, float] = {}
    reconciles: dict[str, float] = {}
    reconcile_seconds = 0.0
    for sample in prometheus.scrape(f"http://127.0.0.1:{port}/metrics"):
        if sample.name == "llmservice_operator_api_requests_total":
            requests[f"{sample.labels['verb']}/{sample.labels['code']}"] = sample.value
        elif sample.name == "llmservice_operator_reconciles_total":
            reconciles[sample.labels["result"]] = sample.value
        elif sample.name == "llmservice_operator_reconcile_duration_seconds_sum":
            reconcile_seconds = sample.value
    return requests, reconciles, reconcile_seconds


def snapshot(operator: OperatorProcess, cluster: BenchControlPlane, origin: float) -> Snapshot:
    requests, reconciles, reconcile_seconds = scrape(operator.metrics_port)
    memory = proc_memory_mb(operator.pid)
    components = {}
    for name, pid in cluster.component_pids().items():
        try:
            components[name] = round(proc_cpu_seconds(pid), 2)
        except OSError:
            components[name] = math.nan
    return Snapshot(
        at=round(time.monotonic() - origin, 2),
        requests=requests,
        reconciles=reconciles,
        reconcile_seconds=round(reconcile_seconds, 3),
        cpu_seconds=round(proc_cpu_seconds(operator.pid), 2),
        rss_mb=round(memory["VmRSS"], 1),
        hwm_mb=round(memory["VmHWM"], 1),
        components_cpu=components,
    )


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    keys = sorted(set(after) | set(before))
    return {key: after.get(key, 0.0) - before.get(key, 0.0) for key in keys if after.get(key, 0.0) != before.get(key, 0.0)}


def resource_versions(cluster: ControlPlane, namespace: str, kinds: Iterable[str]) -> dict[str, dict[str, str]]:
    """kind/name -> resourceVersion and the manager of the newest managedFields entry."""
    found: dict[str, dict[str, str]] = {}
    body = kubectl_json(cluster, "get", ",".join(kinds), "-n", namespace, "--show-managed-fields")
    for item in body["items"]:
        metadata = item["metadata"]
        entries = sorted(metadata.get("managedFields") or [], key=lambda entry: entry.get("time", ""))
        newest = entries[-1] if entries else {}
        manager = f"{newest.get('manager', '?')}:{newest.get('operation', '?')}"
        if newest.get("subresource"):
            manager += f"/{newest['subresource']}"
        found[f"{item['kind']}/{metadata['name']}"] = {"rv": metadata["resourceVersion"], "newest_manager": manager}
    return found


def changed(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]) -> dict[str, Any]:
    by_kind: Counter[str] = Counter()
    by_manager: Counter[str] = Counter()
    examples: list[str] = []
    for key, now in after.items():
        then = before.get(key)
        if then is None or then["rv"] != now["rv"]:
            by_kind[key.split("/", 1)[0]] += 1
            by_manager[now["newest_manager"]] += 1
            if len(examples) < 10:
                examples.append(f"{key} by {now['newest_manager']}")
    gone = sorted(set(before) - set(after))
    return {
        "objects": len(after),
        "changed": sum(by_kind.values()),
        "by_kind": dict(by_kind),
        "by_newest_manager": dict(by_manager),
        "examples": examples,
        "gone": gone[:10],
    }


def operator_log(path: Path, since_line: int = 0) -> dict[str, Any]:
    """Warnings and errors in the operator's JSON log, and its 'Applied <Kind>' lines by kind."""
    levels: Counter[str] = Counter()
    applied: Counter[str] = Counter()
    problems: list[str] = []
    lines = path.read_text(errors="replace").splitlines()
    for raw in lines[since_line:]:
        try:
            entry = json.loads(raw)
        except ValueError:
            levels["UNSTRUCTURED"] += 1
            if len(problems) < 20:
                problems.append(raw[:400])
            continue
        level = str(entry.get("level", "?"))
        levels[level] += 1
        message = str(entry.get("message", ""))
        match = re.match(r"Applied (\w+) ", message)
        if match:
            applied[match.group(1)] += 1
        if level in ("WARNING", "ERROR", "CRITICAL") and len(problems) < 20:
            problems.append(raw[:400])
    return {
        "lines": len(lines) - since_line,
        "by_level": dict(levels),
        "applied_by_kind": dict(applied),
        "problems": problems,
        "end_line": len(lines),
    }


def repair_after_idle(cluster: ControlPlane, namespace: str, name: str, timeout: float = 60) -> float | None:
    """Delete one child Service after the idle window and time its re-creation: the watches still work."""
    old_uid = kubectl_json(cluster, "get", "service", name, "-n", namespace)["metadata"]["uid"]
    began = time.monotonic()
    cluster.kubectl("delete", "service", name, "-n", namespace, "--wait=false")

    def recreated() -> bool:
        found = cluster.kubectl("get", "service", name, "-n", namespace, "-o", "jsonpath={.metadata.uid}", check=False)
        return found.returncode == 0 and found.stdout.strip() not in ("", old_uid)

    try:
        wait_for(recreated, timeout, f"the operator to re-create Service {namespace}/{name}", interval=0.2)
    except WaitTimeout:
        return None
    return round(time.monotonic() - began, 2)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """Nearest-rank p50/p90/p99 and max (None when there are no values)."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p90": None, "p99": None, "max": None}

    def rank(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 3)

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": round(ordered[-1], 3)}


# -- one size ------------------------------------------------------------------------------------


def run_size(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    state_dir = work / f"n{n}"
    state_dir.mkdir(parents=True, exist_ok=True)
    nodes = max(1, math.ceil((n + 20) / args.pods_per_node))
    cluster = BenchControlPlane(state_dir / "cluster", controller_qps=args.controller_qps, gpu_nodes=1)
    operator: OperatorProcess | None = None
    watchers: list[Watcher] = []
    sampler: Sampler | None = None
    namespace = f"bench-n{n}"
    result: dict[str, Any] = {"n": n, "namespace": namespace, "state_dir": str(state_dir)}
    log.info("N=%d: starting the control plane (%d kwok CPU nodes x %d pods)", n, nodes, args.pods_per_node)
    try:
        cluster.start()
        result["bin_dir"] = str(cluster.bin_dir)
        add_nodes(cluster, nodes, args.pods_per_node)
        result["nodes"] = {"count": nodes, "pods_per_node": args.pods_per_node, "plus_gpu_nodes": 1}
        helm_install(cluster)
        kubeconfig = service_account_kubeconfig(cluster, state_dir / "operator.kubeconfig")
        if args.operator_workers:  # the operator's settings come from its environment, which it inherits
            os.environ["LLMSERVICE_OPERATOR_WORKERS"] = str(args.operator_workers)
        operator = OperatorProcess(kubeconfig, state_dir / "operator.log", watch_timeout=args.watch_timeout)
        operator.start()
        result["operator_log"] = str(operator.log_path)
        cluster.kubectl("create", "namespace", namespace)
        wait_for(
            lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode == 0,
            30,
            f"the default ServiceAccount in {namespace}",
        )

        watchers = [
            Watcher(cluster, f"/apis/llmservice.io/v1alpha1/namespaces/{namespace}/llmservices", lambda body: body["metadata"]["name"]),
            Watcher(
                cluster,
                f"/apis/apps/v1/namespaces/{namespace}/deployments",
                lambda body: (body["metadata"].get("labels") or {}).get(NAME_LABEL),
                selector=NAME_LABEL,
                metadata_only=True,
            ),
        ]
        for watcher in watchers:
            watcher.start()  # returns once the API server has answered: no create goes unseen
        services, deployments = watchers

        origin = time.monotonic()
        sampler = Sampler(operator.pid, origin)
        sampler.start()
        before = snapshot(operator, cluster, origin)
        log_mark = operator_log(operator.log_path)["end_line"]

        # Create, in batches, with server-side apply, a few batches at a time.
        names = [f"svc-{i:04d}" for i in range(n)]
        manifests = [llmservice(name, namespace) for name in names]
        chunks = [manifests[start : start + args.batch_size] for start in range(0, n, args.batch_size)]
        harness_before = harness_cpu_seconds()
        batches = CREATORS[args.create_with](cluster, chunks, args.create_parallelism, origin)
        created_in = time.monotonic() - origin
        log.info("N=%d: created in %.1fs; waiting for Ready (deadline %ss)", n, created_in, args.ready_timeout)

        # Wait for every one to be Ready: the watchers record; here we only check their tallies.
        deadline = origin + args.ready_timeout
        progress_at = time.monotonic()
        all_deployments_at: float | None = None
        while time.monotonic() < deadline:
            seen_deployments = deployments.counts()[0]
            ready = services.counts()[1]
            if all_deployments_at is None and seen_deployments >= n:
                all_deployments_at = time.monotonic() - origin
            if ready >= n:
                break
            if time.monotonic() - progress_at > 10:
                log.info("N=%d: t=%.0fs deployments %d/%d, ready %d/%d", n, time.monotonic() - origin, seen_deployments, n, ready, n)
                progress_at = time.monotonic()
            time.sleep(0.5)
        all_ready_at = time.monotonic() - origin if services.counts()[1] >= n else None
        at_ready = snapshot(operator, cluster, origin)
        harness_at_ready = harness_cpu_seconds()

        # Cross-check with one list: every LLMService Ready with its status observing its generation.
        listed = kubectl_json(cluster, "get", "llmservices", "-n", namespace)["items"]
        ready_listed = sum(
            1
            for item in listed
            if any(c.get("type") == "Ready" and c.get("status") == "True" for c in (item.get("status") or {}).get("conditions") or [])
            and (item.get("status") or {}).get("observedGeneration") == item["metadata"]["generation"]
        )
        not_ready_reasons = Counter(
            next(
                (
                    f"{c.get('status')}/{c.get('reason')}"
                    for c in (item.get("status") or {}).get("conditions") or []
                    if c.get("type") == "Ready"
                ),
                "no Ready condition",
            )
            for item in listed
            if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in (item.get("status") or {}).get("conditions") or [])
        )

        # Settle: wait until the operator has had no reconcile for a few seconds (bounded).
        settle_began = time.monotonic()

        def quiet() -> bool:
            first = scrape(operator.metrics_port)[1]
            time.sleep(args.settle_seconds)
            return scrape(operator.metrics_port)[1] == first

        try:
            wait_for(quiet, args.settle_timeout, "the operator to go quiet", interval=0.0)
            settled = True
        except WaitTimeout:
            settled = False
        settled_snapshot = snapshot(operator, cluster, origin)
        settle_seconds = time.monotonic() - settle_began
        creation_log = operator_log(operator.log_path, log_mark)

        # Idle window: nothing changes; the operator must write nothing (its watches re-list meanwhile).
        kinds = ("llmservices", *CHILD_KINDS)
        versions_before = resource_versions(cluster, namespace, kinds)
        others_before = resource_versions(cluster, namespace, OTHER_KINDS)
        idle_began = snapshot(operator, cluster, origin)
        log.info("N=%d: all Ready; idle window of %ss", n, args.idle_seconds)
        time.sleep(args.idle_seconds)
        idle_end = snapshot(operator, cluster, origin)
        versions_after = resource_versions(cluster, namespace, kinds)
        others_after = resource_versions(cluster, namespace, OTHER_KINDS)
        idle_log = operator_log(operator.log_path, creation_log["end_line"])
        sampler.stop()
        drift_repair = repair_after_idle(cluster, namespace, names[0])

        ready_latency = [services.ready[name] - services.seen[name] for name in names if name in services.ready and name in services.seen]
        deploy_latency = [
            deployments.seen[name] - services.seen[name] for name in names if name in deployments.seen and name in services.seen
        ]
        creation_requests = delta(settled_snapshot.requests, before.requests)
        creation_by_verb = delta(settled_snapshot.requests_by_verb(), before.requests_by_verb())
        writes = sum(creation_by_verb.get(verb, 0.0) for verb in WRITE_VERBS)
        failed_writes = sum(
            value
            for key, value in creation_requests.items()
            if key.split("/", 1)[0] in WRITE_VERBS and not key.split("/", 1)[1].startswith("2")
        )
        child_applies = sum(creation_log["applied_by_kind"].values())
        idle_by_verb = delta(idle_end.requests_by_verb(), idle_began.requests_by_verb())
        peak_rss = max((sample[1] for sample in sampler.samples), default=settled_snapshot.rss_mb)

        result.update(
            {
                "batches": batches,
                "created_in_seconds": round(created_in, 2),
                "deployment_latency_seconds": percentiles(deploy_latency),
                "ready_latency_seconds": percentiles(ready_latency),
                "all_deployments_at_seconds": None if all_deployments_at is None else round(all_deployments_at, 2),
                "all_ready_at_seconds": None if all_ready_at is None else round(all_ready_at, 2),
                "ready_by_deadline": services.counts()[1],
                "ready_in_list": ready_listed,
                "not_ready_reasons": dict(not_ready_reasons),
                "settled": settled,
                "settle_seconds": round(settle_seconds, 1),
                "creation": {
                    "requests": creation_requests,
                    "requests_by_verb": creation_by_verb,
                    "requests_per_llmservice": {verb: round(value / n, 2) for verb, value in creation_by_verb.items()},
                    "writes_per_llmservice": round(writes / n, 2),
                    "failed_writes_per_llmservice": round(failed_writes / n, 2),
                    "child_applies_per_llmservice": round(child_applies / n, 2),
                    "status_applies_per_llmservice": round((creation_by_verb.get("apply", 0.0) - child_applies) / n, 2),
                    "events_per_llmservice": round(creation_by_verb.get("create", 0.0) / n, 2),
                    "reconciles": delta(settled_snapshot.reconciles, before.reconciles),
                    "reconciles_per_llmservice": round(sum(delta(settled_snapshot.reconciles, before.reconciles).values()) / n, 2),
                    "reconcile_wall_seconds": round(settled_snapshot.reconcile_seconds - before.reconcile_seconds, 2),
                    "operator_cpu_seconds": round(settled_snapshot.cpu_seconds - before.cpu_seconds, 2),
                    "operator_cpu_ms_per_llmservice": round(1000 * (settled_snapshot.cpu_seconds - before.cpu_seconds) / n, 1),
                    "components_cpu_seconds": delta(settled_snapshot.components_cpu, before.components_cpu),
                    # From the first create to the last Ready (the components' figures run to settled).
                    "harness_cpu_seconds": {key: round(harness_at_ready[key] - harness_before[key], 2) for key in harness_before},
                    "created_with": args.create_with,
                    "log": {key: creation_log[key] for key in ("lines", "by_level", "applied_by_kind", "problems")},
                },
                "idle": {
                    "seconds": args.idle_seconds,
                    "watch_timeout_seconds": args.watch_timeout,
                    "requests_by_verb": idle_by_verb,
                    "operator_writes": sum(idle_by_verb.get(verb, 0.0) for verb in WRITE_VERBS),
                    "reconciles": delta(idle_end.reconciles, idle_began.reconciles),
                    "llmservices_and_children": changed(versions_before, versions_after),
                    "replicasets_and_pods": changed(others_before, others_after),
                    "operator_cpu_seconds": round(idle_end.cpu_seconds - idle_began.cpu_seconds, 2),
                    "components_cpu_seconds": delta(idle_end.components_cpu, idle_began.components_cpu),
                    "log": {key: idle_log[key] for key in ("lines", "by_level", "applied_by_kind", "problems")},
                },
                "operator": {
                    "rss_mb_at_ready": at_ready.rss_mb,
                    "rss_mb_after_idle": idle_end.rss_mb,
                    "rss_mb_peak_sampled": peak_rss,
                    "vm_hwm_mb": idle_end.hwm_mb,
                    "rss_mb_before_create": before.rss_mb,
                    "cpu_seconds_total": idle_end.cpu_seconds,
                    "cpu_seconds_before_create": before.cpu_seconds,
                },
                "drift_repair_after_idle_seconds": drift_repair,
                "watch_restarts": {"llmservices": services.restarts, "deployments": deployments.restarts},
                "ready_latencies_seconds": sorted(round(value, 3) for value in ready_latency),
                "deployment_latencies_seconds": sorted(round(value, 3) for value in deploy_latency),
                "rss_samples": sampler.samples[:: max(1, len(sampler.samples) // 400)],
            }
        )
        return result
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}"
        if operator is not None:
            result["operator_log_tail"] = operator.log_tail(60)
        log.exception("N=%d failed", n)
        return result
    finally:
        if sampler is not None:
            sampler.stop()
        for watcher in watchers:
            watcher.stop()
        if operator is not None:
            operator.stop()
        with_logs = args.keep_clusters or "error" in result
        cluster.stop(keep_state=with_logs)
        if not with_logs:
            shutil.rmtree(state_dir / "cluster", ignore_errors=True)


# -- report --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    meminfo = Path("/proc/meminfo").read_text()
    total_kb = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemTotal")))
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(total_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def source_state() -> dict[str, str]:
    """The commit, and a digest of uncommitted changes to what the benchmark exercises."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout

    paths = ("operator", "charts", "crds")
    diff = git("diff", "HEAD", "--", *paths)
    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "uncommitted_operator_chart_crd_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else "clean",
    }


def table(runs: dict[str, dict[str, Any]]) -> str:
    header = (
        "| N | all Ready (s) | Ready p50 / p99 (s) | Deployment p50 / p99 (s) | writes / LLMService "
        "(child + status + event) | requests / LLMService | idle writes (operator / objects changed) "
        "| RSS MiB (peak) | operator CPU s (per LLMService ms) |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for key in sorted(runs, key=int):
        run = runs[key]
        if "error" in run:
            lines.append(f"| {key} | failed: {run['error'][:80]} |")
            continue
        creation, idle, operator = run["creation"], run["idle"], run["operator"]
        ready, deploy = run["ready_latency_seconds"], run["deployment_latency_seconds"]
        requests = sum(creation["requests_by_verb"].values()) / run["n"]
        all_ready = run["all_ready_at_seconds"]
        all_ready_text = f"{all_ready:.1f}" if all_ready is not None else f"not all ({run['ready_by_deadline']}/{run['n']})"
        lines.append(
            f"| {key} | {all_ready_text} | {ready['p50']} / {ready['p99']} | {deploy['p50']} / {deploy['p99']} "
            f"| {creation['writes_per_llmservice']} ({creation['child_applies_per_llmservice']} + "
            f"{creation['status_applies_per_llmservice']} + {creation['events_per_llmservice']}) | {requests:.1f} "
            f"| {idle['operator_writes']:g} / {idle['llmservices_and_children']['changed']} in {idle['seconds']} s "
            f"| {operator['rss_mb_after_idle']} ({operator['rss_mb_peak_sampled']}) "
            f"| {creation['operator_cpu_seconds']} ({creation['operator_cpu_ms_per_llmservice']}) |"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    runs = {int(key): run for key, run in results["runs"].items() if "error" not in run}
    if not runs:
        return False
    figure, (cdf, rss, cost) = plt.subplots(1, 3, figsize=(16, 4.8))
    for n, run in sorted(runs.items()):
        latencies = run["ready_latencies_seconds"]
        cdf.plot(latencies, [(i + 1) / len(latencies) for i in range(len(latencies))], label=f"N={n}")
        samples = run["rss_samples"]
        rss.plot([s[0] for s in samples], [s[1] for s in samples], label=f"N={n}")
    cdf.set(xscale="log", xlabel="seconds from creation to Ready=True (log)", ylabel="fraction of LLMServices", title="Time to Ready")
    cdf.legend()
    rss.set(xlabel="seconds since the first create", ylabel="operator RSS (MiB)", title="Operator memory")
    rss.axhline(TARGETS["rss_mb_at_1000"], color="grey", linestyle="--", linewidth=0.8)
    rss.legend()
    sizes = sorted(runs)
    cost.plot(sizes, [runs[n]["creation"]["writes_per_llmservice"] for n in sizes], "o-", label="writes / LLMService")
    cost.plot(sizes, [sum(runs[n]["creation"]["requests_by_verb"].values()) / n for n in sizes], "s-", label="requests / LLMService")
    cost.plot(
        sizes, [runs[n]["creation"]["operator_cpu_ms_per_llmservice"] / 10 for n in sizes], "^-", label="operator CPU / LLMService (10 ms)"
    )
    cost.set(xscale="log", xlabel="N LLMServices", title="Cost per LLMService", ylim=(0, None))
    cost.legend()
    figure.suptitle(f"llmservice operator at scale ({results['machine']['nproc']} cores; kwok nodes)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _flags(argv: Sequence[str]) -> list[str]:
    """The command-line arguments without --sizes and its values (each run records its own size)."""
    kept: list[str] = []
    skipping = False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg == "--sizes"
        if not skipping:
            kept.append(arg)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000], help="numbers of LLMServices, one run each")
    parser.add_argument("--idle-seconds", type=float, default=300.0, help="length of the idle window (the issue asks 5 minutes)")
    parser.add_argument(
        "--watch-timeout", type=int, default=60, help="the operator's watch timeout: the idle window should hold at least one re-list"
    )
    parser.add_argument("--batch-size", type=int, default=50, help="LLMServices per kubectl apply")
    parser.add_argument("--create-parallelism", type=int, default=4, help="batches applied at once")
    parser.add_argument(
        "--create-with",
        choices=sorted(CREATORS),
        default="http",
        help="send the creating applies from this process (http) or through kubectl apply --server-side processes",
    )
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="give up waiting for Ready after this long")
    parser.add_argument("--settle-seconds", type=float, default=5.0, help="no reconcile for this long counts as settled")
    parser.add_argument("--settle-timeout", type=float, default=120.0)
    parser.add_argument("--pods-per-node", type=int, default=250, help="pod capacity of each kwok CPU node")
    parser.add_argument(
        "--controller-qps",
        type=int,
        default=200,
        help="kube-controller-manager --kube-api-qps (burst twice that); 0 keeps its default of 20",
    )
    parser.add_argument(
        "--operator-workers", type=int, default=0, help="LLMSERVICE_OPERATOR_WORKERS for the operator; 0 keeps its default (8)"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=Path("/tmp/llmservice-bench-operator"), help="control plane state and operator logs"
    )
    parser.add_argument("--keep-clusters", action="store_true", help="keep every control plane's state dir and logs")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="results JSON (default bench/results/operator-scale-<date>.json; runs of other sizes in it are kept)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    date = datetime.now(UTC).strftime("%Y-%m-%d")
    output: Path = args.output or RESULTS_DIR / f"operator-scale-{date}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads(output.read_text()) if output.exists() else {"runs": {}}
    results["machine"] = machine()
    results["command"] = " ".join([*COMMAND, *(sys.argv[1:] if argv is None else argv)])
    results["targets"] = TARGETS
    results["source"] = source_state()
    work: Path = args.work_dir / datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    for n in args.sizes:
        began = datetime.now(UTC).isoformat(timespec="seconds")
        run = run_size(n, args, work)
        run["started"] = began
        run["command"] = " ".join([*COMMAND, "--sizes", str(n), *_flags(sys.argv[1:] if argv is None else argv)])
        run["source"] = results["source"]
        run["settings"] = {
            key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items() if key not in ("sizes", "output")
        }
        run["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
        results["runs"][str(n)] = run
        output.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        log.info("N=%d done; results in %s", n, output)
    if plot(results, output.with_suffix(".png")):
        log.info("plot in %s", output.with_suffix(".png"))
    sys.stdout.write(table(results["runs"]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
