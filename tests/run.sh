#!/usr/bin/env bash
# Builds fused_norm (see .ci/bootstrap.sh) and runs the test suite on every device present.
# Extra arguments go to pytest.
set -euo pipefail
# pytest's --help needs no build.
build=
for arg in "$@"; do case $arg in -h | --help) build=--no-build ;; esac; done
source "$(dirname "$0")/../.ci/bootstrap.sh" $build
cd "$_fn_root"
exec "$PY" -m pytest tests -q -p no:cacheprovider "$@"
