"""kopf wiring only: watch events in, keys onto the work queue.

Every handler is a `kopf.on.event` handler. Those carry no state in the object (no
last-handled-configuration annotation, no progress in status, no finalizer), so the operator
writes nothing into an LLMService but its status, and a settled object costs zero writes.
Retries and de-duplication live in the work queue instead of kopf's handler state.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from llmservice_operator import naming
from llmservice_operator.reconcile import Key
from llmservice_operator.spec import GROUP, PLURAL, VERSION
from llmservice_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

# Children whose changes must wake their LLMService: drift repair, rollout progress, pod failures.
WATCHED_CHILDREN = (
    ("apps", "v1", "deployments"),
    ("", "v1", "services"),
    ("autoscaling", "v2", "horizontalpodautoscalers"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("", "v1", "pods"),
)


def register(registry: kopf.OperatorRegistry, queue: WorkQueue[Key]) -> None:
    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def llmservice_changed(namespace: str | None, name: str, **_: Any) -> None:
        if namespace is not None:
            queue.add(Key(namespace, name))

    for group, version, plural in WATCHED_CHILDREN:
        kopf.on.event(
            group, version, plural,
            labels={naming.MANAGED_BY_LABEL: naming.MANAGED_BY, naming.NAME_LABEL: kopf.PRESENT},
            registry=registry, id=f"child-{plural}",
        )(_child_changed(queue))


def _child_changed(queue: WorkQueue[Key]) -> Any:
    def child_changed(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
        if namespace is not None:
            queue.add(Key(namespace, labels[naming.NAME_LABEL]))

    return child_changed
