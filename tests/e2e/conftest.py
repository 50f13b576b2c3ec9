"""End-to-end fixtures: one real local control plane per session, a fresh namespace per test.

Every test under tests/e2e/ is marked ``e2e``. When the control plane cannot start, the tests
fail with the reason (a missing Go toolchain, a failed build, a component's log tail); they are
never skipped.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from devtools.controlplane import ControlPlane, ControlPlaneError
from devtools.waiting import wait_for

_E2E_DIR = Path(__file__).resolve().parent

_kept_state: list[Path] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(_E2E_DIR):
            item.add_marker(pytest.mark.e2e)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for state_dir in _kept_state:
        terminalreporter.write_line(f"e2e: control plane state and component logs kept in {state_dir / 'logs'}")


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    """A running local control plane with two fake nodes of 4 nvidia.com/gpu each."""
    plane = ControlPlane()
    try:
        plane.start()
    except ControlPlaneError as error:
        _kept_state.append(plane.state_dir)
        pytest.fail(f"the local Kubernetes control plane did not start: {error}", pytrace=False)
    try:
        yield plane
    finally:
        failed = request.session.testsfailed > 0
        if failed:
            _kept_state.append(plane.state_dir)
        plane.stop(keep_state=failed)


def _namespace_name(test_name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")
    slug = slug.removeprefix("test-")[:40].rstrip("-")
    return f"e2e-{slug}-{secrets.token_hex(3)}"


@pytest.fixture
def namespace(cluster: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount), deleted afterwards without waiting."""
    name = _namespace_name(request.node.name)
    cluster.kubectl("create", "namespace", name)
    wait_for(
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
        30,
        f"the default ServiceAccount in namespace {name}",
    )
    yield name
    cluster.kubectl("delete", "namespace", name, "--ignore-not-found", "--wait=false")


@pytest.fixture(scope="session")
def chart(cluster: ControlPlane) -> Iterator[None]:
    """The operator chart installed once per session: it owns the CRD and the operator's RBAC."""
    from devtools.operator_harness import RELEASE, SYSTEM_NAMESPACE, helm_install

    helm_install(cluster)
    yield
    cluster.helm("uninstall", RELEASE, "--namespace", SYSTEM_NAMESPACE, check=False)
