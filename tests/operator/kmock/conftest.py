"""Request-level tests of the reconciler against kmock, an API server on a local port.

The reconciler under test is the real one, with its real `Kube` adapter over a real aiohttp session;
only the API server is emulated. The emulator is kmock's `KubernetesEmulator` (objects stored in
memory, patches merged as JSON), taught the handful of API-server behaviours the operator's
correctness rests on, and nothing else:

- server-side apply (PATCH as application/apply-patch+yaml) creates an object that is missing;
- the server assigns uid, generation, resourceVersion and creationTimestamp on create, bumps the
  generation when a write changes the spec and the resourceVersion on every write;
- the server fills in defaults (Deployment replicas, container terminationMessagePath, Service
  clusterIP, HPA behavior, ...) and stores quantities in canonical form (4096Mi -> 4Gi), so the
  "observed already holds desired" check meets more than an echo of what was applied;
- LIST honours an equality- and existence-based labelSelector, serves one namespace or all, says
  the resourceVersion it was taken at and, like the real server, leaves apiVersion and kind out of
  the items of built-in types (kubernetes/kubernetes#3030);
- DELETE honours preconditions.uid (409 Conflict when the object was replaced);
- POST honours metadata.generateName;
- a write the server refuses (an error injected by a test included) changes nothing.

Faults are injected with kmock's DSL on the test side, e.g.
``kmock['patch /apis/apps/v1/namespaces/team-a/deployments/chat'] << KubernetesError(409, ...)``.

The operator reads from an object store its watches keep current. Here no watch runs: before each
reconcile the `controller` fixture fills the store by the same LISTs the operator's startup fill
makes (`Resync.once`), which is what the watches would have delivered by then. Tests that change a
stored object as another writer would (`modify`) get a new resourceVersion for it, as from the API
server, since the store takes an unchanged resourceVersion to mean an unchanged object.
"""

from __future__ import annotations

import copy
import json
import secrets
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import aiohttp.web
import pytest
import pytest_asyncio
from kmock import KubernetesEmulator, KubernetesError, Object, ObjectKey, Request, ResourceInfo, action, resource
from prometheus_client import CollectorRegistry

from llmservice_operator.kube import Kube
from llmservice_operator.metrics import OperatorMetrics
from llmservice_operator.reconcile import Key, Reconciler
from llmservice_operator.render import Capabilities, Manifest, RenderContext, render
from llmservice_operator.resync import Resync
from llmservice_operator.spec import parse
from llmservice_operator.store import ObjectStore

APPLY = "application/apply-patch+yaml"
FIELD_MANAGER = "llmservice-operator"
IMAGE = "img:test"
NOW = "2026-11-29T10:00:00Z"
NAMESPACE, NAME = "team-a", "chat"
KEY = Key(NAMESPACE, NAME)

# Resource keys for kmock.objects, written out rather than taken from the operator's RESOURCES.
LLMSERVICES = "llmservice.io/v1alpha1/llmservices"
DEPLOYMENTS = "apps/v1/deployments"
SERVICES = "v1/services"
HPAS = "autoscaling/v2/horizontalpodautoscalers"
PDBS = "policy/v1/poddisruptionbudgets"
EVENTS = "events.k8s.io/v1/events"
PVCS = "v1/persistentvolumeclaims"
JOBS = "batch/v1/jobs"

# Paths as the API server serves them, also written out: they are the contract under test.
LLMSERVICE_PATH = f"/apis/llmservice.io/v1alpha1/namespaces/{NAMESPACE}/llmservices/{NAME}"
STATUS_PATH = f"{LLMSERVICE_PATH}/status"
EVENTS_PATH = f"/apis/events.k8s.io/v1/namespaces/{NAMESPACE}/events"
COLLECTIONS = {
    "Deployment": f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments",
    "Service": f"/api/v1/namespaces/{NAMESPACE}/services",
    "HorizontalPodAutoscaler": f"/apis/autoscaling/v2/namespaces/{NAMESPACE}/horizontalpodautoscalers",
    "PodDisruptionBudget": f"/apis/policy/v1/namespaces/{NAMESPACE}/poddisruptionbudgets",
    "Pod": f"/api/v1/namespaces/{NAMESPACE}/pods",
    "PersistentVolumeClaim": f"/api/v1/namespaces/{NAMESPACE}/persistentvolumeclaims",
    "Job": f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs",
}
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

