#!/usr/bin/env bash
# The test command of the README: install, then run the whole suite.
set -uo pipefail
cd "$(dirname "$0")/.."
pip install -q torch==2.13.0 && pip install -q -e ".[test]" || exit 1
if ! command -v chromium >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium; browser tests will be skipped"
fi
python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
