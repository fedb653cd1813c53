#!/usr/bin/env bash
# Set up (tools/setup_env.sh), then run the test suite. Extra arguments go to pytest.
#   bash tools/run_tests.sh                 # everything (GPU tests skip with a reason without a GPU)
#   bash tools/run_tests.sh tests/layers -x # a part
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/tools/setup_env.sh")"
cd "$ROOT"
"$PY" -m deformable_family.collect_env 2>/dev/null
exec "$PY" -m pytest -q -rs "$@"