_DECLARED = {
    LLMSERVICES: ResourceInfo(kind="LLMService", namespaced=True, subresources={"status", "scale"}),
    DEPLOYMENTS: ResourceInfo(kind="Deployment", namespaced=True, subresources={"status", "scale"}),
    SERVICES: ResourceInfo(kind="Service", namespaced=True, subresources={"status"}),
    HPAS: ResourceInfo(kind="HorizontalPodAutoscaler", namespaced=True, subresources={"status"}),
    PDBS: ResourceInfo(kind="PodDisruptionBudget", namespaced=True, subresources={"status"}),
    "v1/pods": ResourceInfo(kind="Pod", namespaced=True, subresources={"status"}),
    EVENTS: ResourceInfo(kind="Event", namespaced=True),
    PVCS: ResourceInfo(kind="PersistentVolumeClaim", namespaced=True, subresources={"status"}),
    JOBS: ResourceInfo(kind="Job", namespaced=True, subresources={"status"}),
}
_BUILTIN_GROUPS = frozenset({"", "apps", "autoscaling", "policy", "events.k8s.io", "batch"})


class ApiServer(KubernetesEmulator):
    """kmock's KubernetesEmulator plus the API-server behaviours listed in the module docstring."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, info in _DECLARED.items():
            self.resources[key] = info
        self._version = 1000

    async def _handle(self, request: Request) -> aiohttp.web.StreamResponse:
        # kmock stores a write even when a reaction answers it with an error; the API server
        # stores nothing when it refuses a write, so a refused write is rolled back here.
        key = _object_key(request) if request.action in (action.UPDATE, action.DELETE) else None
        before = self._snapshot(key) if key is not None else None
        refusal = self._admit(request)
        try:
            response: aiohttp.web.StreamResponse = (
                await self._render_error(refusal) if refusal is not None else await super()._handle(request)
            )
        except Exception:
            if key is not None:
                self._restore(key, before)
            raise
        if key is not None and response.status >= 400:
            self._restore(key, before)
        return response

    def _stored(self, key: ObjectKey) -> Object | None:
        return self.objects[key] if key in self.objects and not self.objects[key].deleted else None

    def _snapshot(self, key: ObjectKey) -> list[dict[str, Any] | None] | None:
        if key not in self.objects:
            return None
        return [None if version is None else copy.deepcopy(version.raw) for version in self.objects[key].history]

    def _restore(self, key: ObjectKey, before: list[dict[str, Any] | None] | None) -> None:
        if before is not None:
            self.objects[key].history = before
        elif key in self.objects:
            del self.objects[key]

    def _admit(self, request: Request) -> KubernetesError | None:
        """What the API server does before storing a write; a refusal is returned, not raised."""
        if not isinstance(request.data, dict):
            return None
        if request.action == action.CREATE and request.resource is not None:
            metadata = request.data.setdefault("metadata", {})
            if "generateName" in metadata and not metadata.get("name"):
                metadata["name"] = metadata["generateName"] + secrets.token_hex(3)
            metadata.update(self._server_metadata())
            return None
        key = _object_key(request)
        if key is None:
            return None
        stored = self._stored(key)
        if request.action == action.UPDATE and stored is None:
            if header(request, "Content-Type") == APPLY and request.subresource is None:
                self.objects[key] = {"metadata": self._server_metadata()}  # apply creates; the patch then fills it
        elif request.action == action.UPDATE and stored is not None:
            metadata = dict(stored.raw["metadata"])
            metadata["resourceVersion"] = self.next_version()
            spec = request.data.get("spec")
            if request.subresource is None and spec is not None and not _holds(stored.raw.get("spec"), spec):
                metadata["generation"] = int(metadata.get("generation", 1)) + 1
            stored["metadata"] = metadata
        elif request.action == action.DELETE and stored is not None:
            wanted = (request.data.get("preconditions") or {}).get("uid")
            actual = stored.raw["metadata"].get("uid")
            if wanted is not None and wanted != actual:
                return KubernetesError(
                    status=409,
                    reason="Conflict",
                    message=f'Operation cannot be fulfilled on {key[0]} "{key[2]}": '
                    f"Precondition failed: UID in precondition: {wanted}, UID in object meta: {actual}",
                )
        return None

    def _server_metadata(self) -> dict[str, Any]:
        return {"uid": str(uuid.uuid4()), "generation": 1, "resourceVersion": self.next_version(), "creationTimestamp": NOW}

    def next_version(self) -> str:
        """A resourceVersion newer than every one given out so far."""
        self._version += 1
        return str(self._version)

    async def _serve_update(self, request: Request) -> Any:
        # Runs after the emulator merged the patch: fill in what the API server would default.
        key = _object_key(request)
        stored = self._stored(key) if key is not None and request.subresource is None else None
        if key is not None and stored is not None:
            for field, value in _defaults(str(key[0].plural), stored.raw).items():
                stored[field] = value
        return await super()._serve_update(request)

    async def _serve_list(self, request: Request) -> Any:
        listing = cast(dict[str, Any], await super()._serve_list(request))
        selector = _parse_selector(request.params.get("labelSelector", ""))
        items = [item for item in listing["items"] if _selected(item, selector)]
        if request.resource is not None and request.resource.group in _BUILTIN_GROUPS:
            items = [{k: v for k, v in item.items() if k not in ("apiVersion", "kind")} for item in items]
        return {**listing, "metadata": {"resourceVersion": str(self._version)}, "items": items}


def _object_key(request: Request) -> tuple[resource, str | None, str] | None:
    """The stored object a request addresses by URL, if it addresses one."""
    if request.resource is None or request.name is None:
        return None
    return (request.resource, request.namespace, request.name)


def _holds(stored: Any, patch: Any) -> bool:
    """Whether merging `patch` into `stored` would leave it as it is (lists and scalars replace)."""
    if isinstance(patch, Mapping):
        return isinstance(stored, Mapping) and all(k in stored and _holds(stored[k], v) for k, v in patch.items())
    return bool(stored == patch)


def _parse_selector(selector: str) -> list[tuple[str, str, str]]:
    terms: list[tuple[str, str, str]] = []
    for term in filter(None, (t.strip() for t in selector.split(","))):
        for op in ("!=", "==", "="):
            if op in term:
                key, value = term.split(op, 1)
                terms.append((key.strip(), "!=" if op == "!=" else "=", value.strip()))
                break
        else:
            if " " in term or "(" in term:  # set-based: in, notin
                raise KubernetesError(status=400, reason="BadRequest", message=f"unsupported selector term {term!r}")
            terms.append((term.lstrip("!"), "absent" if term.startswith("!") else "exists", ""))
    return terms


def _selected(item: Mapping[str, Any], terms: list[tuple[str, str, str]]) -> bool:
    labels = (item.get("metadata") or {}).get("labels") or {}
    for key, op, value in terms:
        if op == "exists" and key not in labels:
            return False
        if op == "absent" and key in labels:
            return False
        if op in ("=", "!=") and (labels.get(key) == value) != (op == "="):
            return False
    return True


def _canonical(quantity: Any) -> Any:
    if isinstance(quantity, str) and quantity.endswith("Mi") and quantity[:-2].isdigit() and int(quantity[:-2]) % 1024 == 0:
        return f"{int(quantity[:-2]) // 1024}Gi"
    return quantity


def _defaults(plural: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level fields to replace so the object carries the API server's defaults."""
    spec = copy.deepcopy(dict(obj.get("spec") or {}))
    if plural == "deployments":
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        pod = spec.setdefault("template", {}).setdefault("spec", {})
        pod.setdefault("restartPolicy", "Always")
        pod.setdefault("dnsPolicy", "ClusterFirst")
        pod.setdefault("schedulerName", "default-scheduler")
        for container in pod.get("containers") or []:
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in container:
                    container[probe].setdefault("successThreshold", 1)
                    container[probe].get("httpGet", {}).setdefault("scheme", "HTTP")
            for which in ("requests", "limits"):
                quantities = (container.get("resources") or {}).get(which) or {}
                quantities.update({name: _canonical(value) for name, value in quantities.items()})
    elif plural == "services":
        spec.setdefault("clusterIP", "10.96.12.34")
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("internalTrafficPolicy", "Cluster")
    elif plural == "horizontalpodautoscalers":
        spec.setdefault(
            "behavior",
            {
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "selectPolicy": "Max",
                    "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}],
                },
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "selectPolicy": "Max",
                    "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}, {"type": "Pods", "value": 4, "periodSeconds": 15}],
                },
            },
        )
    else:
        return {}
    return {"spec": spec}


