"""plan(desired, observed): what a reconcile applies, replaces and prunes, as a table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from llmservice_operator.kinds import CHILDREN, KINDS, WATCHED
from llmservice_operator.plan import plan

UID = "uid-ours"


def child(kind: str, name: str, *, owner: str | None = UID, value: str = "a", **extra: Any) -> dict[str, Any]:
    """A child as rendered (owner None: no controller reference) or as observed (with `extra` metadata)."""
    refs = [] if owner is None else [{"uid": owner, "controller": True, "kind": "LLMService", "name": "svc"}]
    return {"kind": kind, "metadata": {"name": name, "ownerReferences": refs, **extra}, "spec": {"value": value}}


def seen(kind: str, name: str, **kwargs: Any) -> dict[str, Any]:
    return child(kind, name, uid=f"{kind}-{name}", **kwargs)


@dataclass(frozen=True)
class Case:
    desired: list[dict[str, Any]]
    observed: list[dict[str, Any]]
    writes: list[tuple[str, str, bool]] = field(default_factory=list)  # (kind, name, replace)
    prune: list[tuple[str, str]] = field(default_factory=list)
    held: list[tuple[str, str]] = field(default_factory=list)
    unseen: list[tuple[str, str]] = field(default_factory=list)


CASES = {
    "a new LLMService: every child is written, each name checked first": Case(
        desired=[child("Deployment", "svc"), child("Service", "svc")],
        observed=[],
        writes=[("Deployment", "svc", False), ("Service", "svc", False)],
        unseen=[("Deployment", "svc"), ("Service", "svc")],
    ),
    "settled: nothing to do": Case(
        desired=[child("Deployment", "svc"), child("Service", "svc")],
        observed=[seen("Deployment", "svc"), seen("Service", "svc")],
    ),
    "server defaults and other managers' fields are not drift": Case(
        desired=[child("Deployment", "svc")],
        observed=[{**seen("Deployment", "svc"), "spec": {"value": "a", "replicas": 3}, "status": {"ready": 1}}],
    ),
    "drift is applied in place": Case(
        desired=[child("Deployment", "svc", value="b"), child("Service", "svc")],
        observed=[seen("Deployment", "svc"), seen("Service", "svc")],
        writes=[("Deployment", "svc", False)],
    ),
    "a changed Job is replaced, not patched": Case(
        desired=[child("Job", "svc-fetch", value="b"), child("Deployment", "svc")],
        observed=[seen("Job", "svc-fetch"), seen("Deployment", "svc")],
        writes=[("Job", "svc-fetch", True)],
    ),
    "an unchanged Job stays": Case(desired=[child("Job", "svc-fetch")], observed=[seen("Job", "svc-fetch")]),
    "a child no longer rendered is pruned": Case(
        desired=[child("Deployment", "svc")],
        observed=[seen("Deployment", "svc"), seen("HorizontalPodAutoscaler", "svc"), seen("PodDisruptionBudget", "svc")],
        prune=[("HorizontalPodAutoscaler", "svc"), ("PodDisruptionBudget", "svc")],
    ),
    "an object with our labels that is not ours is never pruned": Case(
        desired=[child("Deployment", "svc")],
        observed=[seen("Deployment", "svc"), seen("Service", "other", owner="uid-theirs"), seen("Job", "x", owner=None)],
    ),
    "a desired name held by another owner blocks, and is not written": Case(
        desired=[child("Deployment", "svc", value="b"), child("Service", "svc")],
        observed=[seen("Deployment", "svc", owner="uid-predecessor"), seen("Service", "svc")],
        held=[("Deployment", "svc")],
    ),
    "a desired name held by an object without a controller blocks": Case(
        desired=[child("Service", "svc")],
        observed=[seen("Service", "svc", owner=None)],
        held=[("Service", "svc")],
    ),
    "the same name in another kind is another object": Case(
        desired=[child("Service", "svc")],
        observed=[seen("Deployment", "svc")],
        writes=[("Service", "svc", False)],
        unseen=[("Service", "svc")],
        prune=[("Deployment", "svc")],
    ),
}


def keys(items: Any) -> list[tuple[str, str]]:
    return [(item["kind"], item["metadata"]["name"]) for item in items]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_plan(case: Case) -> None:
    observed = {(item["kind"], item["metadata"]["name"]): item for item in case.observed}
    result = plan(case.desired, observed, UID)
    assert [(*write.key, write.replace) for write in result.writes] == case.writes
    assert keys(result.prune) == case.prune
    assert keys(result.held) == case.held
    assert keys(result.unseen) == case.unseen
    assert result.empty == (not (case.writes or case.prune or case.held))
    for write in result.writes:
        assert write.current is observed.get(write.key), "a write carries the object it changes (or None)"
    assert all(item["metadata"]["ownerReferences"][0]["uid"] == UID for item in result.prune)


def test_the_vocabulary_watches_every_child_and_replaces_only_jobs() -> None:
    assert set(CHILDREN) <= set(WATCHED)
    assert "Pod" in WATCHED and "Pod" not in CHILDREN  # read for status, never written
    assert [name for name, kind in KINDS.items() if kind.replaced] == ["Job"]
    assert {name for name, kind in KINDS.items() if kind.optional} == {"ServiceMonitor", "PodMonitor"}
    assert KINDS["Deployment"].path("ns", "svc") == "/apis/apps/v1/namespaces/ns/deployments/svc"
    assert KINDS["Pod"].path(None) == "/api/v1/pods"
    assert (KINDS["Service"].group, KINDS["Service"].version) == ("", "v1")
