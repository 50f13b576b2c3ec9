"""The watches ask the API server for the operator's children only, by the label selector the resync lists with."""

from __future__ import annotations

import kopf

from llmservice_operator import handlers, naming
from llmservice_operator.kinds import KINDS, WATCHED
from llmservice_operator.spec import KIND


def resource(kind: str) -> kopf.Resource:
    spec = KINDS[kind]
    return kopf.Resource(group=spec.group, version=spec.version, plural=spec.plural, kind=kind, namespaced=True)


def test_child_watches_are_narrowed_server_side_and_llmservices_are_not() -> None:
    settings = kopf.OperatorSettings()
    handlers.narrow_watches(settings)
    for kind in WATCHED:
        expected = [] if kind == KIND else [naming.managed_selector()]
        assert settings.watching.label_selectors.collect(resource(kind)) == expected, kind


def test_nothing_else_is_narrowed() -> None:
    settings = kopf.OperatorSettings()
    handlers.narrow_watches(settings)
    config_maps = kopf.Resource(group="", version="v1", plural="configmaps", kind="ConfigMap", namespaced=True)
    replica_sets = kopf.Resource(group="apps", version="v1", plural="replicasets", kind="ReplicaSet", namespaced=True)
    assert settings.watching.label_selectors.collect(config_maps) == []
    assert settings.watching.label_selectors.collect(replica_sets) == []