def header(request: Request, name: str) -> str | None:
    """A request header by case-insensitive name."""
    for key, value in request.headers.items():
        if key.lower() == name.lower():
            return str(value)
    return None


@pytest.fixture
def kmock_options(kmock_options: dict[str, Any]) -> dict[str, Any]:
    """The `kmock` fixture serves our ApiServer instead of the bare emulator."""
    return {**kmock_options, "cls": ApiServer}


@dataclass
class Controller:
    """The reconciler as the operator builds it, over a real HTTP client pointed at kmock, with its store."""

    kmock: ApiServer
    reconciler: Reconciler
    resync: Resync
    store: ObjectStore
    registry: CollectorRegistry
    queued: list[Key] = field(default_factory=list)  # what every resync so far put on the work queue
    requeued: list[tuple[Key, float]] = field(default_factory=list)  # (key, delay) the reconciler asked to look again
    mark: int = 0  # requests made before the last reconcile began

    async def sync(self) -> list[Key]:
        """Fill the store by the startup fill's LISTs, as the watches would have; the LLMServices queued."""
        return await self.resync.once()

    async def reconcile(self, key: Key = KEY, *, sync: bool = True) -> str:
        """One reconcile, for its result; first the store learns what the API server holds."""
        if sync:
            await self.sync()
        self.mark = len(list(self.kmock))
        return await self.reconciler.reconcile(key)

    async def run(self, key: Key = KEY, *, sync: bool = True) -> None:
        """One reconcile as the work queue runs it: counted in the metrics, errors as RetryLater."""
        if sync:
            await self.sync()
        self.mark = len(list(self.kmock))
        await self.reconciler(key)

    def requests(self) -> list[Request]:
        """The requests of the last reconcile (the store's fill before it excluded)."""
        return list(self.kmock)[self.mark :]

    def reconciles(self, result: str) -> float:
        value = self.registry.get_sample_value("llmservice_operator_reconciles_total", {"result": result})
        return value or 0.0

    def api_requests(self, verb: str, code: str) -> float:
        value = self.registry.get_sample_value("llmservice_operator_api_requests_total", {"verb": verb, "code": code})
        return value or 0.0


