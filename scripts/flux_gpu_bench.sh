#!/usr/bin/env bash
# FLUX.1-dev-shaped random-weight model: our preview grid vs FluxPipeline at the same K (see scripts/flux_gpu_bench.py).
# On a machine with torch + transformers but no diffusers, the wheels in .whl/ are installed first (no network).
#   scripts/flux_gpu_bench.sh            # 1024x1024, 4 seeds, K = 4, on the GPU
#   scripts/flux_gpu_bench.sh --small    # a tiny model on the CPU (dry run)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import diffusers, sqlite_utils" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
exec python3 scripts/flux_gpu_bench.py "$@"
