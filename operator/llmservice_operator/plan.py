"""What one reconcile writes: the desired children against the observed ones, as a plan.

Pure: manifests in, a plan out; `reconcile` executes it. Two rules live here:

- never touch what is not ours: only objects whose controller reference is this LLMService are
  updated or pruned. One that carries our labels but holds a desired name without being ours (a
  deleted predecessor's child, a copy someone made) is `held`, and nothing is written while any is;
- a Job's pod template cannot change: a Job whose rendered form differs from the observed one is
  replaced (deleted, then applied again), not patched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llmservice_operator.diff import contains
from llmservice_operator.kinds import KINDS
from llmservice_operator.render import Manifest

ObjectKey = tuple[str, str]  # (kind, name) within the LLMService's namespace


@dataclass(frozen=True)
class Write:
    """One desired child to apply, and the observed one of ours it changes (None: none observed)."""

    manifest: Manifest
    current: Manifest | None
    replace: bool = False  # delete `current` first: its kind cannot be changed in place

    @property
    def key(self) -> ObjectKey:
        return key_of(self.manifest)


@dataclass(frozen=True)
class Plan:
    ours: Mapping[ObjectKey, Manifest]  # the observed children this LLMService controls
    held: tuple[Manifest, ...]  # observed objects holding a desired name that are not ours: block every write
    unseen: tuple[Manifest, ...]  # desired children with no object observed under their name: check it is free first
    writes: tuple[Write, ...]  # in render order
    prune: tuple[Manifest, ...]  # ours, no longer rendered; sorted by kind and name

    @property
    def empty(self) -> bool:
        return not (self.held or self.writes or self.prune)


def key_of(item: Manifest) -> ObjectKey:
    return item["kind"], item["metadata"]["name"]


def controlled_by(item: Manifest, uid: str) -> bool:
    return any(ref.get("uid") == uid and ref.get("controller") for ref in item["metadata"].get("ownerReferences") or [])


def owned(observed: Mapping[ObjectKey, Manifest], owner_uid: str) -> dict[ObjectKey, Manifest]:
    """The observed objects whose controller is the LLMService with this uid."""
    return {key: item for key, item in observed.items() if controlled_by(item, owner_uid)}


def plan(desired: Sequence[Manifest], observed: Mapping[ObjectKey, Manifest], owner_uid: str) -> Plan:
    """Compare the rendered children with the observed ones (every object labelled as this LLMService's)."""
    ours = owned(observed, owner_uid)
    wanted = {key_of(manifest) for manifest in desired}
    held: list[Manifest] = []
    unseen: list[Manifest] = []
    writes: list[Write] = []
    for manifest in desired:
        key = key_of(manifest)
        if key in observed and key not in ours:
            held.append(observed[key])
            continue
        current = ours.get(key)
        if current is None:
            unseen.append(manifest)
            writes.append(Write(manifest, None))
        elif not contains(current, manifest):
            writes.append(Write(manifest, current, replace=KINDS[manifest["kind"]].replaced))
    prune = tuple(item for key, item in sorted(ours.items()) if key not in wanted)
    return Plan(ours, tuple(held), tuple(unseen), tuple(writes), prune)
