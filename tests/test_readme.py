"""The README's set-up commands are the ones CI and people actually run."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section, flags=re.S)


def test_readme_keeps_exactly_two_setup_commands_and_they_exist() -> None:
    commands = readme_commands()
    assert commands == ["scripts/demo.sh", "scripts/test.sh"]
    for command in commands:
        assert (REPO / command).stat().st_mode & 0o111, f"{command} must be executable"


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(rf"^\s*(exec\s+)?{re.escape(readme_commands()[1])}\s*$", ci, flags=re.M)
