"""One reconcile of one LLMService: parse -> render -> apply -> prune -> observe -> status.

Level-triggered: it reads the whole current state every time and never depends on what event
woke it, so a restart, a missed event or a duplicate event all converge to the same result.
The state is read from the object store the watches keep current, not from the API server; the
API server sees only writes, and a settled LLMService costs no request at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from llmservice_operator import cache, naming, startup, status
from llmservice_operator.kinds import CHILDREN, KINDS
from llmservice_operator.kube import Kube, KubeError
from llmservice_operator.metrics import OperatorMetrics
from llmservice_operator.plan import ObjectKey, Plan, controlled_by, key_of, owned, plan
from llmservice_operator.render import DEFAULT_GPU_TYPE_LABEL, Capabilities, Manifest, RenderContext, render
from llmservice_operator.spec import API_VERSION, KIND, LLMService, SpecError, parse
from llmservice_operator.store import ObjectStore
from llmservice_operator.workqueue import RetryLater

log = logging.getLogger(__name__)

CAPABILITY_TTL_SECONDS = 60.0
ROUTINE_REASONS = frozenset({"Creating", "RollingOut", "WaitingForCapacity", "CacheFetching"})
# An object holding a child's name without our label is not watched, so its going away is not an
# event here: the LLMService looks again this often.
CONFLICT_RECHECK_SECONDS = 15.0
# Write errors that resolve by retrying at once and need no word in the status.
RETRY_QUIETLY = frozenset({0, 409, 429})
STAGE_MEMORY = 4096  # pods whose server stages were asked for, remembered so each is asked once

# Asks a ready server pod for its start-up stages (its /startupz); None when it cannot be asked.
StageReader = Callable[[Manifest], Awaitable[dict[str, float] | None]]


@dataclass(frozen=True)
class Key:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Holder:
    """An object holding a child's name that this LLMService does not control."""

    kind: str
    namespace: str
    name: str
    body: Manifest
    predecessor: bool  # a child of a deleted LLMService of the same name, on its way out

    @property
    def description(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


class ChildWriteFailed(Exception):
    """A write of one child failed; says which, for the status."""

    def __init__(self, what: str, error: KubeError) -> None:
        super().__init__(f"{what}: {error}")
        self.what = what
        self.error = error


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class CapabilityCache:
    """Discovery results, refreshed at most once a minute: CRDs come and go rarely."""

    def __init__(self, kube: Kube, clock: Callable[[], float] = time.monotonic) -> None:
        self._kube = kube
        self._clock = clock
        self._value: Capabilities | None = None
        self._at = 0.0

    async def get(self) -> Capabilities:
        if self._value is None or self._clock() - self._at > CAPABILITY_TTL_SECONDS:
            monitors = await self._kube.served_resources("monitoring.coreos.com/v1")
            self._value = Capabilities(
                service_monitor="servicemonitors" in monitors,
                pod_monitor="podmonitors" in monitors,
                custom_metrics=await self._kube.serves_group("custom.metrics.k8s.io"),
            )
            self._at = self._clock()
        return self._value


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        store: ObjectStore,
        metrics: OperatorMetrics,
        default_image: str,
        clock: Callable[[], str] = utc_now,
        policy: status.Policy | None = None,
        requeue: Callable[[Key, float], None] | None = None,
        gpu_type_label: str = DEFAULT_GPU_TYPE_LABEL,
        monitor_labels: Mapping[str, str] | None = None,
        read_stages: StageReader | None = None,
        wake: Callable[[Key], object] | None = None,
    ) -> None:
        self._kube = kube
        self._store = store
        self._metrics = metrics
        self._default_image = default_image
        self._gpu_type_label = gpu_type_label
        self._monitor_labels = tuple(sorted((monitor_labels or {}).items()))
        self._capabilities = CapabilityCache(kube)
        self._now = clock
        self._policy = policy or status.Policy()
        # Runs a key again after a delay, for what no watch event will announce.
        self._requeue = requeue or (lambda key, delay: None)
        self._read_stages = read_stages
        self._stages: dict[str, dict[str, float] | None] = {}  # pod uid -> its server's stages (or None)
        self._counted: dict[str, None] = {}  # pod uids whose phases went into the histogram (ordered, bounded)
        self._asking: set[str] = set()
        self._probes: set[asyncio.Task[None]] = set()
        self._wake = wake

    async def __call__(self, key: Key) -> None:
        started = time.perf_counter()
        try:
            result = await self.reconcile(key)
        except KubeError as error:
            self._metrics.reconciles.labels(result="retry").inc()
            if error.transient:
                log.info("Reconcile of LLMService %s hit %s; retrying", key, error)
            else:
                log.warning("Reconcile of LLMService %s failed: %s; retrying with backoff", key, error)
            raise RetryLater(str(error)) from error
        finally:
            self._metrics.reconcile_duration.observe(time.perf_counter() - started)
        self._metrics.reconciles.labels(result=result).inc()

    async def reconcile(self, key: Key) -> str:
        body = self._store.get(KIND, key.namespace, key.name)
        if body is None:
            return "gone"
        if body["metadata"].get("deletionTimestamp"):
            return "gone"  # owner references let the garbage collector remove the children
        previous = body.get("status")
        try:
            service = parse(body)
        except SpecError as error:
            await self._invalid(body, str(error))
            return "invalid"

        capabilities = await self._capabilities.get()
        observed = self._observe_children(service, capabilities)
        ours = owned(observed, service.ref.uid)
        cache_state, model_revision = None, None
        if service.spec.model.cache is not None:
            cache_state = cache.observe(service, ours.get(("Job", cache.job_name(key.name))), self._pods(key, cache.FETCH_APP))
            model_revision = cache.serving_revision(service, cache_state, ours.get(("Deployment", key.name)))
        desired = render(
            service,
            RenderContext(
                self._default_image,
                capabilities,
                gpu_type_label=self._gpu_type_label,
                monitor_labels=self._monitor_labels,
                model_revision=model_revision,
            ),
        )
        todo = plan(desired, observed, service.ref.uid)
        try:
            conflict = await self._name_conflict(service, todo)
            if conflict is not None:
                return await self._blocked_by(body, key, service, conflict)
            deployment = await self._write(service, todo)
            await self._prune(service, todo)
        except ChildWriteFailed as failed:
            return await self._refused(body, failed)

        autoscaler = todo.ours.get(("HorizontalPodAutoscaler", service.ref.name))
        now = self._now()
        seen = status.Observed(deployment, (), capabilities, autoscaler)
        settled = status.compute(service, seen, previous, now, self._policy)
        if not _ready(settled):
            # Only an unsettled service looks at its pods, to say why it is not Ready.
            selector = naming.selector_labels(key.name).items()
            pods = tuple(
                pod for pod in self._store.pods(key.namespace, key.name) if selector <= ((pod["metadata"].get("labels") or {}).items())
            )
            seen = status.Observed(deployment, pods, capabilities, autoscaler)
            settled = status.compute(service, seen, previous, now, self._policy)
            recheck = status.recheck_after(service, seen, now, self._policy)
            if recheck is not None:
                self._requeue(key, recheck + 1.0)
        if cache_state is not None:
            settled = self._with_cache(service, settled, cache_state, model_revision, previous)
        settled = self._with_startup(key, settled, previous)
        wrote = await self._write_status(body, settled)
        return "applied" if todo.writes or todo.prune or wrote else "unchanged"

    def _pods(self, key: Key, app: str) -> list[Manifest]:
        return [
            pod
            for pod in self._store.pods(key.namespace, key.name)
            if (pod["metadata"].get("labels") or {}).get("app.kubernetes.io/name") == app
        ]

    def _with_cache(
        self,
        service: LLMService,
        settled: dict[str, Any],
        state: cache.CacheState,
        serving: str | None,
        previous: dict[str, Any] | None,
    ) -> dict[str, Any]:
        settled = {**settled, "cache": state.to_status()}
        waiting = cache.readiness(state, serving)
        if waiting is None:
            return settled
        reason, message, degraded = waiting
        return status.cache_waiting(
            settled,
            reason,
            message,
            failed=degraded,
            serving=serving is not None,
            generation=service.ref.generation,
            previous=previous,
            now=self._now(),
        )

    def _with_startup(self, key: Key, settled: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
        """status.startup for the replica that most recently became ready (kept when none is ready now).

        The server's own stages are asked for in the background, once per pod: a pod that does not
        answer (a NetworkPolicy, a fake node) must not hold up this reconcile. When the answer comes
        the LLMService is woken to write it; each pod's phases go into the histogram once, then.
        """
        kept = (previous or {}).get("startup")
        pod = startup.latest_ready(self._pods(key, naming.SERVER_APP))
        breakdown = startup.breakdown(pod, None) if pod is not None else None
        if pod is None or breakdown is None:
            return {**settled, "startup": kept} if kept else settled
        uid = str(pod["metadata"].get("uid"))
        if uid in self._stages:
            breakdown = startup.breakdown(pod, self._stages[uid]) or breakdown
            if uid not in self._counted:
                self._counted[uid] = None
                for phase in startup.PHASES:
                    if phase in breakdown:
                        self._metrics.cold_start.labels(phase=phase).observe(breakdown[phase])
        elif uid not in self._asking:
            self._asking.add(uid)
            task = asyncio.create_task(self._ask_stages(key, uid, pod), name=f"startupz-{uid}")
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)
        return {**settled, "startup": breakdown}

    async def _ask_stages(self, key: Key, uid: str, pod: Manifest) -> None:
        try:
            self._stages[uid] = await self._read_stages(pod) if self._read_stages is not None else None
        finally:
            self._asking.discard(uid)
        for memory in (self._stages, self._counted):
            while len(memory) > STAGE_MEMORY:
                del memory[next(iter(memory))]
        if self._wake is not None:
            self._wake(key)

    async def _blocked_by(self, body: Manifest, key: Key, service: LLMService, holder: Holder) -> str:
        generation, now = service.ref.generation, self._now()
        if holder.predecessor:
            # Deleted and re-created (a GitOps replace): the garbage collector is removing the old
            # children, which carry our labels, so their deletion wakes this reconcile. Not a failure.
            message = (
                f"Waiting for the garbage collector to delete {holder.description} of the deleted LLMService "
                f"{service.ref.name} before creating this one's."
            )
            await self._write_status(body, status.creating(generation, message, body.get("status"), now))
            return "waiting"
        message = _conflict_message(holder)
        if await self._write_status(body, status.name_conflict(generation, message, body.get("status"), now)):
            log.warning("LLMService %s: %s", key, message)
        self._requeue(key, CONFLICT_RECHECK_SECONDS)
        return "conflict"

    async def _name_conflict(self, service: LLMService, todo: Plan) -> Holder | None:
        """Why a child cannot be applied, when its name is held by an object this LLMService does not control.

        Server-side apply would merge into such an object and make it ours, and the garbage collector
        would delete it with the LLMService. Children already observed need no request; a name not
        observed is looked up once (the watches see only objects with our labels), just before it
        would be created. The lookup and the apply are two requests: an object someone creates in the
        milliseconds between them would still be merged into; server-side apply has no create-only mode.
        """
        namespace = service.ref.namespace
        if todo.held:
            return self._holder(service, key_of(todo.held[0]), todo.held[0])
        for manifest in todo.unseen:
            kind, name = key_of(manifest)
            found = self._store.get(kind, namespace, name)
            if found is None:
                try:
                    found = await self._kube.get(kind, namespace, name)
                except KubeError as error:
                    raise ChildWriteFailed(f"Reading {kind} {namespace}/{name}", error) from error
            if found is not None and not controlled_by(found, service.ref.uid):
                return self._holder(service, (kind, name), found)
        return None

    @staticmethod
    def _holder(service: LLMService, key: ObjectKey, body: Manifest) -> Holder:
        kind, name = key
        return Holder(kind, service.ref.namespace, name, body, predecessor=_of_predecessor(body, service))

    def _observe_children(self, service: LLMService, capabilities: Capabilities) -> dict[ObjectKey, Manifest]:
        """Every child labelled as this LLMService's, ours or not; kinds whose CRD is not served are left out."""
        served = {"ServiceMonitor": capabilities.service_monitor, "PodMonitor": capabilities.pod_monitor}
        kinds = [kind for kind in CHILDREN if not KINDS[kind].optional or served[kind]]
        return {
            (kind, item["metadata"]["name"]): item for kind, item in self._store.children(service.ref.namespace, service.ref.name, kinds)
        }

    async def _write(self, service: LLMService, todo: Plan) -> Manifest | None:
        """Apply the planned writes (a replaced kind deleted first); returns the Deployment as it now is."""
        namespace = service.ref.namespace
        deployment = todo.ours.get(("Deployment", service.ref.name))
        for write in todo.writes:
            kind, name = write.key
            if write.replace and write.current is not None:
                await self._delete(kind, namespace, name, write.current)
                log.info("Deleted %s %s/%s to re-create it: its template changed", kind, namespace, name)
            try:
                current = await self._kube.apply(write.manifest)
            except KubeError as error:
                raise ChildWriteFailed(f"Applying {kind} {namespace}/{name}", error) from error
            self._store.upsert(kind, current)
            log.info("Applied %s %s/%s", kind, namespace, name)
            if kind == "Deployment":
                deployment = current
        return deployment

    async def _prune(self, service: LLMService, todo: Plan) -> None:
        for item in todo.prune:  # only objects this LLMService controls: nothing else is ever pruned
            kind, name = key_of(item)
            await self._delete(kind, service.ref.namespace, name, item)
            log.info("Pruned %s %s/%s, no longer in the spec", kind, service.ref.namespace, name)

    async def _delete(self, kind: str, namespace: str, name: str, item: Manifest) -> None:
        uid = item["metadata"]["uid"]
        try:
            await self._kube.delete(kind, namespace, name, uid)
        except KubeError as error:
            raise ChildWriteFailed(f"Deleting {kind} {namespace}/{name}", error) from error
        self._store.remove(kind, namespace, name, uid=uid)

    async def _invalid(self, body: Manifest, message: str) -> None:
        metadata = body["metadata"]
        generation = int(metadata.get("generation") or 0)
        new = status.invalid(generation, message, body.get("status"), self._now())
        if await self._write_status(body, new):
            log.warning("LLMService %s/%s is invalid: %s", metadata["namespace"], metadata["name"], message)

    async def _refused(self, body: Manifest, failed: ChildWriteFailed) -> str:
        """Map a refused child write: InvalidSpec (no retry), or ApplyFailed and a retry with backoff."""
        refused = failed.error
        if refused.status in (400, 422):
            # The API server rejected what we rendered from the user's spec (e.g. a bad toleration).
            await self._invalid(body, f"The API server rejected a child object: {refused.message}")
            return "invalid"
        if refused.status not in RETRY_QUIETLY:
            # Missing permissions, a policy engine or webhook saying no, a missing CRD, server
            # trouble: the status says so while the work queue retries with backoff.
            message = f"{failed.what} failed (HTTP {refused.status}): {refused.message}{_hint(refused.status)}"
            generation = int(body["metadata"].get("generation") or 0)
            try:
                await self._write_status(body, status.apply_failed(generation, message, body.get("status"), self._now()))
            except KubeError as error:
                log.warning(
                    "Could not record ApplyFailed on LLMService %s/%s: %s", body["metadata"]["namespace"], body["metadata"]["name"], error
                )
        raise refused from failed

    async def _write_status(self, body: Manifest, new: dict[str, Any]) -> bool:
        """Write the status once, and only when it differs from what is stored."""
        current = body.get("status") or {}
        if current == new:
            return False
        metadata = body["metadata"]
        written = await self._kube.apply(
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "metadata": {"name": metadata["name"], "namespace": metadata["namespace"]},
                "status": new,
            },
            subresource="status",
        )
        self._store.upsert(KIND, written)
        await self._announce(body, current, new)
        return True

    async def _announce(self, body: Manifest, old: dict[str, Any], new: dict[str, Any]) -> None:
        """An Event when readiness changes its reason, so `kubectl describe` tells the story.

        Routine progress (Creating, RollingOut) is left to the conditions: an Event is a write, and
        a new LLMService should cost its children, its status and one Event when it becomes Ready.
        """
        before, after = _condition(old, "Ready"), _condition(new, "Ready")
        if after is None or (before is not None and before.get("reason") == after.get("reason")):
            return
        if after.get("reason") in ROUTINE_REASONS:
            return
        kind = "Normal" if after.get("status") == "True" else "Warning"
        await self._kube.post_event(body, kind, str(after.get("reason")), str(after.get("message")), _micro(self._now()))


