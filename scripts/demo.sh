#!/usr/bin/env bash
# The demo: install the project, start a local control plane, install the chart, run the operator,
# apply the examples, and answer a chat completion from the model the operator configured.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m scripts.demo "$@"  # from the repository root: devtools imports
