"""docs/crd-reference.md is generated from the CRD, and the committed copy is up to date."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_crd_docs.py"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_crd_docs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_reference_equals_the_generated_one() -> None:
    generator = load_generator()
    expected: str = generator.render(generator.load_crd())
    committed = (ROOT / "docs" / "crd-reference.md").read_text(encoding="utf-8")
    assert committed == expected, "docs/crd-reference.md is stale: run python scripts/gen_crd_docs.py"


def test_reference_documents_every_field_and_rule() -> None:
    generator = load_generator()
    crd = generator.load_crd()
    text: str = generator.render(crd)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    def walk(node: dict[str, object]) -> None:
        properties = node.get("properties", {})
        assert isinstance(properties, dict)
        for name, child in properties.items():
            assert f"| `{name}` |" in text
            walk(child)
        items = node.get("items")
        if isinstance(items, dict):
            walk(items)
        rules = node.get("x-kubernetes-validations", [])
        assert isinstance(rules, list)
        for rule in rules:
            assert " ".join(rule["message"].split()) in text

    walk(schema)
    assert "## `spec.model.source`" in text
    assert "](#specmodelsource)" in text


def test_check_mode_reports_a_current_reference() -> None:
    generator = load_generator()
    assert generator.main(["--check"]) == 0
