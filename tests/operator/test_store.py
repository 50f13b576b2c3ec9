"""The object store: what the watches and our writes tell it, indexed by the LLMService a child belongs to."""

from __future__ import annotations

import copy
from types import MappingProxyType
from typing import Any

from llmservice_operator.store import LAST_APPLIED, ObjectStore

NS = "team-a"


def child(name: str, service: str | None, version: str, *, namespace: str = NS, uid: str = "uid-1", **extra: Any) -> dict[str, Any]:
    labels = {"app.kubernetes.io/managed-by": "llmservice-operator"}
    if service is not None:
        labels["llmservice.io/name"] = service
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": version, "labels": labels},
        **extra,
    }


def llmservice(name: str, version: str, *, namespace: str = NS) -> dict[str, Any]:
    return {
        "apiVersion": "llmservice.io/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "resourceVersion": version},
    }


def test_a_child_is_found_through_the_llmservice_its_label_names() -> None:
    store = ObjectStore()

    assert store.upsert("Deployment", child("chat", "chat", "10")) == {(NS, "chat")}
    assert store.upsert("Deployment", child("other", "other", "11")) == {(NS, "other")}
    assert store.upsert("Deployment", child("chat", "chat", "12", namespace="team-b")) == {("team-b", "chat")}
    assert store.upsert("Service", child("chat", "chat", "13")) == {(NS, "chat")}

    found = store.children(NS, "chat", ["Deployment", "Service", "PodDisruptionBudget"])
    assert [(kind, body["metadata"]["namespace"], body["metadata"]["name"]) for kind, body in found] == [
        ("Deployment", NS, "chat"),
        ("Service", NS, "chat"),
    ]
    assert store.children(NS, "chat", ["Service"]) == [("Service", store.get("Service", NS, "chat"))]
    assert store.children(NS, "nobody", ["Deployment", "Service"]) == []
    assert (store.count("Deployment"), store.count("Service"), store.count("Pod")) == (3, 1, 0)


def test_pods_are_found_by_their_llmservice() -> None:
    store = ObjectStore()
    store.upsert("Pod", child("chat-abc", "chat", "5"))
    store.upsert("Pod", child("chat-def", "chat", "6"))
    store.upsert("Pod", child("other-abc", "other", "7"))

    assert sorted(pod["metadata"]["name"] for pod in store.pods(NS, "chat")) == ["chat-abc", "chat-def"]


def test_an_object_without_the_name_label_is_stored_but_belongs_to_nobody() -> None:
    store = ObjectStore()

    assert store.upsert("Deployment", child("stray", None, "5")) == set()

    assert store.get("Deployment", NS, "stray") is not None
    assert store.children(NS, "stray", ["Deployment"]) == []


def test_an_llmservice_belongs_to_itself() -> None:
    store = ObjectStore()

    assert store.upsert("LLMService", llmservice("chat", "3")) == {(NS, "chat")}
    assert store.get("LLMService", NS, "chat") == llmservice("chat", "3")
    assert store.remove("LLMService", NS, "chat") == {(NS, "chat")}
    assert store.get("LLMService", NS, "chat") is None


def test_stored_bodies_are_plain_copies_without_managed_fields_or_last_applied() -> None:
    body = child("chat", "chat", "10", spec={"replicas": 1, "template": {"spec": {"containers": [{"name": "server"}]}}})
    body["metadata"]["managedFields"] = [{"manager": "llmservice-operator", "fieldsV1": {"f:spec": {}}}]
    body["metadata"]["annotations"] = {LAST_APPLIED: '{"a huge": "copy"}', "team": "search"}
    # kopf hands bodies over as read-only mapping views.
    view = MappingProxyType({**body, "metadata": MappingProxyType(body["metadata"])})
    store = ObjectStore()

    store.upsert("Deployment", view)
    body["spec"]["template"]["spec"]["containers"][0]["name"] = "changed after it was stored"

    stored = store.get("Deployment", NS, "chat")
    assert stored is not None
    assert type(stored) is dict and type(stored["metadata"]) is dict
    assert "managedFields" not in stored["metadata"]
    assert stored["metadata"]["annotations"] == {"team": "search"}
    assert stored["spec"]["template"]["spec"]["containers"] == [{"name": "server"}]


def test_the_same_version_again_changes_nothing_and_wakes_nobody() -> None:
    store = ObjectStore()
    store.upsert("Deployment", child("chat", "chat", "10", status={"readyReplicas": 1}))

    assert store.upsert("Deployment", child("chat", "chat", "10", status={"readyReplicas": 1})) == set()


