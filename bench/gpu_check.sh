#!/usr/bin/env bash
# The server on one GPU against `transformers serve --continuous-batching` and a static batch,
# random weights in Llama-3.2-1B and Llama-3.1-8B shapes (bench/gpu_check.py says what it measures).
#
#   bench/gpu_check.sh --fetch-wheels   # here, with network, once: the server's missing packages -> bench/wheels/
#   bench/gpu_check.sh                  # on the GPU machine, no network: under 8 minutes on one H100
#   bench/gpu_check.sh --smoke          # the same path on the CPU with the tiny model's shapes (a test runs it)
#
# The GPU machine has torch and transformers but not the server's web stack: when `import fastapi`
# fails there, the wheels carried in bench/wheels/ (ignored by git; carry them) are installed into a
# folder of their own and put on PYTHONPATH. Nothing is downloaded on that machine.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheels="$repo/bench/wheels"
python="${PYTHON:-python3}"

# What the server and `transformers serve` import that the GPU image lacks (its package list:
# /work/.library/device/KINDS.md), at the versions pyproject.toml pins; the GPU image's python is 3.12.
WHEELS=(
  fastapi==0.163.2 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3
  python-dotenv==1.2.4 typing-inspection==0.4.5 annotated-types==0.8.0 uvicorn==0.54.0 httptools==0.9.0
  openai==3.51.0 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5
  opentelemetry-api==1.45.3 typing-extensions==4.16.0 xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p "$wheels"
  platforms=()
  for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d "$wheels" "${WHEELS[@]}"
  du -sh "$wheels"
  exit 0
fi

if ! "$python" -c 'import fastapi, uvicorn, pydantic, pydantic_settings' 2>/dev/null; then
  if ! compgen -G "$wheels/*.whl" >/dev/null; then
    echo "gpu_check: fastapi/uvicorn/pydantic are missing and $wheels holds no wheels;" \
      "run 'bench/gpu_check.sh --fetch-wheels' on a machine with network and carry bench/wheels" >&2
    exit 2
  fi
  site="$(mktemp -d /tmp/llmservice-gpu-site.XXXXXX)"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

export PYTHONPATH="$repo/server:$repo/operator:$repo${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$python" "$repo/bench/gpu_check.py" "$@"