@pytest_asyncio.fixture
async def controller(kmock: ApiServer) -> AsyncIterator[Controller]:
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    store = ObjectStore()
    queued: list[Key] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as http:
        kube = Kube(http, str(kmock.url), FIELD_MANAGER, metrics)
        # Cluster-wide, as the operator runs by default.
        resync = Resync(kube, store, (), queued.append)
        requeued: list[tuple[Key, float]] = []
        reconciler = Reconciler(kube, store, metrics, IMAGE, clock=lambda: NOW, requeue=lambda key, delay: requeued.append((key, delay)))
        yield Controller(kmock, reconciler, resync, store, registry, queued, requeued)


def seed(kmock: ApiServer, llmservice: Manifest) -> None:
    """Store an LLMService as `kubectl apply` would have left it."""
    metadata = llmservice["metadata"]
    kmock.objects[LLMSERVICES, metadata["namespace"], metadata["name"]] = copy.deepcopy(llmservice)


def rendered(llmservice: Manifest) -> list[Manifest]:
    """What the operator should apply for this LLMService on a cluster without optional APIs."""
    return render(parse(llmservice), RenderContext(IMAGE, Capabilities()))


def requests(kmock: ApiServer, since: int = 0) -> list[Request]:
    return list(kmock)[since:]


def writes(kmock: ApiServer, since: int = 0) -> list[Request]:
    return [r for r in requests(kmock, since) if r.method.value in WRITE_METHODS]


