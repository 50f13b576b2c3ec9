"""The CRD in crds/ and the pydantic model in llmservice_operator.spec are one contract.

Walks the CRD's openAPIV3Schema and ``LLMServiceSpec`` side by side, by alias, and fails on any
drift: a property on one side only, a different enum, a different default, a different required
set, a bound the model enforces but the CRD does not (so the API server would store an object
the operator then refuses), a field without a description, or a CRD the API server would reject.
"""

from __future__ import annotations

import functools
import operator
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import annotated_types
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from llmservice_operator import spec as api

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "llmservice.io_llmservices.yaml"
KUBERNETES_VERSION = "1.36"  # the target cluster; kubernetes-validate carries its schemas

Schema = dict[str, Any]


def load_crd() -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text(encoding="utf-8"))
    return crd


def root_schema() -> Schema:
    versions = load_crd()["spec"]["versions"]
    (version,) = versions
    schema: Schema = version["schema"]["openAPIV3Schema"]
    return schema


def spec_schema() -> Schema:
    schema: Schema = root_schema()["properties"]["spec"]
    return schema


def alias(name: str, field: FieldInfo) -> str:
    return field.alias or name


def unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(inner type, whether None was allowed) for ``X | None``."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner = functools.reduce(operator.or_, args)
        return inner, len(args) != len(typing.get_args(annotation))
    return annotation, False


def is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def pairs(schema: Schema, model: type[BaseModel], path: str) -> Iterator[tuple[str, Schema, FieldInfo, Any, type[BaseModel]]]:
    """Every (path, CRD property, pydantic field, inner annotation, owning model), recursively."""
    fields = {alias(name, field): field for name, field in model.model_fields.items()}
    for key, field in fields.items():
        child = schema.get("properties", {}).get(key)
        if child is None:
            continue
        annotation, _ = unwrap_optional(field.annotation)
        yield f"{path}.{key}", child, field, annotation, model
        if is_model(annotation):
            yield from pairs(child, annotation, f"{path}.{key}")
        elif typing.get_origin(annotation) is tuple:
            item = typing.get_args(annotation)[0]
            if is_model(item):
                yield from pairs(child["items"], item, f"{path}.{key}[]")


def object_levels(schema: Schema, model: type[BaseModel], path: str) -> Iterator[tuple[str, Schema, type[BaseModel]]]:
    yield path, schema, model
    for child_path, child, _, annotation, _ in pairs(schema, model, path):
        if is_model(annotation):
            yield child_path, child, annotation
        elif typing.get_origin(annotation) is tuple and is_model(typing.get_args(annotation)[0]):
            yield child_path + "[]", child["items"], typing.get_args(annotation)[0]


ALL_PAIRS = list(pairs(spec_schema(), api.LLMServiceSpec, "spec"))
ALL_LEVELS = list(object_levels(spec_schema(), api.LLMServiceSpec, "spec"))


PAIR_IDS = [pair[0] for pair in ALL_PAIRS]


@pytest.mark.parametrize(("path", "schema", "model"), ALL_LEVELS, ids=[level[0] for level in ALL_LEVELS])
def test_same_property_names_at_every_level(path: str, schema: Schema, model: type[BaseModel]) -> None:
    crd_names = set(schema.get("properties", {}))
    model_names = {alias(name, field) for name, field in model.model_fields.items()}
    assert crd_names == model_names, (
        f"{path}: only in the CRD {sorted(crd_names - model_names)}, only in {model.__name__} {sorted(model_names - crd_names)}"
    )


@pytest.mark.parametrize(("path", "schema", "model"), ALL_LEVELS, ids=[level[0] for level in ALL_LEVELS])
def test_same_required_fields(path: str, schema: Schema, model: type[BaseModel]) -> None:
    model_required = {alias(name, field) for name, field in model.model_fields.items() if field.is_required()}
    assert set(schema.get("required", [])) == model_required, path


