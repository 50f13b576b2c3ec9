#!/usr/bin/env bash
# The whole check, as CI runs it: install, lint, types, architecture contracts, Dockerfile lint,
# chart lint, then every test including the real control-plane tier.
#
#   scripts/test.sh [pytest args]          the full run (what CI runs)
#   scripts/test.sh --fast [pytest args]   no Go, no helm, no control plane, no server processes:
#                                          lint, types, contracts and the tests that need none of those
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

fast=0
if [[ "${1:-}" == "--fast" ]]; then
  fast=1
  shift
fi

step "bootstrap"
if ((fast)); then
  SKIP_CLUSTER_TOOLS=1 scripts/bootstrap.sh
  export PATH="$PWD/.venv/bin:$PATH"
else
  scripts/bootstrap.sh
  BIN="$(scripts/build-cluster-tools.sh)"
  export PATH="$PWD/.venv/bin:$BIN:$PATH"
fi

step "commit subjects"
# History before this commit is grandfathered: its subjects predate the rule (median 133 characters).
python3 scripts/check-commits.py "${LLMSERVICE_COMMITS_SINCE:-5ae5d3c793cbbf32fd763d123a76df612c2c3c28}"
step "ruff"
ruff check operator server devtools tests bench scripts
ruff format --check operator server devtools tests bench scripts
step "mypy --strict"
mypy
step "import-linter contracts"
lint-imports
step "hadolint"
hadolint Dockerfile.operator Dockerfile.server
if ((fast)); then
  step "pytest (unit, kmock, in-process server, chart files; not e2e, helm, actionlint or server processes)"
  exec python -m pytest -m "not e2e and not tools and not process" "$@"
fi
step "actionlint"
actionlint
step "helm lint"
helm lint charts/llmservice-operator
step "pytest (unit, kmock, server, chart, e2e on a real control plane)"
python -m pytest "$@"
