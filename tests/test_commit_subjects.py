"""Commit subjects are `area: summary` of at most 72 characters (scripts/check-commits.py, .githooks/commit-msg)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check-commits.py"
HOOK = ROOT / ".githooks" / "commit-msg"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_commits", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_commits = load_script()


@pytest.mark.parametrize(
    "subject",
    [
        "server: 413 for bodies over --max-request-mib",
        "operator, devtools: one restricted security context; one hub lookup",
        "operator,devtools: no space after the comma",
        "server/engine: a slash joins areas too",
        "k8s-v1.36: digits, dots and hyphens in an area",
        "docs: " + "x" * (72 - len("docs: ")),  # exactly 72
    ],
)
def test_subjects_that_keep_the_rule(subject: str) -> None:
    assert check_commits.subject_problem(subject) is None


@pytest.mark.parametrize(
    ("subject", "why"),
    [
        ("Server: capitalised area", "area: summary"),
        ("fix the thing", "area: summary"),
        ("server:no space after the colon", "area: summary"),
        ("server:  two spaces", "area: summary"),
        ("server: ", "area: summary"),
        ("operator , devtools: space before the comma", "area: summary"),
        ("the server: words with spaces are not an area", "area: summary"),
        ("", "area: summary"),
        ("docs: " + "x" * (73 - len("docs: ")), "73 characters"),
    ],
)
def test_subjects_that_break_the_rule_say_why(subject: str, why: str) -> None:
    problem = check_commits.subject_problem(subject)
    assert problem is not None and why in problem


def test_the_subject_of_a_message_skips_blank_and_comment_lines() -> None:
    message = "\n# Please enter the commit message\nserver: the subject\n\nBody: 12 ms -> 3 ms.\n"
    assert check_commits.message_subject(message) == "server: the subject"


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout.strip()


def check(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=repo, capture_output=True, text=True, check=False)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "commit", "-q", "--allow-empty", "-m", "A grandfathered subject that is far too long and has no area at all, ever")
    return tmp_path


def test_a_range_fails_on_a_bad_subject_after_the_base_and_names_it(repo: Path) -> None:
    base = git(repo, "rev-parse", "HEAD")
    git(repo, "commit", "-q", "--allow-empty", "-m", "server: a good one")
    assert check(repo, base).returncode == 0  # the base itself is grandfathered

    git(repo, "commit", "-q", "--allow-empty", "-m", "Fixed stuff")
    bad = git(repo, "rev-parse", "--short", "HEAD")
    result = check(repo, base)
    assert result.returncode == 1
    assert bad in result.stderr and "Fixed stuff" in result.stderr
    assert "server: a good one" not in result.stderr


def test_merge_commits_are_not_checked(repo: Path) -> None:
    base = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "-b", "side")
    git(repo, "commit", "-q", "--allow-empty", "-m", "tests: on the side")
    git(repo, "checkout", "-q", "main")
    git(repo, "merge", "-q", "--no-ff", "--no-edit", "side")
    assert git(repo, "log", "-1", "--format=%s").startswith("Merge branch")
    assert check(repo, base).returncode == 0


def test_a_base_that_is_not_an_ancestor_skips_with_a_message(repo: Path) -> None:
    result = check(repo, "0" * 40)
    assert result.returncode == 0
    assert "skipping" in result.stdout


def test_the_commit_msg_hook_refuses_a_bad_subject_and_takes_a_good_one(repo: Path) -> None:
    git(repo, "config", "core.hooksPath", str(HOOK.parent))
    with pytest.raises(subprocess.CalledProcessError) as refused:
        git(repo, "commit", "-q", "--allow-empty", "-m", "Fixed stuff")
    assert "area: summary" in refused.value.stderr
    git(repo, "commit", "-q", "--allow-empty", "-m", "server: a good one", "-m", "Body: 12 ms -> 3 ms.")
    assert git(repo, "log", "-1", "--format=%s") == "server: a good one"