def _hint(code: int) -> str:
    if code == 403:
        return (
            ". Grant the operator's ServiceAccount this permission (the chart's RBAC, docs/security.md), "
            "or ask whoever runs the admission policy that refused it"
        )
    if code == 404:
        return (
            ". The API server does not serve this kind: install its CRD (monitoring.coreos.com for "
            "ServiceMonitor and PodMonitor) or change spec.monitoring.mode"
        )
    return ""


def _controller(item: Manifest) -> dict[str, Any] | None:
    return next((ref for ref in item["metadata"].get("ownerReferences") or [] if ref.get("controller")), None)


def _of_predecessor(item: Manifest, service: LLMService) -> bool:
    """Controlled by an earlier LLMService of the same name (deleted; its uid differs from this one's)."""
    owner = _controller(item)
    return (
        owner is not None
        and owner.get("kind") == KIND
        and owner.get("apiVersion") == API_VERSION
        and owner.get("name") == service.ref.name
        and owner.get("uid") != service.ref.uid
    )


def _conflict_message(holder: Holder) -> str:
    owner = _controller(holder.body)
    held = (
        f"is controlled by {owner.get('kind')} {owner.get('name')} (uid {owner.get('uid')})"
        if owner
        else "is not controlled by this LLMService"
    )
    return (
        f"{holder.description} already exists and {held}; the operator will not change or delete it. "
        f"Delete or rename that {holder.kind}, or give the LLMService another name; reconciling goes on once the "
        "name is free."
    )


def _condition(state: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in state.get("conditions") or []:
        if condition.get("type") == kind:
            return dict(condition)
    return None


def _ready(state: dict[str, Any]) -> bool:
    ready = _condition(state, "Ready")
    return ready is not None and ready.get("status") == "True"


def _micro(now: str) -> str:
    # events.k8s.io wants a MicroTime (RFC 3339 with microseconds).
    return now.replace("Z", ".000000Z")
