"""kopf wiring only: watch events into the object store, the LLMServices they concern onto the work queue.

Every handler is a `kopf.on.event` handler. Those carry no state in the object (no
last-handled-configuration annotation, no progress in status, no finalizer), so the operator
writes nothing into an LLMService but its status, and a settled object costs zero writes.
Retries and de-duplication live in the work queue instead of kopf's handler state.
"""

from __future__ import annotations

from typing import Any

import kopf

from llmservice_operator import naming
from llmservice_operator.kinds import KINDS, WATCHED
from llmservice_operator.reconcile import Key
from llmservice_operator.spec import KIND
from llmservice_operator.store import ObjectStore
from llmservice_operator.workqueue import WorkQueue

# The same objects the resync lists with naming.managed_selector().
CHILD_LABELS: dict[str, Any] = {naming.MANAGED_BY_LABEL: naming.MANAGED_BY, naming.NAME_LABEL: kopf.PRESENT}


def register(registry: kopf.OperatorRegistry, queue: WorkQueue[Key], store: ObjectStore) -> None:
    """Watch LLMServices and, by our labels, everything made for them: drift, rollouts, pod failures."""
    for kind in WATCHED:
        resource = KINDS[kind]
        kopf.on.event(
            resource.group,
            resource.version,
            resource.plural,
            labels=None if kind == KIND else CHILD_LABELS,
            registry=registry,
            id=f"watch-{resource.plural}",
        )(_observer(kind, queue, store))


def narrow_watches(settings: kopf.OperatorSettings) -> None:
    """Ask the API server for our children only: the handlers' `labels=` filter runs client-side.

    Without this, the Pod, Deployment and Service watches stream every such object in the watched
    namespaces (the whole cluster by default) to be decoded and dropped here; with it the operator
    costs what its LLMServices cost, whatever else runs in the cluster. The resync LISTs use the
    same selector.
    """
    for kind in WATCHED:
        if kind != KIND:
            resource = KINDS[kind]
            settings.watching.label_selectors[(resource.group, resource.version, resource.plural)] = naming.managed_selector()


def _observer(kind: str, queue: WorkQueue[Key], store: ObjectStore) -> Any:
    # A coroutine, though it never awaits: kopf runs a plain function in its thread pool (a thread
    # hop and two tasks per watch event), and the store and the queue belong to the event loop.
    async def observe(event: kopf.RawEvent, **_: Any) -> None:
        body = event["object"]
        if event["type"] == "DELETED":
            metadata = body.get("metadata") or {}
            changed = store.remove(kind, metadata.get("namespace") or "", metadata.get("name") or "", uid=metadata.get("uid"))
        else:  # None (kopf's initial or renewed listing), ADDED, MODIFIED
            changed = store.upsert(kind, body)
        # Only what changed the store wakes a reconcile: the echo of our own write does not.
        for namespace, name in changed:
            queue.add(Key(namespace, name))

    return observe
