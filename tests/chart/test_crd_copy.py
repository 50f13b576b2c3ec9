"""The chart's copy of the CRD is exactly what scripts/sync-chart-crd.py generates from crds/."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "sync-chart-crd.py"
SOURCE = ROOT / "crds" / "llmservice.io_llmservices.yaml"
COPY = ROOT / "charts" / "llmservice-operator" / "templates" / "crds" / "llmservice.io_llmservices.yaml"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sync_chart_crd", SCRIPT)
    assert spec is not None and spec.loader is not None, f"cannot load {SCRIPT}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sync = _load_script()

FAKE_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {
        "name": "widgets.example.com",
        "labels": {"example.com/tier": "api"},
        "annotations": {"example.com/owner": "team"},
    },
    "spec": {
        "group": "example.com",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget", "listKind": "WidgetList"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "description": "Mentions {{ .Values.secret }} and }} on purpose.",
                    }
                },
            }
        ],
    },
    "status": {"acceptedNames": {"kind": "", "plural": ""}, "conditions": [], "storedVersions": []},
}


def test_chart_copy_equals_generated() -> None:
    assert SOURCE.is_file(), f"the CRD source {SOURCE.relative_to(ROOT)} is missing"
    expected = sync.expected_files()
    assert set(expected) == {SOURCE.name}
    assert COPY.is_file(), f"{COPY.relative_to(ROOT)} is missing: run python scripts/sync-chart-crd.py"
    present = sorted(p.name for p in COPY.parent.glob("*.yaml"))
    assert present == sorted(expected), f"stale files in {COPY.parent.relative_to(ROOT)}: {present}"
    assert COPY.read_text() == expected[SOURCE.name], (
        f"{COPY.relative_to(ROOT)} differs from {SOURCE.relative_to(ROOT)}: run python scripts/sync-chart-crd.py"
    )


def test_check_mode_agrees() -> None:
    assert sync.main(["--check"]) == 0


def test_chart_copy_is_gated_and_kept() -> None:
    text = COPY.read_text()
    assert text.startswith("{{- if .Values.crds.enabled }}\n")
    assert text.rstrip("\n").endswith("{{- end }}")
    assert "    {{- if .Values.crds.keep }}\n    helm.sh/resource-policy: keep\n    {{- end }}\n" in text


def test_source_has_the_decided_names() -> None:
    crd = yaml.safe_load(SOURCE.read_text())
    assert crd["metadata"]["name"] == "llmservices.llmservice.io"
    assert crd["spec"]["group"] == "llmservice.io"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"]) == ("LLMService", "llmservices")
    assert "llmsvc" in names.get("shortNames", [])
    assert [v["name"] for v in crd["spec"]["versions"]] == ["v1alpha1"]


def test_render_keeps_content_and_drops_status() -> None:
    text = sync.render_template(yaml.safe_dump(FAKE_CRD), "crds/widgets.yaml")
    lines = text.splitlines()
    assert lines[0] == "{{- if .Values.crds.enabled }}"
    assert lines[-1] == "{{- end }}"
    # Every template action is one the script wrote; braces from the source come out escaped.
    assert '{{ "{{" }} .Values.secret }}' in text
    assert "status:" not in text
    assert "  name: widgets.example.com" in lines
    assert "    example.com/tier: api" in lines
    assert "    example.com/owner: team" in lines
    assert "    llmservice.io/generated-from: crds/widgets.yaml" in lines


def test_chart_labels_win_over_source_labels() -> None:
    source = {**FAKE_CRD, "metadata": {"name": "w", "labels": {"app.kubernetes.io/name": "x", "tier": "api"}}}
    text = sync.render_template(yaml.safe_dump(source), "crds/w.yaml")
    assert "app.kubernetes.io/name: x" not in text
    assert "    tier: api" in text.splitlines()


def test_render_is_deterministic() -> None:
    source = yaml.safe_dump(FAKE_CRD)
    assert sync.render_template(source, "crds/w.yaml") == sync.render_template(source, "crds/w.yaml")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}, "not a CustomResourceDefinition"),
        ({**FAKE_CRD, "metadata": {"labels": {}}}, "no metadata.name"),
        ({**FAKE_CRD, "metadata": {"name": "w", "labels": {"a": 1}}}, "map of strings"),
    ],
)
def test_render_rejects_bad_sources(document: dict[str, Any], message: str) -> None:
    with pytest.raises(sync.SyncError, match=message):
        sync.render_template(yaml.safe_dump(document), "crds/bad.yaml")


def test_render_rejects_several_documents() -> None:
    with pytest.raises(sync.SyncError, match="exactly one"):
        sync.render_template(yaml.safe_dump(FAKE_CRD) + "---\n" + yaml.safe_dump(FAKE_CRD), "crds/two.yaml")
