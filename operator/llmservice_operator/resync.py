"""Fills the object store by LIST at startup, and re-lists it now and then to repair what watches missed.

A watch resumes from its last resourceVersion; after a 410 Gone kopf lists again, and a fresh list
says nothing of what was deleted in the gap, so the store would keep those objects and the
reconciler would never re-create them. A periodic re-list compares the whole truth with the store
and wakes only the LLMServices whose objects differ: when nothing was missed it costs the LISTs
and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from llmservice_operator import naming
from llmservice_operator.kinds import KINDS, WATCHED
from llmservice_operator.kube import Kube, KubeError
from llmservice_operator.reconcile import Key
from llmservice_operator.spec import KIND
from llmservice_operator.store import ObjectStore

log = logging.getLogger(__name__)


class Resync:
    def __init__(self, kube: Kube, store: ObjectStore, namespaces: tuple[str, ...], enqueue: Callable[[Key], object]) -> None:
        self._kube = kube
        self._store = store
        self._scopes: tuple[str | None, ...] = namespaces or (None,)
        self._enqueue = enqueue

    async def once(self) -> list[Key]:
        """List every watched kind in every watched scope into the store; queue what changed.

        Each kind is replaced as soon as it is listed, and its LLMServices queued then, so a LIST
        failing half-way loses none of the repairs already found.
        """
        woken: dict[Key, None] = {}  # ordered and without repeats
        for kind in WATCHED:
            # Our own label on children: the LIST is no wider than the watch that feeds the store.
            selector = None if kind == KIND else naming.managed_selector()
            api_version = KINDS[kind].api_version
            for namespace in self._scopes:
                self._store.begin_listing(kind)
                listing = await self._kube.list(kind, namespace, selector)
                # Items of built-in kinds come without apiVersion and kind (kubernetes#3030);
                # watch events and write responses carry them, so every stored body does.
                items = [{**item, "apiVersion": api_version, "kind": kind} for item in listing.items]
                changed = self._store.replace(kind, namespace, items, listing.resource_version)
                for service in sorted(changed):
                    key = Key(*service)
                    if key not in woken:
                        woken[key] = None
                        self._enqueue(key)
        return list(woken)

    async def run(self, interval: float) -> None:
        """Resync every `interval` seconds until cancelled; a failed one is tried again next time."""
        while True:
            await asyncio.sleep(interval)
            try:
                woken = await self.once()
            except KubeError as error:
                log.warning("Resync failed: %s; trying again in %.0f s", error, interval)
                continue
            if woken:
                # Usually events still on their way; a deletion a re-listed watch never reported otherwise.
                log.info(
                    "Resync found the store behind the API server for %d LLMService(s): %s",
                    len(woken),
                    ", ".join(str(key) for key in woken[:10]),
                )
