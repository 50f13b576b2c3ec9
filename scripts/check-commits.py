#!/usr/bin/env python3
"""Commit subjects are `area: summary`, at most 72 characters; numbers and reasons go in the body.

    scripts/check-commits.py BASE                  every non-merge commit in BASE..HEAD (scripts/test.sh)
    scripts/check-commits.py --message-file FILE   one message being written (.githooks/commit-msg)

The area is one or more lowercase names joined by commas or slashes (`server:`, `operator, devtools:`,
`engine/scheduler:`). A BASE this checkout does not have as an ancestor of HEAD (a shallow clone, a
rewritten history) skips the check with a message instead of failing it. Standard library only, so
the hook runs with any `python3`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

MAX_SUBJECT = 72
_NAME = r"[a-z0-9][a-z0-9._-]*"
SUBJECT = re.compile(rf"^{_NAME}(?:(?:, ?|/){_NAME})*: \S")


def subject_problem(subject: str) -> str | None:
    """Why `subject` breaks the rule, or None when it keeps it."""
    if not SUBJECT.match(subject):
        return "not `area: summary` (a lowercase area, e.g. `server:` or `operator, devtools:`, then a summary)"
    if len(subject) > MAX_SUBJECT:
        return f"{len(subject)} characters, more than {MAX_SUBJECT} (numbers and reasons go in the body)"
    return None


def message_subject(message: str) -> str:
    """The subject of a message as git will record it: its first line that is neither blank nor a comment."""
    for line in message.splitlines():
        if line.strip() and not line.startswith("#"):
            return line.rstrip()
    return ""


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=False)


def check_range(base: str) -> int:
    try:
        ancestor = _git("merge-base", "--is-ancestor", base, "HEAD").returncode == 0
    except FileNotFoundError:  # no git at all: a source tarball
        ancestor = False
    if not ancestor:
        print(f"check-commits: {base} is not an ancestor of HEAD here (shallow clone?); skipping the subject check")
        return 0
    log = _git("log", "--no-merges", "--format=%h%x00%s", f"{base}..HEAD")
    if log.returncode != 0:
        print(f"check-commits: git log failed: {log.stderr.strip()}", file=sys.stderr)
        return 1
    commits = [line.split("\0", 1) for line in log.stdout.splitlines()]
    failures = [(sha, subject, problem) for sha, subject in commits if (problem := subject_problem(subject))]
    for sha, subject, problem in failures:
        print(f"{sha} {subject!r}: {problem}", file=sys.stderr)
    print(f"check-commits: {len(commits) - len(failures)} of {len(commits)} commit subjects since {base[:12]} keep the rule")
    return 1 if failures else 0


def check_message(path: Path) -> int:
    subject = message_subject(path.read_text())
    problem = subject_problem(subject)
    if problem is None:
        return 0
    print(f"commit subject {subject!r}: {problem}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", nargs="?", help="check BASE..HEAD")
    parser.add_argument("--message-file", type=Path, help="check one commit message (the commit-msg hook)")
    args = parser.parse_args(argv)
    if args.message_file is not None:
        return check_message(args.message_file)
    if args.base is None:
        parser.error("give BASE or --message-file")
    return check_range(args.base)


if __name__ == "__main__":
    sys.exit(main())
