"""Markers by what a test needs, so `scripts/test.sh --fast` can leave out what is slow to set up.

`e2e` (the control plane) is set in tests/e2e/conftest.py; here, by what a test uses:
- `tools`: the `helm` fixture (a binary scripts/build-cluster-tools.sh builds with Go);
- `process`: a module that starts inference server processes: it imports `ServerProcess`, or
  anything from `bench` (benchmark drivers start servers and workers); each costs seconds here.
"""

from __future__ import annotations

import pytest


def starts_processes(module: object) -> bool:
    names = vars(module)
    return "ServerProcess" in names or any(
        str(getattr(value, "__module__", None) or getattr(value, "__name__", "")).startswith("bench.") for value in names.values()
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "helm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.tools)
        module = getattr(item, "module", None)
        if module is not None and starts_processes(module):
            item.add_marker(pytest.mark.process)