def child_writes(kmock: ApiServer, since: int = 0) -> list[Request]:
    """Writes to anything but the LLMService's own status and Events."""
    return [r for r in writes(kmock, since) if r.url.path not in (STATUS_PATH, EVENTS_PATH)]


def by_verb(reqs: list[Request]) -> Counter[str]:
    return Counter(r.method.value for r in reqs)


def body_of(request: Request) -> Manifest:
    """The JSON document the client sent (JSON is YAML, so this is what SSA parsed)."""
    document: Manifest = json.loads(request.body)
    return document


def modify(kmock: ApiServer, resource: str, name: str = NAME, **fields: Any) -> None:
    """Another writer (kubectl, a controller) replaces top-level fields of a stored object.

    The API server gives the object a new resourceVersion, whatever metadata the writer sent.
    """
    obj = kmock.objects[resource, NAMESPACE, name]
    metadata = dict(fields.pop("metadata", obj.raw["metadata"]))
    for key, value in fields.items():
        obj[key] = value
    obj["metadata"] = {**metadata, "resourceVersion": kmock.next_version()}


def stored(kmock: ApiServer, resource: str, name: str = NAME) -> Manifest:
    raw: Manifest = kmock.objects[resource, NAMESPACE, name].raw
    return raw


def exists(kmock: ApiServer, resource: str, name: str = NAME) -> bool:
    try:
        return not kmock.objects[resource, NAMESPACE, name].deleted
    except KeyError:
        return False


def roll_out(kmock: ApiServer, name: str = NAME, replicas: int | None = None) -> None:
    """Play the Deployment controller: every desired replica updated, ready and available.

    `replicas` plays the HPA, which owns spec.replicas of an autoscaled Deployment.
    """
    raw = kmock.objects[DEPLOYMENTS, NAMESPACE, name].raw
    spec = raw["spec"] if replicas is None else {**raw["spec"], "replicas": replicas}
    want = int(spec.get("replicas", 1))
    modify(
        kmock,
        DEPLOYMENTS,
        name,
        spec=spec,
        status={
            "observedGeneration": raw["metadata"]["generation"],
            "replicas": want,
            "updatedReplicas": want,
            "readyReplicas": want,
            "availableReplicas": want,
            "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
            ],
        },
    )


async def settle(kmock: ApiServer, controller: Controller, replicas: int | None = None) -> int:
    """Reconcile a seeded LLMService until it is Ready; returns the request count at that point."""
    assert await controller.reconcile() == "applied"
    roll_out(kmock, replicas=replicas)
    assert await controller.reconcile() == "applied"  # Ready now: the status says so
    ready = next(c for c in stored(kmock, LLMSERVICES)["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True", ready
    return len(list(kmock))
