#!/usr/bin/env bash
# The whole check, as CI runs it: install, lint, types, architecture contracts, Dockerfile lint,
# chart lint, then every test including the real control-plane tier.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

step "bootstrap"
scripts/bootstrap.sh
BIN="$(scripts/build-cluster-tools.sh)"
export PATH="$PWD/.venv/bin:$BIN:$PATH"

step "ruff"
ruff check operator server devtools tests bench scripts
step "mypy --strict"
mypy
step "import-linter contracts"
lint-imports
step "hadolint"
hadolint Dockerfile.operator Dockerfile.server
step "actionlint"
actionlint
step "helm lint"
helm lint charts/llmservice-operator
step "pytest (unit, kmock, server, chart, e2e on a real control plane)"
python -m pytest "$@"
