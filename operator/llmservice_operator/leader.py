"""Leader election: of several operator processes, the one holding a Lease reconciles.

Every process runs its watches and keeps its store current, so a standby that takes over starts
reconciling at once from memory. Only the leader starts the work queue. A leader that cannot renew
within the renew deadline stops the whole process (a standby may already act), and Kubernetes
restarts it as a standby: two processes never write at the same time for longer than that.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from llmservice_operator import lease
from llmservice_operator.kube import Kube, KubeError
from llmservice_operator.metrics import OperatorMetrics

log = logging.getLogger(__name__)


def default_identity() -> str:
    """Unique per process: a restarted process must not believe it still holds its predecessor's Lease."""
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def micro_now() -> str:
    # Lease times are MicroTime: RFC 3339 with microseconds.
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Timing:
    """client-go's defaults: a 15 s lease, renewed every 5 s, given up after 10 s without a renewal."""

    duration_seconds: int = 15

    @property
    def renew_every(self) -> float:
        return self.duration_seconds / 3

    @property
    def renew_deadline(self) -> float:
        return self.duration_seconds * 2 / 3

    @property
    def retry_every(self) -> float:
        return min(2.0, self.duration_seconds / 5)


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        metrics: OperatorMetrics,
        name: str,
        namespace: str,
        identity: str,
        timing: Timing,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], str] = micro_now,
    ) -> None:
        self._kube = kube
        self._metrics = metrics
        self._name = name
        self._namespace = namespace
        self.identity = identity
        self._timing = timing
        self._clock = clock
        self._wall = wall
        self._seen: lease.Record | None = None
        self._seen_at = clock()
        self.leading = False

    async def run(self, on_elected: Callable[[], None], on_lost: Callable[[], None]) -> None:
        """Campaign until elected, then renew until cancelled or until renewing fails for the renew deadline."""
        self._metrics.leader.set(0)
        log.info("Waiting to lead: Lease %s/%s, identity %s", self._namespace, self._name, self.identity)
        while True:
            if await self._attempt():
                break
            await asyncio.sleep(self._timing.retry_every)
        self.leading = True
        self._metrics.leader.set(1)
        log.info("Leading as %s (Lease %s/%s)", self.identity, self._namespace, self._name)
        on_elected()
        renewed = self._clock()
        while True:
            await asyncio.sleep(self._timing.renew_every)
            if await self._attempt():
                renewed = self._clock()
            elif self._clock() - renewed > self._timing.renew_deadline:
                self.leading = False
                self._metrics.leader.set(0)
                log.error(
                    "Lost the Lease %s/%s (not renewed for %.0f s); stopping so that only one operator acts",
                    self._namespace,
                    self._name,
                    self._clock() - renewed,
                )
                on_lost()
                return

    async def release(self) -> None:
        """Let go of the Lease on a clean shutdown, so a standby takes over without waiting it out."""
        if not self.leading or self._seen is None:
            return
        self.leading = False
        self._metrics.leader.set(0)
        try:
            await self._kube.replace(lease.released(self._name, self._namespace, self._seen, self._wall()))
            log.info("Released the Lease %s/%s", self._namespace, self._name)
        except KubeError as error:
            log.warning("Could not release the Lease %s/%s: %s; a standby takes over when it expires", self._namespace, self._name, error)

    async def _attempt(self) -> bool:
        """One look at the Lease and, if it is ours to hold, one write; True when we hold it now."""
        try:
            current = await self._kube.get("Lease", self._namespace, self._name)
        except KubeError as error:
            log.warning("Could not read the Lease %s/%s: %s", self._namespace, self._name, error)
            return False
        record = lease.Record.of(current) if current is not None else None
        now = self._clock()
        if record != self._seen:
            self._seen, self._seen_at = record, now
        step = lease.decide(record, now - self._seen_at, self.identity)
        if step is lease.Step.WAIT:
            return False
        manifest = lease.lease(
            self._name,
            self._namespace,
            self.identity,
            self._timing.duration_seconds,
            self._wall(),
            previous=record,
            acquired=step is lease.Step.TAKE,
        )
        try:
            # Compare-and-swap, not apply: the write must fail when another process wrote first.
            written = await (self._kube.create(manifest) if step is lease.Step.CREATE else self._kube.replace(manifest))
        except KubeError as error:
            if error.status != 409:
                log.warning("Could not %s the Lease %s/%s: %s", step.value, self._namespace, self._name, error)
            return False
        if step is lease.Step.TAKE and record is not None:
            log.info("Took over the Lease %s/%s from %s", self._namespace, self._name, record.holder or "nobody")
        self._seen, self._seen_at = lease.Record.of(written), self._clock()
        return True