def test_an_event_older_than_our_write_does_not_undo_it() -> None:
    store = ObjectStore()
    store.upsert("Deployment", child("chat", "chat", "10", spec={"image": "old"}))
    store.upsert("Deployment", child("chat", "chat", "12", spec={"image": "new"}))  # our apply's response

    # The watch is still delivering what happened before our write.
    assert store.upsert("Deployment", child("chat", "chat", "11", spec={"image": "old"}, status={"ready": 1})) == set()
    assert store.get("Deployment", NS, "chat") == child("chat", "chat", "12", spec={"image": "new"})

    # Versions compare as integers, not as strings ("9" < "12" < "100").
    assert store.upsert("Deployment", child("chat", "chat", "9")) == set()
    assert store.upsert("Deployment", child("chat", "chat", "100", spec={"image": "newest"})) == {(NS, "chat")}
    stored = store.get("Deployment", NS, "chat")
    assert stored is not None and stored["spec"] == {"image": "newest"}


def test_versions_that_are_not_integers_are_taken_in_arrival_order() -> None:
    store = ObjectStore()
    store.upsert("Deployment", child("chat", "chat", "b", spec={"image": "first"}))

    assert store.upsert("Deployment", child("chat", "chat", "a", spec={"image": "second"})) == {(NS, "chat")}
    stored = store.get("Deployment", NS, "chat")
    assert stored is not None and stored["spec"] == {"image": "second"}


def test_relabelling_a_child_moves_it_and_wakes_both_llmservices() -> None:
    store = ObjectStore()
    store.upsert("Service", child("shared", "chat", "10"))

    assert store.upsert("Service", child("shared", "other", "11")) == {(NS, "chat"), (NS, "other")}

    assert store.children(NS, "chat", ["Service"]) == []
    assert [body["metadata"]["name"] for _, body in store.children(NS, "other", ["Service"])] == ["shared"]


def test_remove_forgets_only_the_incarnation_that_was_deleted() -> None:
    store = ObjectStore()
    store.upsert("Deployment", child("chat", "chat", "20", uid="new-uid"))

    # The DELETED event of the object this one replaced arrives late.
    assert store.remove("Deployment", NS, "chat", uid="old-uid") == set()
    assert store.get("Deployment", NS, "chat") is not None

    assert store.remove("Deployment", NS, "chat", uid="new-uid") == {(NS, "chat")}
    assert store.get("Deployment", NS, "chat") is None
    assert store.children(NS, "chat", ["Deployment"]) == []
    assert store.remove("Deployment", NS, "chat") == set()


def test_replace_reports_the_llmservices_whose_objects_changed_or_vanished() -> None:
    store = ObjectStore()
    for name, version in (("a", "10"), ("b", "11"), ("c", "12")):
        store.upsert("Deployment", child(name, name, version))

    listing = [child("a", "a", "10"), child("b", "b", "15"), child("d", "d", "16")]
    assert store.replace("Deployment", None, listing, "20") == {(NS, "b"), (NS, "c"), (NS, "d")}

    assert store.get("Deployment", NS, "c") is None
    assert store.children(NS, "c", ["Deployment"]) == []
    assert [(store.get("Deployment", NS, name) or {}).get("metadata", {}).get("resourceVersion") for name in "abd"] == ["10", "15", "16"]
    assert store.count("Deployment") == 3
    assert store.replace("Deployment", None, copy.deepcopy(listing), "21") == set()


def test_replace_in_one_namespace_leaves_the_others_alone() -> None:
    store = ObjectStore()
    store.upsert("Deployment", child("chat", "chat", "10"))
    store.upsert("Deployment", child("chat", "chat", "11", namespace="team-b"))

    assert store.replace("Deployment", NS, [], "30") == {(NS, "chat")}

    assert store.get("Deployment", NS, "chat") is None
    assert store.get("Deployment", "team-b", "chat") is not None


def test_replace_keeps_what_was_written_after_the_listing_was_taken() -> None:
    store = ObjectStore()
    store.upsert("Deployment", child("old", "old", "10"))
    store.upsert("Deployment", child("chat", "chat", "25"))  # our apply created it after the LIST at 20

    assert store.replace("Deployment", None, [], "20") == {(NS, "old")}

    assert store.get("Deployment", NS, "chat") is not None


def test_replace_without_a_comparable_listing_version_trusts_the_listing() -> None:
    store = ObjectStore()
    store.upsert("Deployment", child("chat", "chat", "25"))

    assert store.replace("Deployment", None, [], None) == {(NS, "chat")}
    assert store.get("Deployment", NS, "chat") is None


def test_a_listing_taken_before_a_deletion_does_not_bring_the_object_back() -> None:
    store = ObjectStore()
    store.upsert("Deployment", child("chat", "chat", "10", uid="uid-chat"))
    listing = [child("chat", "chat", "10", uid="uid-chat")]  # the LIST was answered before the delete...

    store.begin_listing("Deployment")
    assert store.remove("Deployment", NS, "chat", uid="uid-chat") == {(NS, "chat")}  # ...whose event came first
    assert store.replace("Deployment", None, listing, "10") == set()

    assert store.get("Deployment", NS, "chat") is None
    # The next listing, begun after the deletion, no longer holds it.
    store.begin_listing("Deployment")
    assert store.replace("Deployment", None, [], "11") == set()
