#!/usr/bin/env bash
# Builds fused_norm (see .ci/bootstrap.sh) and runs the test suite on every device present.
# Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/../.ci/bootstrap.sh"
cd "$_fn_root"
exec "$PY" -m pytest tests -q -p no:cacheprovider "$@"
