"""`llmservice-operator`: run the reconcile loop under kopf against the current cluster."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import aiohttp
import kopf
from prometheus_client import CollectorRegistry, start_http_server

from llmservice_operator import handlers, podprobe
from llmservice_operator.kinds import WATCHED
from llmservice_operator.kube import Kube, KubeError, http_client, load_credentials
from llmservice_operator.leader import LeaderElector, Timing, default_identity
from llmservice_operator.logs import configure_logging
from llmservice_operator.metrics import OperatorMetrics
from llmservice_operator.reconcile import Key, Reconciler
from llmservice_operator.resync import Resync
from llmservice_operator.settings import OperatorSettings
from llmservice_operator.spec import KIND
from llmservice_operator.status import Policy
from llmservice_operator.store import ObjectStore
from llmservice_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmservice-operator",
        description="Reconcile LLMService objects into inference Deployments, Services, HPAs and monitors.",
    )
    parser.add_argument(
        "--namespace", "-n", action="append", default=None, help="watch this namespace (repeatable); default: all namespaces"
    )
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file; default: in-cluster or ~/.kube/config")
    parser.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace) -> OperatorSettings:
    overrides: dict[str, Any] = {}
    if args.namespace:
        overrides["namespaces"] = tuple(args.namespace)
    if args.log_level:
        overrides["log_level"] = args.log_level
    return OperatorSettings(**overrides)


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf builds a deep-copied "essence" of every object on every watch event, for change-detecting
    handlers (on.create/update) to diff against. This operator has only event handlers, which never
    read it, and at 1000 LLMServices building it was a fifth of the operator's CPU."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        raise AssertionError("no change-detecting handler is registered: nothing may store a diff-base")


class Operator:
    """The process: kopf's watches feeding an object store and a work queue drained by the reconciler."""

    def __init__(self, settings: OperatorSettings, metrics: OperatorMetrics, kubeconfig: str | None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.kubeconfig = kubeconfig
        self.registry = kopf.OperatorRegistry()
        self.queue: WorkQueue[Key] = WorkQueue(
            self._reconcile,
            workers=settings.workers,
            base_delay=settings.retry_base_seconds,
            max_delay=settings.retry_max_seconds,
        )
        self.store = ObjectStore()
        for kind in WATCHED:
            metrics.stored_objects.labels(kind=kind).set_function(functools.partial(self.store.count, kind))
        self._session: aiohttp.ClientSession | None = None
        self._pod_session: aiohttp.ClientSession | None = None
        self._kube: Kube | None = None
        self._reconciler: Reconciler | None = None
        self._resync_task: asyncio.Task[None] | None = None
        self._elector: LeaderElector | None = None
        self._election_task: asyncio.Task[None] | None = None
        self.stop_flag = asyncio.Event()
        self.lost_leadership = False
        kopf.on.login(registry=self.registry)(self._login)
        kopf.on.startup(registry=self.registry)(self._startup)
        kopf.on.cleanup(registry=self.registry)(self._cleanup)
        handlers.register(self.registry, self.queue, self.store)

    def _login(self, **_: Any) -> kopf.ConnectionInfo:
        # A private registry has none of kopf's default login handlers; kopf's watches use the
        # same credentials (explicit kubeconfig, in-cluster account or default kubeconfig) as ours.
        credentials = load_credentials(self.kubeconfig)
        return kopf.ConnectionInfo(
            server=credentials.server,
            ca_path=credentials.ca_path,
            insecure=credentials.insecure,
            certificate_path=credentials.certificate_path,
            private_key_path=credentials.private_key_path,
            token=credentials.token,
        )

    async def _reconcile(self, key: Key) -> None:
        assert self._reconciler is not None, "reconcile before startup"
        await self._reconciler(key)

    async def _startup(self, settings: kopf.OperatorSettings, **_: Any) -> None:
        # Our handlers leave no state in objects; kopf's own event posting is off, we post ours.
        settings.posting.enabled = False
        settings.persistence.diffbase_storage = NoDiffBase()
        handlers.narrow_watches(settings)
        if self.settings.namespaces:
            # Exact namespace names need no namespace listing, which the chart's namespaced RBAC
            # does not grant: without this kopf retries it for a minute before it starts watching.
            # CRDs are then scanned once at startup; a monitoring CRD installed later is picked up
            # by the periodic resync until the operator restarts.
            settings.scanning.disabled = True
        if self.settings.watch_timeout_seconds is not None:
            settings.watching.server_timeout = self.settings.watch_timeout_seconds
            settings.watching.client_timeout = self.settings.watch_timeout_seconds + 10
        if self._kube is None:  # kopf runs this handler again after a TemporaryError
            credentials = load_credentials(self.kubeconfig)
            self._session = http_client(credentials)
            self._kube = Kube(self._session, credentials.server, self.settings.field_manager, self.metrics)
        kube = self._kube
        if self.settings.leader_election and self._elector is None:
            self._elector = LeaderElector(
                kube,
                self.metrics,
                self.settings.lease_name,
                self.settings.lease_namespace,
                self.settings.identity or default_identity(),
                Timing(self.settings.lease_duration_seconds),
            )
        resync = Resync(kube, self.store, self.settings.namespaces, self.queue.add)
        # kopf starts its watches only after the startup handlers, so the store is filled here, by
        # LIST, before any reconcile runs: a reconcile on an empty store would apply every child
        # again. kopf's own initial listing then finds the store current and wakes nothing; the
        # fill has already queued every LLMService once.
        try:
            queued = await resync.once()
        except KubeError as error:
            raise kopf.TemporaryError(f"Could not list the watched objects: {error}", delay=5) from error
        read_stages = None
        if self.settings.probe_pods:
            if self._pod_session is None:
                self._pod_session = podprobe.session()
            read_stages = podprobe.StageProbe(self._pod_session)
        self._reconciler = Reconciler(
            kube,
            self.store,
            self.metrics,
            self.settings.server_image,
            read_stages=read_stages,
            wake=self.queue.add,
            policy=Policy(capacity_grace_seconds=self.settings.capacity_grace_seconds),
            requeue=self.queue.add_after,
            gpu_type_label=self.settings.gpu_type_label,
            monitor_labels=self.settings.monitor_labels,
        )
        if self._elector is None:
            self._lead(resync)
        else:
            # Watches and the store run in a standby too; only the leader drains the queue.
            self._election_task = asyncio.create_task(
                self._elector.run(functools.partial(self._lead, resync), self._abdicate), name="leader-election"
            )
        log.info(
            "Operator started: namespaces=%s, %d LLMServices known, default server image %s",
            ",".join(self.settings.namespaces) or "all",
            len(queued),
            self.settings.server_image,
        )

    def _lead(self, resync: Resync) -> None:
        self.metrics.leader.set(1)
        # Level-triggered: a new leader looks at every LLMService once, whatever it missed as a standby.
        for namespace, name in self.store.names(KIND):
            self.queue.add(Key(namespace, name))
        self.queue.start()
        if self.settings.resync_seconds:
            self._resync_task = asyncio.create_task(resync.run(self.settings.resync_seconds), name="resync")

    def _abdicate(self) -> None:
        self.lost_leadership = True
        self.stop_flag.set()

    async def _cleanup(self, **_: Any) -> None:
        for task in (self._election_task, self._resync_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.queue.stop()
        if self._elector is not None:
            await self._elector.release()  # after the last reconcile: then a standby may write
        if self._session is not None:
            await self._session.close()
        if self._pod_session is not None:
            await self._pod_session.close()

    async def run(self) -> None:
        liveness = f"http://0.0.0.0:{self.settings.health_port}/healthz" if self.settings.health_port else None
        await kopf.operator(
            registry=self.registry,
            standalone=True,
            clusterwide=not self.settings.namespaces,
            namespaces=list(self.settings.namespaces),
            liveness_endpoint=liveness,
            stop_flag=self.stop_flag,
        )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    settings = build_settings(args)
    configure_logging(settings.log_level)
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=registry)
    operator = Operator(settings, metrics, args.kubeconfig)
    asyncio.run(operator.run())
    if operator.lost_leadership:
        sys.exit(1)  # restarted by Kubernetes as a standby


if __name__ == "__main__":
    main()
