"""The operator's vocabulary: every kind it talks about, and what it does with each.

One table, read by `kube` (URLs), `resync` and `handlers` (what is listed and watched) and
`reconcile` (which children to observe, which to replace rather than patch). A kind added here is
watched, listed and observed everywhere at once. Pure: no client.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmservice_operator.spec import API_VERSION, KIND, PLURAL


@dataclass(frozen=True)
class Kind:
    name: str
    api_version: str
    plural: str
    watched: bool = False  # listed into the store and watched (children and pods: by our labels only)
    child: bool = False  # rendered for an LLMService, owned by it, pruned when no longer rendered
    optional: bool = False  # served only when its CRD is installed (the prometheus-operator's)
    replaced: bool = False  # its template cannot change: a changed one is deleted and created again

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]  # "" for the core group

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        """The URL path; namespace None addresses the collection across all namespaces."""
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        path = f"{prefix}/{self.plural}" if namespace is None else f"{prefix}/namespaces/{namespace}/{self.plural}"
        if name is not None:
            path += f"/{name}"
        if subresource is not None:
            path += f"/{subresource}"
        return path


# In the order the store is filled at start-up: the LLMServices first, so no child is listed
# before the object it belongs to.
KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind(KIND, API_VERSION, PLURAL, watched=True),
        Kind("Deployment", "apps/v1", "deployments", watched=True, child=True),
        Kind("Service", "v1", "services", watched=True, child=True),
        Kind("HorizontalPodAutoscaler", "autoscaling/v2", "horizontalpodautoscalers", watched=True, child=True),
        Kind("PodDisruptionBudget", "policy/v1", "poddisruptionbudgets", watched=True, child=True),
        # Watched whether or not their CRDs are installed: kopf starts watching them when the CRDs
        # appear, and the LIST answers 404 (nothing) until then.
        Kind("ServiceMonitor", "monitoring.coreos.com/v1", "servicemonitors", watched=True, child=True, optional=True),
        Kind("PodMonitor", "monitoring.coreos.com/v1", "podmonitors", watched=True, child=True, optional=True),
        Kind("Pod", "v1", "pods", watched=True),
        Kind("PersistentVolumeClaim", "v1", "persistentvolumeclaims", watched=True, child=True),
        Kind("Job", "batch/v1", "jobs", watched=True, child=True, replaced=True),
        Kind("Event", "events.k8s.io/v1", "events"),
        Kind("Lease", "coordination.k8s.io/v1", "leases"),
    )
}

WATCHED: tuple[str, ...] = tuple(name for name, kind in KINDS.items() if kind.watched)
CHILDREN: tuple[str, ...] = tuple(name for name, kind in KINDS.items() if kind.child)
