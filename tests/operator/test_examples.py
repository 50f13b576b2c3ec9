"""Every manifest in examples/ is one a user can apply as it is.

Each LLMService parses with the operator's model, and validates against the CRD's schema after
the API server's structural defaulting (a JSON-schema rendering of the openAPIV3Schema, with
unknown fields refused as ``kubectl apply`` refuses them). The CEL rules are exercised against a
real API server in tests/e2e/test_crd_validation.py.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no py.typed; types-jsonschema is not a dependency
import kubernetes_validate
import pytest
import yaml

from llmservice_operator import spec as api

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CRD_PATH = ROOT / "crds" / "llmservice.io_llmservices.yaml"
KUBERNETES_VERSION = "1.36"

Schema = dict[str, Any]
Document = dict[str, Any]


def crd_schema() -> Schema:
    crd = yaml.safe_load(CRD_PATH.read_text(encoding="utf-8"))
    schema: Schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def documents() -> list[tuple[str, Document]]:
    found = []
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if doc is not None:
                found.append((f"{path.relative_to(EXAMPLES)}#{index}", doc))
    return found


DOCUMENTS = documents()
SERVICES = [(name, doc) for name, doc in DOCUMENTS if doc.get("kind") == api.KIND]
CORE = [(name, doc) for name, doc in DOCUMENTS if doc.get("apiVersion") == "v1"]


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Structural defaulting as the API server does it: absent fields take their default, and the
    defaults nested inside a defaulted object apply too."""
    if isinstance(value, dict):
        for key, child in schema.get("properties", {}).items():
            if key not in value and "default" in child:
                value[key] = copy.deepcopy(child["default"])
            if key in value:
                apply_defaults(child, value[key])
        additional = schema.get("additionalProperties")
        if isinstance(additional, dict):
            for item in value.values():
                apply_defaults(additional, item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)
    return value


def json_schema(schema: Schema) -> Schema:
    """The openAPIV3Schema as JSON Schema: Kubernetes extensions dropped, int-or-string kept as its
    anyOf, and properties closed unless the schema preserves unknown fields."""
    out: Schema = {
        key: value
        for key, value in schema.items()
        if not key.startswith("x-kubernetes-") and key not in {"properties", "items", "additionalProperties", "anyOf"}
    }
    if "properties" in schema:
        out["properties"] = {name: json_schema(child) for name, child in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(schema.get("items"), dict):
        out["items"] = json_schema(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = json_schema(schema["additionalProperties"])
    if "anyOf" in schema:
        out["anyOf"] = [json_schema(branch) for branch in schema["anyOf"]]
    return out


VALIDATOR = jsonschema.Draft202012Validator(json_schema(crd_schema()))


def test_there_are_examples_of_every_model_source() -> None:
    sources = {key for _, doc in SERVICES for key in doc["spec"]["model"]["source"]}
    assert sources >= {"bundled", "huggingFace", "pvc"}
    assert any("autoscaling" in doc["spec"] for _, doc in SERVICES)


@pytest.mark.parametrize(("name", "doc"), SERVICES, ids=[name for name, _ in SERVICES])
def test_example_parses_with_the_operator_model(name: str, doc: Document) -> None:
    assert doc["apiVersion"] == api.API_VERSION
    service = api.parse({**doc, "metadata": {**doc["metadata"], "namespace": "default", "uid": "u"}})
    assert service.spec == api.LLMServiceSpec.model_validate(doc["spec"])


@pytest.mark.parametrize(("name", "doc"), SERVICES, ids=[name for name, _ in SERVICES])
def test_example_validates_against_the_crd_schema(name: str, doc: Document) -> None:
    defaulted = apply_defaults(crd_schema(), copy.deepcopy(doc))
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(defaulted)]
    assert errors == []
    # The API server's defaults and the model's defaults mean the same spec.
    assert api.LLMServiceSpec.model_validate(defaulted["spec"]) == api.LLMServiceSpec.model_validate(doc["spec"])


def test_the_schema_check_rejects_what_the_api_server_rejects() -> None:
    """The JSON-schema rendering is not vacuous: wrong enums, types and unknown fields fail."""
    (doc,) = [doc for name, doc in SERVICES if name.startswith("minimal-cpu.yaml")]
    for path, value in (
        (("spec", "model", "dtype"), "int4"),
        (("spec", "resources", "gpu", "count"), -1),
        (("spec", "resources", "memory", "request"), "lots"),
        (("spec", "server", "maxNumSeqs"), "16"),
        (("spec", "model", "sauce"), {}),
    ):
        broken = copy.deepcopy(doc)
        target = broken
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = value
        assert not VALIDATOR.is_valid(apply_defaults(crd_schema(), broken)), path


def test_minimal_example_takes_the_documented_defaults() -> None:
    (doc,) = [doc for name, doc in SERVICES if name.startswith("minimal-cpu.yaml")]
    spec = apply_defaults(crd_schema(), copy.deepcopy(doc))["spec"]
    assert spec["server"]["maxNumSeqs"] == 16
    assert spec["service"] == {"type": "ClusterIP", "port": 8000}
    assert spec["monitoring"] == {"mode": "auto", "interval": "30s"}
    assert "replicas" not in spec


@pytest.mark.parametrize(("name", "doc"), CORE, ids=[name for name, _ in CORE])
def test_core_objects_in_examples_are_valid(name: str, doc: Document) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_argocd_application_points_at_an_existing_example() -> None:
    (app,) = [doc for _, doc in DOCUMENTS if doc.get("kind") == "Application"]
    source = app["spec"]["source"]
    assert source["path"] == "examples"
    assert (ROOT / source["path"] / source["directory"]["include"]).is_file()
