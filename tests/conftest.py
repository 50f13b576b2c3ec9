"""Markers by what a test needs, so `scripts/test.sh --fast` can leave out what is slow to set up.

`e2e` (the control plane) is set in tests/e2e/conftest.py; here, by what a test uses:
- `tools`: the `helm` fixture (a binary scripts/build-cluster-tools.sh builds with Go);
- `process`: a module that starts inference server processes (it imports `ServerProcess` or
  `PairedCeiling`), which cost seconds each to start on this machine.
"""

from __future__ import annotations

import pytest

PROCESS_STARTERS = ("ServerProcess", "PairedCeiling")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "helm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.tools)
        module = getattr(item, "module", None)
        if module is not None and any(name in vars(module) for name in PROCESS_STARTERS):
            item.add_marker(pytest.mark.process)
