#!/usr/bin/env bash
# The wheels a GPU machine without diffusers or sqlite-utils needs for scripts/gpu_bench.sh, into .whl/.
#
#   bash scripts/gpu_wheels.sh          # here, where pip reaches PyPI; then carry .whl to the GPU machine
#
# That machine has PyTorch, transformers, huggingface_hub, safetensors, numpy, Pillow, click, tabulate,
# python-dateutil and pluggy, and no network. So this downloads diffusers, sqlite-utils and the needs of theirs
# it lacks, each at the version installed here (the versions the tests pass with), as x86-64 CPython 3.12
# wheels (all of them pure Python). scripts/gpu_bench.sh installs whatever lies in .whl/ into /tmp/site first.
# .whl/ is kept out of git through .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PACKAGES=(diffusers sqlite-utils sqlite-fts4 click-default-group importlib-metadata lazy-importer)
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
for name in "${PACKAGES[@]}"; do
  version=$($PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) || {
    echo "gpu_wheels: $name is not installed here; run 'pip install -e .[test]' first" >&2; exit 1; }
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name==$version"
done
ls -1 .whl
du -sh .whl | cut -f1
