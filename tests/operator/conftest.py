"""Fixtures shared by the operator tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import LuaRuntime

from llmservice_operator import spec as api

HEALTH_FILE = Path(__file__).resolve().parents[2] / "examples" / "gitops" / "argocd-cm-health.yaml"


@pytest.fixture(scope="session")
def health_check() -> Any:
    config = yaml.safe_load(HEALTH_FILE.read_text())
    script = config["data"][f"resource.customizations.health.{api.GROUP}_{api.KIND}"]
    lua = LuaRuntime()

    def to_lua(value: Any) -> Any:  # Argo CD hands the script the object as nested Lua tables
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value

    check = lua.eval(f"function(obj)\n{script}\nend")

    def run(obj: dict[str, Any]) -> tuple[str, str]:
        result = check(to_lua(obj))
        return str(result["status"]), str(result["message"])

    return run