def kind_of(annotation: Any, model: type[BaseModel]) -> str:
    """The CRD type a pydantic annotation must be declared as."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "string"
    is_union = origin in (types.UnionType, typing.Union)
    if is_union and set(typing.get_args(annotation)) == {int, str}:
        return "int-or-string"
    if annotation is str:
        return "int-or-string" if model.model_config.get("coerce_numbers_to_str") else "string"
    if annotation is bool:
        return "boolean"
    if annotation is int:
        return "integer"
    if is_model(annotation) or typing.get_origin(annotation) is dict:
        return "object"
    if typing.get_origin(annotation) is tuple:
        return "array"
    raise AssertionError(f"no CRD type known for {annotation!r}")


def crd_kind(schema: Schema) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "int-or-string"
    kind: str = schema["type"]
    return kind


@pytest.mark.parametrize(("path", "schema", "field", "annotation", "model"), ALL_PAIRS, ids=PAIR_IDS)
def test_same_types(path: str, schema: Schema, field: FieldInfo, annotation: Any, model: type[BaseModel]) -> None:
    assert crd_kind(schema) == kind_of(annotation, model), path
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item,) = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if item is str:
            assert schema["items"]["type"] == "string", path
        elif typing.get_origin(item) is dict:
            assert schema["items"]["type"] == "object", path
    if origin is dict:
        value_type = typing.get_args(annotation)[1]
        if value_type is str:
            assert schema["additionalProperties"]["type"] == "string", path
        else:
            assert schema.get("x-kubernetes-preserve-unknown-fields") is True, (
                f"{path}: a free-form dict in the model must preserve unknown fields in the CRD"
            )


@pytest.mark.parametrize(("path", "schema", "field", "annotation", "model"), ALL_PAIRS, ids=PAIR_IDS)
def test_same_enums(path: str, schema: Schema, field: FieldInfo, annotation: Any, model: type[BaseModel]) -> None:
    if typing.get_origin(annotation) is Literal:
        assert schema.get("enum") == list(typing.get_args(annotation)), path
    else:
        assert "enum" not in schema, f"{path}: the CRD has an enum the model does not"


def model_default(field: FieldInfo) -> Any:
    return field.get_default(call_default_factory=True)


def is_empty_default(value: Any) -> bool:
    """True for a default that an absent field means anyway: None, "", (), {} or a model of those."""
    if value is None or value is PydanticUndefined:
        return True
    if isinstance(value, BaseModel):
        return all(is_empty_default(v) for v in value.model_dump().values())
    return isinstance(value, (str, tuple, dict, list)) and len(value) == 0


@pytest.mark.parametrize(("path", "schema", "field", "annotation", "model"), ALL_PAIRS, ids=PAIR_IDS)
def test_same_defaults(path: str, schema: Schema, field: FieldInfo, annotation: Any, model: type[BaseModel]) -> None:
    default = model_default(field)
    if "default" not in schema:
        assert is_empty_default(default), f"{path}: the model defaults to {default!r}, the CRD declares no default"
        return
    if is_model(annotation):
        # The API server stores the CRD default (and then fills its nested defaults); the model
        # must read that back as its own default.
        assert isinstance(default, BaseModel), path
        assert annotation.model_validate(schema["default"]) == default, path
    else:
        assert schema["default"] == default, path


def test_replicas_has_no_default() -> None:
    """A default would set replicas on every object, and replicas excludes autoscaling."""
    assert "default" not in spec_schema()["properties"]["replicas"]
    assert api.LLMServiceSpec.model_fields["replicas"].default is None


def cel_minimum(schema: Schema) -> int | None:
    for rule in schema.get("x-kubernetes-validations", []):
        words = rule["rule"].split()
        if len(words) == 3 and words[:2] == ["self", ">="]:
            return int(words[2])
    return None


@pytest.mark.parametrize(("path", "schema", "field", "annotation", "model"), ALL_PAIRS, ids=PAIR_IDS)
def test_crd_enforces_the_model_bounds(path: str, schema: Schema, field: FieldInfo, annotation: Any, model: type[BaseModel]) -> None:
    """Whatever the API server stores, the operator can parse: the CRD is at least as strict."""
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Ge):
            minimum = schema.get("minimum", cel_minimum(schema))
            assert minimum is not None and minimum >= bound.ge, f"{path}: model needs >= {bound.ge}"
        elif isinstance(bound, annotated_types.Le):
            assert "maximum" in schema and schema["maximum"] <= bound.le, f"{path}: model needs <= {bound.le}"
        elif isinstance(bound, annotated_types.MinLen):
            assert schema.get("minLength", 0) >= bound.min_length, f"{path}: model needs length >= {bound.min_length}"
        elif isinstance(bound, annotated_types.MaxLen):
            assert "maxLength" in schema and schema["maxLength"] <= bound.max_length, path
        elif getattr(bound, "pattern", None) is not None:
            assert schema.get("pattern") == bound.pattern, f"{path}: model pattern {bound.pattern!r}"


QUANTITIES = ["spec.resources.cpu.request", "spec.resources.cpu.limit", "spec.resources.memory.request"]
QUANTITIES += ["spec.resources.memory.limit", "spec.resources.shmSize"]


@pytest.mark.parametrize("path", QUANTITIES)
def test_quantities_use_the_model_quantity_pattern(path: str) -> None:
    schema = spec_schema()
    for key in path.split(".")[1:]:
        schema = schema["properties"][key]
    assert schema.get("x-kubernetes-int-or-string") is True, path
    assert schema["pattern"] == api._QUANTITY.pattern, path


def all_properties(schema: Schema, path: str) -> Iterator[tuple[str, Schema]]:
    for name, child in schema.get("properties", {}).items():
        yield f"{path}.{name}", child
        yield from all_properties(child, f"{path}.{name}")
    items = schema.get("items")
    if isinstance(items, dict):
        yield from all_properties(items, f"{path}[]")
    additional = schema.get("additionalProperties")
    if isinstance(additional, dict):
        yield from all_properties(additional, f"{path}{{}}")


def test_every_crd_property_has_a_description() -> None:
    """`kubectl explain` shows these; only the root metadata may have none (the API server forbids it)."""
    missing = [
        path for path, child in all_properties(root_schema(), "") if not str(child.get("description", "")).strip() and path != ".metadata"
    ]
    assert missing == []


def test_every_validation_rule_has_a_message() -> None:
    def rules(schema: Schema) -> Iterator[dict[str, Any]]:
        yield from schema.get("x-kubernetes-validations", [])
        for _, child in all_properties(schema, ""):
            yield from child.get("x-kubernetes-validations", [])

    found = list(rules(root_schema()))
    assert found, "the CRD declares no CEL rules"
    assert all(str(rule.get("message", "")).strip() for rule in found)


def test_every_model_field_is_reached_by_the_walk() -> None:
    """The walk above covers every pydantic field, so no nested model escapes the comparison."""
    covered = {path for path, *_ in ALL_PAIRS}
    expected: set[str] = set()
    for path, _, model in ALL_LEVELS:
        expected |= {f"{path}.{alias(name, field)}" for name, field in model.model_fields.items()}
    assert expected == covered


def test_crd_is_a_valid_kubernetes_object() -> None:
    # validate() answers with the schema version it used: the newest it has that is not newer.
    assert kubernetes_validate.validate(load_crd(), KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION


def test_crd_names_match_the_model_constants() -> None:
    crd = load_crd()
    assert crd["metadata"]["name"] == f"{api.PLURAL}.{api.GROUP}"
    assert crd["spec"]["group"] == api.GROUP
    assert crd["spec"]["names"]["kind"] == api.KIND
    assert crd["spec"]["names"]["plural"] == api.PLURAL
    assert [v["name"] for v in crd["spec"]["versions"]] == [api.VERSION]
