"""The release workflow pushes exactly what the chart's defaults and the examples name, and actionlint passes it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmservice_operator.settings import DEFAULT_SERVER_IMAGE

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
CHART = ROOT / "charts" / "llmservice-operator"


def workflow() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text())
    return loaded


def pushed_images(version: str) -> set[str]:
    """The image references the images job pushes for a version, read from its matrix."""
    flow = workflow()
    registry = flow["env"]["REGISTRY"]
    return {f"{registry}/{entry['image']}:{version}{entry['suffix']}" for entry in flow["jobs"]["images"]["strategy"]["matrix"]["include"]}


def test_a_tag_pushes_the_images_the_chart_and_the_examples_name() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    version = chart["appVersion"]
    pushed = pushed_images(version)
    assert f"{values['image']['repository']}:{version}" in pushed, "the operator image the chart runs"
    assert f"ghcr.io/llmservice/llmservice-server:{version}" == DEFAULT_SERVER_IMAGE
    assert DEFAULT_SERVER_IMAGE in pushed, "the server image the operator defaults to"
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(example.read_text()):
            image = ((doc or {}).get("spec") or {}).get("server", {}).get("image")
            if image:
                assert image in pushed, f"{example.name} names {image}, which no release pushes"


def test_every_image_is_multi_arch_and_the_chart_goes_to_oci() -> None:
    flow = workflow()
    assert flow[True] == {"push": {"tags": ["v*.*.*"]}}  # YAML 1.1 reads the key `on` as true
    for entry in flow["jobs"]["images"]["strategy"]["matrix"]["include"]:
        assert set(entry["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}, entry["name"]
    push = next(step for step in flow["jobs"]["chart"]["steps"] if step.get("name") == "package and push")
    assert 'helm push "dist/llmservice-operator-$VERSION.tgz" "oci://$REGISTRY/charts"' in push["run"]
    assert flow["jobs"]["images"]["permissions"]["packages"] == "write"


@pytest.mark.tools
def test_actionlint_passes_the_workflows() -> None:
    actionlint = shutil.which("actionlint")
    assert actionlint, "actionlint is built by scripts/build-cluster-tools.sh into the cluster tools' bin directory"
    result = subprocess.run([actionlint], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
